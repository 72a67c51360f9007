"""Choosing n (paper 3.4): BPE code models with n in {1, 2, 4, 6, 8} at equal parameters:
next-token validation loss and self-speculative speedup vs n. Same pipeline as `bytes`."""

from __future__ import annotations

from . import bytes as byte_exp


def settings(scale: str) -> byte_exp.Settings:
    return byte_exp.settings(scale, tokenizer="bpe")


run = byte_exp.run  # the same pipeline; settings() picks the BPE tokenizer
