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
bf16 on CPU compiles frozen (`freeze_weights`): weights become prepacked constants, every matmul
output goes through `mtp.model.unfused` so no prepacked matmul is fused with what follows it, and
the graphs are specialised on the model's weights and cache buffers, which are kept across decodes.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterator

import torch

from . import model as model_module
from .model import Attention, FeedForward, MTPModel, decode_linear, fused_linear, order_probe, row_block, unfused

# Distinct graphs one function may compile before torch.compile would fall back to eager
# (silently, by default): a benchmark meets several batch sizes, passes and cache lengths.
RECOMPILE_LIMIT = 64


class CompiledPasses:
    """torch.compile'd versions of the model's cached passes (unbound: the model is an argument)."""

    def __init__(self, freeze: bool = False) -> None:
        self.freeze = freeze

        def compiled(fn: Any) -> Any:
            # emulate_precision_casts: round to bf16 wherever eager does (inductor would keep fused
            # intermediates in fp32): without it, compiled bf16 greedy output differed from eager
            # on 9 of 12 prompts of small random models; with it, on none.
            graph = torch.compile(fn, fullgraph=True, dynamic=False, options={"emulate_precision_casts": True})
            if not freeze:
                return graph

            def frozen(*args: Any, **kwargs: Any) -> Any:
                # Graphs compile on their first call, under this setting (the `options` of
                # torch.compile do not reach it).
                model_module.FROZEN_TRACE = True
                try:
                    with torch._inductor.config.patch(freezing=True):
                        return graph(*args, **kwargs)
                finally:
                    model_module.FROZEN_TRACE = False
            return frozen

        self.trunk_and_heads = compiled(MTPModel._trunk_and_heads)
        self.later_heads = compiled(MTPModel._later_heads)
        self.cached_head = compiled(MTPModel._cached_head)
        self.unembed = compiled(MTPModel._unembed)


_passes: dict[bool, CompiledPasses] = {}


def compiled_passes(freeze: bool = False) -> CompiledPasses:
    if freeze not in _passes:
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)
        _passes[freeze] = CompiledPasses(freeze)
    return _passes[freeze]


# Per model: its weights' (id, version) when last decoded frozen, and whether frozen_rows_hold.
_weights_seen: "weakref.WeakKeyDictionary[MTPModel, tuple[tuple[tuple[int, int], ...], bool]]" = \
    weakref.WeakKeyDictionary()
_frozen_rows: dict[tuple[Any, ...], bool] = {}


def freeze_weights(model: MTPModel) -> bool:
    """Whether the graphs take the weights as constants (inductor's freezing: matmuls on weights
    prepacked once, about 1.4x faster for SmolLM2's bf16 weights on a CPU without AMX): bf16 on
    CPU, when `frozen_rows_hold` for this model's matmul shapes (fp32's prepacked kernels round
    rows of fewer than 4 differently, so fp32 stays unfrozen); the matmuls are kept apart from the
    ops after them (`mtp.model.unfused`), so the probed kernels are the ones used. Frozen graphs
    keep the weights they were compiled with: if this model's weights changed since (training
    between decodes), every compiled graph is dropped and compiles again."""
    params = list(model.parameters())
    if not params or params[0].device.type != "cpu" or params[0].dtype != torch.bfloat16:
        return False
    seen = tuple((id(p), p._version) for p in params)
    before = _weights_seen.get(model)
    if before is not None and before[0] == seen:  # decoded frozen before, same weights: no probe again
        return before[1]
    if before is not None and before[1]:  # its frozen graphs hold the old weights
        torch._dynamo.reset()
    _weights_seen[model] = (seen, frozen_rows_hold(model))
    return _weights_seen[model][1]


