"""Checkpoints: a directory with config.json, model.safetensors, tokenizer.json and trainer state.

A run directory holds `ckpt-<step>/` directories and a `latest` file naming the newest one.
Each checkpoint is written into a temporary directory and renamed into place, and `latest` is
replaced atomically afterwards, so a crash at any moment leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .model import ConfigError, ModelConfig, MTPModel

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TRAINER_STATE = "trainer_state.pt"
TRAIN_CONFIG = "train_config.json"
LATEST = "latest"


class CheckpointError(ValueError):
    """A missing, truncated or inconsistent checkpoint; one line, meant for users."""


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: str | Path, step: int, model: MTPModel, tokenizer: Any | None = None,
                    trainer_state: dict[str, Any] | None = None, train_config: dict[str, Any] | None = None,
                    keep: int | None = None, model_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write run_dir/ckpt-<step>/ atomically, point run_dir/latest at it, keep the newest `keep`.
    `model_state` replaces model.state_dict() (e.g. full weights gathered from a sharded model)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"ckpt-{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=".tmp-ckpt-"))
    try:
        (tmp / CONFIG).write_text(json.dumps(model.cfg.to_dict(), indent=2))
        weights = model.state_dict() if model_state is None else model_state
        state = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt", "step": str(step)})
        if tokenizer is not None:
            tokenizer.save(tmp)
        if train_config is not None:
            (tmp / TRAIN_CONFIG).write_text(json.dumps(train_config, indent=2))
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)
        for f in tmp.iterdir():  # make the bytes durable before the rename publishes them
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_text_atomic(run_dir / LATEST, final.name + "\n")
    if keep is not None and keep > 0:
        old = sorted(p for p in run_dir.glob("ckpt-*") if p.is_dir())[:-keep]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
    return final


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory whose `latest` names one."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if (path / CONFIG).exists():
        return path
    latest = path / LATEST
    if latest.exists():
        target = path / latest.read_text().strip()
        if (target / CONFIG).exists():
            return target
        raise CheckpointError(f"{latest} names {target.name}, which is missing or incomplete")
    raise CheckpointError(f"{path} is neither a checkpoint (no {CONFIG}) nor a run directory (no {LATEST})")


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None when the run has none yet."""
    run_dir = Path(run_dir)
    if not (run_dir / LATEST).exists():
        return None
    return resolve_checkpoint(run_dir)


def load_config(ckpt: str | Path) -> ModelConfig:
    ckpt = resolve_checkpoint(ckpt)
    try:
        return ModelConfig.from_dict(json.loads((ckpt / CONFIG).read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"{ckpt / CONFIG} is not a valid model config: {e}") from None
    except ConfigError as e:
        raise CheckpointError(f"{ckpt / CONFIG}: {e}") from None


def load_weights(model: MTPModel, ckpt: str | Path) -> None:
    """Load model.safetensors into `model`, checking names and shapes."""
    ckpt = resolve_checkpoint(ckpt)
    path = ckpt / WEIGHTS
    if not path.exists():
        raise CheckpointError(f"{path} is missing")
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"{path} is corrupt or truncated ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{path} does not match config.json: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, t in state.items():
        if t.shape != expected[name].shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(t.shape)}, config expects {tuple(expected[name].shape)}")
    model.load_state_dict(state)


def load_tokenizer(ckpt: str | Path) -> Any | None:
    from .data import Tokenizer  # local import: only needed when a tokenizer is saved

    ckpt = resolve_checkpoint(ckpt)
    if not (ckpt / "tokenizer.json").exists():
        return None
    return Tokenizer.load(ckpt)


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> tuple[MTPModel, Any | None]:
    """(model in eval mode, tokenizer or None) from a checkpoint or run directory."""
    ckpt = resolve_checkpoint(path)
    cfg = load_config(ckpt)
    model = MTPModel(cfg)
    load_weights(model, ckpt)
    tokenizer = load_tokenizer(ckpt)
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(
            f"tokenizer in {ckpt} has {tokenizer.vocab_size} tokens but the model's vocab_size is {cfg.vocab_size}"
        )
    model.to(device=device, dtype=dtype).eval()
    return model, tokenizer


def load_trainer_state(ckpt: str | Path) -> dict[str, Any]:
    ckpt = resolve_checkpoint(ckpt)
    path = ckpt / TRAINER_STATE
    if not path.exists():
        raise CheckpointError(f"{path} is missing: the checkpoint cannot resume training")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{path} is corrupt or truncated ({type(e).__name__})") from None
