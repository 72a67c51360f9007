"""Decoding with `torch.compile` (`--compile`): the cached forward passes of decoding (a greedy
step, a verify pass, the draft heads, the unembedding) run as compiled graphs.

Inside `compiled_decoding(model)`, `MTPModel.trunk_and_heads`, `later_heads`, `cached_head` and
`unembed` hand their cached calls to the graphs below; prefills stay eager (`eager`), as their
lengths vary with the prompts. The graphs are static: one per (function, batch, tokens per pass,
cache length) and never synchronise with the host. The one part whose shapes do depend on the
positions, attention over `key_length(position)` keys in groups of queries, is an opaque op
(`mtp::cached_attention`) running the eager code; so every compiled graph only sees
fixed shapes, and a token's logits in a greedy step and in a verify pass are computed by the same
kinds of kernels (row-blocked matmuls, one SDPA call per query) as in eager decoding.

Graphs are compiled on first use (tens of seconds each on two CPU cores: see README) and kept for
the process, for every model (the compiled code is shared; guards tell models and shapes apart).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from .model import MTPModel

# Distinct graphs one function may compile before torch.compile would fall back to eager
# (silently, by default): a benchmark meets several batch sizes, passes and cache lengths.
RECOMPILE_LIMIT = 64


class CompiledPasses:
    """torch.compile'd versions of the model's cached passes (unbound: the model is an argument)."""

    def __init__(self) -> None:
        def compiled(fn: Any) -> Any:
            # emulate_precision_casts: round to bf16 wherever eager does (inductor would keep fused
            # intermediates in fp32): without it, compiled bf16 greedy output differed from eager
            # on 9 of 12 prompts of small random models; with it, on none.
            return torch.compile(fn, fullgraph=True, dynamic=False, options={"emulate_precision_casts": True})

        self.trunk_and_heads = compiled(MTPModel._trunk_and_heads)
        self.later_heads = compiled(MTPModel._later_heads)
        self.cached_head = compiled(MTPModel._cached_head)
        self.unembed = compiled(MTPModel._unembed)


_passes: CompiledPasses | None = None


def compiled_passes() -> CompiledPasses:
    global _passes
    if _passes is None:
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)
        _passes = CompiledPasses()
    return _passes


def is_compiled(model: Any) -> bool:
    """Whether the model's cached passes run compiled now (False for stand-ins without them)."""
    return getattr(model, "compiled", None) is not None


@contextlib.contextmanager
def compiled_decoding(model: MTPModel, on: bool = True) -> Iterator[None]:
    """Run the model's cached decoding passes compiled while inside (`on`), eager otherwise."""
    with _passes_set(model, compiled_passes() if on else None):
        yield


def eager(model: MTPModel) -> contextlib.AbstractContextManager[None]:
    """Eager passes inside (prefills: their shapes follow the prompts)."""
    return _passes_set(model, None)


@contextlib.contextmanager
def _passes_set(model: MTPModel, passes: CompiledPasses | None) -> Iterator[None]:
    before = getattr(model, "compiled", None)
    if passes is None and before is None:  # nothing to switch (also: test stand-ins for a model)
        yield
        return
    model.compiled = passes
    try:
        yield
    finally:
        model.compiled = before