def _matmuls(model: MTPModel) -> dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor | None]]:
    """One (weight, bias) per distinct matmul shape of a cached pass: the fused q/k/v and w1/w3
    weights (`fused_linear`, as decoding stacks them) and every other linear."""
    groups: list[tuple[torch.nn.Module, list[torch.nn.Linear]]] = []
    fused: set[int] = set()  # linears that a fused weight stands in for while decoding
    for m in model.modules():
        parts = [m.wq, m.wk, m.wv] if isinstance(m, Attention) else \
            [m.w1, m.w3] if isinstance(m, FeedForward) and m.w3 is not None else None
        if parts is not None:
            groups.append((m, parts))
            fused.update(map(id, parts))
    groups += [(m, [m]) for m in model.modules() if isinstance(m, torch.nn.Linear) and id(m) not in fused]
    found: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor | None]] = {}
    for owner, parts in groups:
        key = (sum(p.out_features for p in parts), parts[0].in_features, parts[0].bias is None)
        if key not in found:  # stack only one weight per shape
            weight, bias, _ = fused_linear(owner, parts, keep=False)
            found[key] = (weight, bias)
    return found


class _Probe(torch.nn.Module):
    """F.linear of each weight on the first M rows of its input, for every M a pass may use."""

    def __init__(self, matmuls: list[tuple[torch.Tensor, torch.Tensor | None]], sizes: list[list[int]]) -> None:
        super().__init__()
        self.weights = torch.nn.ParameterList([torch.nn.Parameter(w, requires_grad=False) for w, _ in matmuls])
        self.biases = [b for _, b in matmuls]
        self.sizes = sizes

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [unfused(decode_linear(x[:m], w, b)) for w, b, x, ms in zip(self.weights, self.biases, xs, self.sizes)
                for m in ms]


@torch.no_grad()
def frozen_rows_hold(model: MTPModel) -> bool:
    """Whether frozen graphs compute every row of every matmul shape of this model bit for bit as
    eager F.linear does, for every row count a pass uses (`row_block`'s fewest..most): then
    `row_block`'s calibration, done on eager kernels, holds for the frozen ones and decoding stays
    batch-invariant. Inductor picks kernels by shape (prepacked oneDNN, or its own code for tiny
    matmuls: a 64 x 32 bf16 weight rounded 1- and 2-row products differently from eager, measured),
    so this compiles one graph of all of them with frozen weights (once per process and set of
    shapes: see README for its cost) and compares on inputs with a wide range of magnitudes, and
    on `order_probe`'s weights and inputs, which show any change of summation order."""
    matmuls = _matmuls(model)
    key = (tuple(sorted(matmuls)), torch.get_num_threads())
    if key not in _frozen_rows:
        pairs = list(matmuls.values())
        sizes = []
        for w, b in pairs:
            most, fewest, _ = row_block(w, b)
            sizes.append(list(range(fewest, most + 1)))
        g = torch.Generator().manual_seed(0)
        xs = []
        for (w, _), ms in zip(pairs, sizes):  # wide-range inputs, as `row_block` calibrates on
            shape = (max(ms), w.shape[1])
            xs.append((torch.randn(shape, generator=g) * torch.exp(2 * torch.randn(shape, generator=g))).to(w.dtype))
        for (w, b), ms in list(zip(pairs, sizes)):  # and inputs that show any change of summation order
            x, w_probe, b_probe = order_probe(w, b, max(ms), g)
            pairs.append((w_probe, b_probe))
            sizes.append(ms)
            xs.append(x)
        model_module.FROZEN_TRACE = True
        try:
            with torch._inductor.config.patch(freezing=True):
                got = torch.compile(_Probe(pairs, sizes), fullgraph=True, dynamic=False)(xs)
        finally:
            model_module.FROZEN_TRACE = False
        want = [decode_linear(x[:m], w, b) for (w, b), x, ms in zip(pairs, xs, sizes) for m in ms]
        _frozen_rows[key] = all(torch.equal(a, b) for a, b in zip(got, want))
    return _frozen_rows[key]


def is_compiled(model: Any) -> bool:
    """Whether the model's cached passes run compiled now (False for stand-ins without them)."""
    return getattr(model, "compiled", None) is not None


@contextlib.contextmanager
def compiled_decoding(model: MTPModel, on: bool = True) -> Iterator[None]:
    """Run the model's cached decoding passes compiled while inside (`on`), eager otherwise."""
    with _passes_set(model, compiled_passes(freeze_weights(model)) if on else None):
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
