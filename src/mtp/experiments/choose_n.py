"""Choosing n (paper 3.4): BPE code models with n in {1, 2, 4, 6, 8} at equal parameters:
next-token validation loss and self-speculative speedup vs n. Same pipeline as `bytes`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from . import bytes as byte_exp


def settings(scale: str) -> byte_exp.Settings:
    return byte_exp.settings(scale, tokenizer="bpe")


def run(out_dir: Path, scale: str = "default", seeds: Sequence[int] | None = None,
        command: str = "mtp experiment choose-n", overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    return byte_exp.run(out_dir, scale, seeds, command=command, tokenizer="bpe", overrides=overrides)
