"""Pieces shared by the Meta and Hugging Face converters: errors, lazy model building, checks."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from ..model import Block, ConfigError, ModelConfig, MTPModel


class InteropError(ValueError):
    """A foreign checkpoint that cannot be converted; one line naming the file and field."""


def require_dir(directory: str | Path, what: str) -> Path:
    path = Path(directory).expanduser()
    if not path.exists():
        raise InteropError(f"{path} does not exist")
    if not path.is_dir():
        raise InteropError(f"{path} is not a directory ({what} checkpoints are directories)")
    return path


def make_config(source: Path, **fields: Any) -> ModelConfig:
    try:
        return ModelConfig(**fields)
    except ConfigError as e:
        raise InteropError(f"{source}: {e}") from None


def assign_state(cfg: ModelConfig, state: Mapping[str, Tensor], source: Path,
                 rename: Callable[[str], str] = str, config_name: str = "the config") -> MTPModel:
    """An MTPModel whose parameters *are* the given tensors (no copy), after checking names and shapes.

    The model is built on the meta device so that a large checkpoint never exists twice in
    memory; `rename` maps our parameter names to the file's, for error messages.
    """
    with torch.device("meta"):
        model = MTPModel(cfg)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise InteropError(f"{source}: missing tensor {rename(missing[0])}"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = [k for k in state if k not in expected]
    if extra:
        raise InteropError(f"{source}: unexpected tensor {rename(extra[0])} for this config")
    for k, t in state.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise InteropError(f"{source}: {rename(k)} has shape {tuple(t.shape)}, "
                               f"{config_name} implies {tuple(expected[k].shape)}")
    dtypes = {t.dtype for t in state.values()}
    if len(dtypes) > 1:  # mixed files: settle on the widest float type so the model is uniform
        wide = max(dtypes, key=lambda d: torch.finfo(d).bits if d.is_floating_point else 0)
        state = {k: t.to(wide) for k, t in state.items()}
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()


def random_block(cfg: ModelConfig, like: Tensor) -> dict[str, Tensor]:
    """Freshly initialised block parameters (MTPModel.reset_parameters' rule), dtype of `like`."""
    with torch.device("meta"):  # only the names and shapes are needed
        block = Block(cfg)
    std = cfg.init_std
    out: dict[str, Tensor] = {}
    for name, p in block.named_parameters():
        t = torch.empty(p.shape, dtype=torch.float32)
        if name.endswith("norm.weight"):
            nn.init.ones_(t)
        elif name.endswith(".bias"):
            nn.init.zeros_(t)
        elif name.endswith(("wo.weight", "w2.weight")):
            nn.init.normal_(t, std=std / math.sqrt(2 * cfg.n_layers))
        else:
            nn.init.normal_(t, std=std)
        out[name] = t.to(like.dtype)
    return out


def check_vocab(tokenizer: Any | None, vocab_size: int, source: Path) -> None:
    if tokenizer is not None and tokenizer.vocab_size > vocab_size:
        raise InteropError(f"{source}: the tokenizer has {tokenizer.vocab_size} tokens but the weights "
                           f"only {vocab_size} (vocab_size mismatch)")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or an InteropError naming the file."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InteropError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise InteropError(f"{path} must hold a JSON object")
    return data
