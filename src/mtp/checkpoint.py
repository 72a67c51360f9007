"""Checkpoints: a directory with config.json, model.safetensors, tokenizer.json and trainer state.

A run directory holds `ckpt-<step>/` directories and a `latest` file naming the newest one.
Each checkpoint is written into a temporary directory and renamed into place, and `latest` is
replaced atomically afterwards, so a crash at any moment leaves the previous checkpoint usable.
Every checkpoint carries manifest.json, the size and SHA-256 of each of its files; loading a file
checks it against the manifest, so corrupt weights are an error instead of a silently bad model.
Checkpoints written before manifests existed load without the check.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .fsutil import atomic_dir, atomic_write_text, remove_stale_temps
from .model import ConfigError, ModelConfig, MTPModel

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TRAINER_STATE = "trainer_state.pt"
TRAIN_CONFIG = "train_config.json"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "mtp-checkpoint-manifest"
LATEST = "latest"


class CheckpointError(ValueError):
    """A missing, truncated or inconsistent checkpoint; one line, meant for users."""


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(ckpt: Path) -> None:
    """manifest.json for the files now in `ckpt`, hashed from what is on disk."""
    files = {p.name: {"size": p.stat().st_size, "sha256": file_digest(p)}
             for p in sorted(ckpt.iterdir()) if p.is_file() and p.name != MANIFEST}
    (ckpt / MANIFEST).write_text(json.dumps({"format": MANIFEST_FORMAT, "version": 1, "files": files}, indent=1))


def _manifest(ckpt: Path) -> dict[str, dict[str, Any]] | None:
    path = ckpt / MANIFEST
    if not path.exists():
        return None  # an older checkpoint: nothing to check against
    try:
        files = json.loads(path.read_text())["files"]
        assert isinstance(files, dict)
        return files
    except (ValueError, KeyError, TypeError, AssertionError):
        raise CheckpointError(f"{path} is corrupt (not a checkpoint manifest)") from None


_verified: set[tuple[str, int, int, Any]] = set()  # files that matched their manifest entry


def verify_file(ckpt: Path, name: str) -> None:
    """Check ckpt/name against the manifest (size first: cheap; then the SHA-256)."""
    files = _manifest(ckpt)
    if files is None or name not in files:
        return
    path, want = ckpt / name, files[name]
    if not path.exists():
        raise CheckpointError(f"{path} is missing (listed in {MANIFEST})")
    st = path.stat()
    if st.st_size != want.get("size"):
        raise CheckpointError(f"{path} is corrupt or truncated: {st.st_size} bytes, {MANIFEST} says {want.get('size')}")
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, want.get("sha256"))
    if key in _verified:
        return  # hashed already in this process (e.g. --resume checks, then loads) and unchanged since
    if file_digest(path) != want.get("sha256"):
        raise CheckpointError(f"{path} is corrupt: its SHA-256 does not match {MANIFEST}")
    _verified.add(key)


def verify_checkpoint(ckpt: str | Path) -> None:
    """Every file the manifest lists is present and intact (CheckpointError naming the first bad one)."""
    ckpt = Path(ckpt)
    if not (ckpt / CONFIG).exists():
        raise CheckpointError(f"{ckpt / CONFIG} is missing")
    for name in _manifest(ckpt) or {}:
        verify_file(ckpt, name)


def _step(p: Path) -> int:
    try:
        return int(p.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's ckpt-<step> directories, oldest first."""
    return sorted((p for p in Path(run_dir).glob("ckpt-*") if p.is_dir() and _step(p) >= 0), key=_step)


def remove_stale_checkpoint_temps(run_dir: str | Path) -> list[Path]:
    """Delete half-written checkpoints (and `latest` updates) left by a killed run; call only
    when no run is writing there."""
    return remove_stale_temps(run_dir)


def save_checkpoint(run_dir: str | Path, step: int, model: MTPModel, tokenizer: Any | None = None,
                    trainer_state: dict[str, Any] | None = None, train_config: dict[str, Any] | None = None,
                    keep: int | None = None, model_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write run_dir/ckpt-<step>/ atomically, point run_dir/latest at it, keep the newest `keep`.
    `model_state` replaces model.state_dict() (e.g. full weights gathered from a sharded model)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"ckpt-{step:08d}"
    with atomic_dir(final, replace=True) as tmp:
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
        write_manifest(tmp)
    atomic_write_text(run_dir / LATEST, final.name + "\n")
    if keep is not None and keep > 0:
        _rotate(run_dir, final, keep)
    return final


def _rotate(run_dir: Path, final: Path, keep: int) -> None:
    """Keep `final` (just written, so the newest verified checkpoint) and the keep-1 newest older
    ones. Checkpoints past `final` (left from before a resume that fell back over a corrupt one)
    are left: the run rewrites them when it reaches their step."""
    older = [p for p in checkpoints(run_dir) if _step(p) < _step(final)]
    for p in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)


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


def resume_checkpoint(run_dir: str | Path, report: bool = True) -> Path | None:
    """The checkpoint `--resume` continues from: `latest` if it verifies, else the newest one that
    does (said on stderr); None when the run has no checkpoint. CheckpointError when checkpoints
    exist but none is intact."""
    run_dir = Path(run_dir)
    candidates = checkpoints(run_dir)[::-1]
    latest = run_dir / LATEST
    if latest.is_file():
        named = run_dir / latest.read_text().strip()
        candidates = [named] + [c for c in candidates if c != named]
    problems: list[str] = []
    for ckpt in candidates:
        try:
            verify_checkpoint(ckpt)
            if not (ckpt / TRAINER_STATE).exists():
                raise CheckpointError(f"{ckpt / TRAINER_STATE} is missing")
        except CheckpointError as e:
            problems.append(str(e))
            if report:
                print(f"warning: skipping {ckpt.name}: {e}", file=sys.stderr)
            continue
        if problems and report:
            print(f"resuming from {ckpt.name}, the newest checkpoint that verifies", file=sys.stderr)
        return ckpt
    if problems:
        raise CheckpointError(f"no checkpoint in {run_dir} verifies ({problems[0]})")
    return None


def load_config(ckpt: str | Path) -> ModelConfig:
    ckpt = resolve_checkpoint(ckpt)
    verify_file(ckpt, CONFIG)
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
    verify_file(ckpt, WEIGHTS)
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
    verify_file(ckpt, "tokenizer.json")
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
    verify_file(ckpt, TRAINER_STATE)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{path} is corrupt or truncated ({type(e).__name__})") from None
