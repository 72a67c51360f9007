"""The multi-token prediction model: a Llama-style trunk, n heads, one shared norm and unembedding.

Layout (parameter matched, as in the paper and the released checkpoints):

    tokens -> embedding -> trunk (n_layers - n_future blocks) -> z
    z -> head 1 .. head n (one block each by default) -> shared RMSNorm -> shared unembedding

GPT-2-style models (imported by mtp.interop.hf) set norm="layer", mlp="gelu", pos_emb="learned"
and bias=True: LayerNorm, a GELU MLP, a learned position table added to the token embedding, and
biases on every linear layer of the blocks. The defaults are the Llama-style model.

Head i predicts token t+i from position t. `forward` returns logits of shape (B, T, n_future, V);
the loss lives in `mtp.loss`. The KV cache is set up apart from building the model
(`setup_cache`) and covers the trunk and every head block.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .hardware import has_native_bf16

HEAD_TYPES = ("parallel", "linear", "causal", "anticausal", "sequential")
NORMS = ("rms", "layer")
MLPS = ("swiglu", "gelu")
POS_EMBS = ("rope", "learned")


class ConfigError(ValueError):
    """A model configuration that cannot work; the message is one line, meant for users."""


@dataclass
class ModelConfig:
    """Model shape. `n_layers` counts trunk blocks plus head blocks, so changing `n_future`
    keeps the parameter count (for transformer heads): the trunk has n_layers - n_future blocks."""

    dim: int = 128
    n_layers: int = 5
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: same as n_heads (no grouping)
    vocab_size: int = 8192
    n_future: int = 1
    head_type: str = "parallel"  # parallel | linear | causal | anticausal | sequential
    hidden_dim: int | None = None  # FFN width; None: Meta's rule from multiple_of/ffn_dim_multiplier
    multiple_of: int = 32
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    init_std: float = 0.02
    attn_bias: bool = False  # biases on the q/k/v projections (Qwen2-style); off for Llama/Meta models
    # GPT-2 style (see the module docstring); the defaults keep older config.json files loading as before.
    norm: str = "rms"  # rms | layer (LayerNorm with bias)
    mlp: str = "swiglu"  # swiglu | gelu (tanh-approximate GELU, two matrices)
    pos_emb: str = "rope"  # rope | learned (max_seq_len x dim table added to the token embedding)
    bias: bool = False  # biases on every linear layer inside the blocks
    # Draft heads 2..n score only this many tokens (MTPModel.draft_ids, e.g. the most frequent
    # ones), through a slice of the unembedding; head 1 always scores all. 0: the full vocabulary.
    draft_vocab: int = 0
    # Sequential heads 2..n as one module used at every depth (FastMTP): one block's weights
    # (the trunk keeps the others' layers), a KV cache per depth, and drafts deeper than n-1.
    shared_head: bool = False

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_future < 1:
            raise ConfigError(f"n_future must be >= 1, got {self.n_future}")
        if self.head_type not in HEAD_TYPES:
            raise ConfigError(f"head_type must be one of {', '.join(HEAD_TYPES)}, got {self.head_type!r}")
        if not isinstance(self.shared_head, bool):
            raise ConfigError(f"shared_head must be true or false, got {self.shared_head!r}")
        if self.shared_head and self.head_type != "sequential":
            raise ConfigError(f"shared_head shares one sequential head across depths; head_type is {self.head_type!r}, "
                              "use head_type='sequential'")
        if self.head_blocks > self.n_layers:
            raise ConfigError(
                f"n_future={self.n_future} heads need at least {self.head_blocks} layers, but n_layers={self.n_layers}"
            )
        if self.dim % self.n_heads:
            raise ConfigError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        for name, options in (("norm", NORMS), ("mlp", MLPS), ("pos_emb", POS_EMBS)):
            if getattr(self, name) not in options:
                raise ConfigError(f"{name} must be one of {', '.join(options)}, got {getattr(self, name)!r}")
        if not isinstance(self.bias, bool):
            raise ConfigError(f"bias must be true or false, got {self.bias!r}")
        if self.pos_emb == "rope" and (self.dim // self.n_heads) % 2:
            raise ConfigError(f"head dim {self.dim // self.n_heads} must be even for RoPE")
        if self.vocab_size < 1 or self.dim < 1 or self.n_layers < 1:
            raise ConfigError("dim, n_layers and vocab_size must be positive")
        if not 0 <= self.draft_vocab <= self.vocab_size:
            raise ConfigError(f"draft_vocab must be in [0, vocab_size={self.vocab_size}], got {self.draft_vocab}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def head_blocks(self) -> int:
        """Distinct transformer blocks in the heads: n_future, one with a shared sequential head
        beside head 1, none for linear heads (not blocks). The trunk gets the other layers."""
        return head_blocks(self.head_type, self.n_future, self.shared_head)

    @property
    def max_draft_depth(self) -> int:
        """Drafts one pass may chain: one per extra head, or with a shared sequential head as many
        as a verify pass holds (`MTPModel.extend_shared_head` adds the depths)."""
        return QUERY_SLACK if self.shared_head else self.n_future - 1

    @property
    def n_trunk(self) -> int:
        return self.n_layers - self.head_blocks

    @property
    def ffn_dim(self) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        if self.mlp == "gelu":  # GPT-2's rule; the rule below sizes SwiGLU's three matrices
            return 4 * self.dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def non_llama(self) -> str:
        """The GPT-2-style fields that differ from the Llama-style defaults, e.g. "norm='layer',
        bias=True" ("" for a Llama-style model): what Llama-only formats cannot represent."""
        defaults = {"norm": "rms", "mlp": "swiglu", "pos_emb": "rope", "bias": False}
        return ", ".join(f"{k}={getattr(self, k)!r}" for k, v in defaults.items() if getattr(self, k) != v)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named size (see `PRESETS`) with fields overridden, e.g. n_future=4, vocab_size=256."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - fields
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        return cls(**d)


def head_blocks(head_type: str, n_future: int, shared_head: bool = False) -> int:
    """See `ModelConfig.head_blocks` (also for configs not built yet)."""
    if head_type == "linear":
        return 0
    return min(n_future, 2) if shared_head else n_future


# Sizes of the n=1 model; asking for n_future=n keeps n_layers, moving n-1 blocks from trunk to heads.
# Paper Table S14 gives dim / layers / attention heads for 1M..7B; "tiny" is for tests and demos.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(dim=64, n_layers=6, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=512),
    # `make demo`: deep and narrow, so that a head block is a small part of a decoding step.
    "demo": dict(dim=128, n_layers=14, n_heads=4, n_kv_heads=2, vocab_size=1024, max_seq_len=512),
    "1M": dict(dim=128, n_layers=5, n_heads=4),
    "3M": dict(dim=256, n_layers=4, n_heads=8),
    "10M": dict(dim=384, n_layers=6, n_heads=8),
    "30M": dict(dim=512, n_layers=10, n_heads=8),
    "100M": dict(dim=768, n_layers=14, n_heads=12),
    "300M": dict(dim=1024, n_layers=25, n_heads=16),
    "1B": dict(dim=1536, n_layers=36, n_heads=24),
    "7B": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256, max_seq_len=4096),
}


# ----- batch-invariant kernels ------------------------------------------------------------------
# Decoding must give a token the same logits, bit for bit, whatever else is in the pass (other
# rows, draft tokens, tree nodes), or speculative output drifts from greedy output. A matmul
# library picks its kernel by the number of rows M, and kernels round differently. Measured on
# this CPU (torch 2.13, 20 weight shapes, 1 and 2 threads): bf16 rows are bitwise the same for
# every M up to 80 at most shapes but only up to 32 at 49152x576; fp32 rows change at a threshold
# that depends on K and the thread count (3 at K=64, 16 at K=576), and M = 1 (a gemv) rounds
# differently from M >= 2. So each weight shape is calibrated once (`row_block`): the largest
# block of rows, and the fewest rows, for which every row comes out the same; cached forwards
# cut matmuls into such blocks. SDPA rounds a query differently with other queries in the call
# (bf16: rarely, by one ulp; fp32: one query vs two), and with the number of keys (fp32, unless
# both are multiples of 512). So every query is alone in its (batch row, head) of the call (two
# copies of it in fp32; the queries of a verify pass become extra heads, see `fold_queries`),
# over a number of keys that depends on its position alone (`key_length`): a greedy step and a
# verify pass give a token at position p the same keys, and it is not charged for the whole
# cache (which an earlier version attended over, rounded up to 512 slots in fp32).
KEY_BUCKET = 32  # key lengths are multiples of this: few distinct lengths, so few SDPA calls per pass
QUERY_SLACK = 32  # slots a query may need past its position (tree nodes sit in slots base + node index)


def key_length(positions: Tensor) -> Tensor:
    """Cache slots attended by a query at each position: its own slot plus QUERY_SLACK, rounded
    up to KEY_BUCKET. A function of the position alone, hence the same in every kind of pass."""
    return (positions + QUERY_SLACK + KEY_BUCKET) // KEY_BUCKET * KEY_BUCKET


CAUSAL_TABLE_MAX = 2048  # longest cache whose causal masks are tabulated (16 MiB in fp32)
ROPE_CHUNK = 1024  # positions per chunk of the RoPE table (see MTPModel.rope_table)
ROW_BLOCKS = (64, 32, 16, 8, 4, 2, 1)  # candidate blocks, largest first; 1 (a call per row) always holds
CALIBRATION_TRIALS = 3  # random inputs per shape: whether two summation orders round alike depends on the data
_row_blocks: dict[tuple[Any, ...], tuple[int, int, bool]] = {}


def row_block(weight: Tensor, bias: Tensor | None = None) -> tuple[int, int, bool]:
    """(most, fewest, batched): rows per F.linear call with this weight for which each row's
    result does not depend on the call's other rows, and whether one batched matmul over blocks
    of `most` rows gives the same bits as a call per block (then blocks cost one call, not one
    each); measured once per shape, dtype, device and threads."""
    key = (weight.shape, weight.dtype, weight.device, bias is None, torch.get_num_threads())
    if key not in _row_blocks:
        _row_blocks[key] = _calibrate(weight, bias)
    return _row_blocks[key]


@torch.no_grad()
def _calibrate(weight: Tensor, bias: Tensor | None) -> tuple[int, int, bool]:
    if emulated_bf16(weight):  # computed in fp32 (`decode_linear`): the fp32 kernels' blocks
        most, fewest, _ = _calibrate(weight.float(), None if bias is None else bias.float())
        return most, fewest, False
    # Kernel choice depends on shapes, not values, but kernels that sum in a different order can
    # still round most rows alike (bf16 outputs of fp32 sums): SmolLM2's bf16 w2 gave the same
    # bits for one row alone and in a pair on 61 of 64 rows. So every row is compared, on several
    # inputs with a wide range of magnitudes (as real activations have), where the order shows,
    # and at every offset in a call: on an Ice Lake Xeon (no AVX512-BF16) a bf16 row rounded
    # differently at offset 7 of a 64-row call than at offset 22 of a 45-row call, while calls of
    # the first m rows all agreed with the 64-row call (session 9).
    g = torch.Generator().manual_seed(0)
    n, k = ROW_BLOCKS[0], weight.shape[1]
    # The first trial is built to show any change of summation order (`order_probe`); the rest
    # are realistic inputs with the real weight.
    trials = [order_probe(weight, bias, n, g)] + [
        ((torch.randn(n, k, generator=g) * torch.exp(2 * torch.randn(n, k, generator=g))).to(weight.device, weight.dtype),
         weight, bias) for _ in range(CALIBRATION_TRIALS)]
    calls: dict[tuple[int, int], Tensor] = {}  # (trial, m): F.linear of the first m rows
    alone: dict[tuple[int, int], Tensor] = {}  # (trial, fewest): each row in a call of `fewest` copies

    def holds(most: int, fewest: int) -> bool:
        """Every row of every call of fewest..most rows equals the row alone (in a call of
        `fewest` copies of it, as `_linear_blocks` pads): no row depends on its neighbours or place.
        Trials in turn, so a failing candidate costs little."""
        for t, (x, w, b) in enumerate(trials):
            if (t, fewest) not in alone:
                alone[t, fewest] = torch.cat([F.linear(x[i : i + 1].repeat(fewest, 1), w, b)[:1] for i in range(n)])
            for m in range(fewest, most + 1):
                if (t, m) not in calls:
                    calls[t, m] = F.linear(x[:m], w, b)
                if not torch.equal(calls[t, m], alone[t, fewest][:m]):
                    return False
        return True

    most, fewest = next((m, f) for m in ROW_BLOCKS for f in (1, 2) if f <= m and holds(m, f))  # (1, 1) holds
    # Several block counts (a kernel may be picked by the batch size too), each with a partial block.
    # CPU bmm in bf16/fp16 copies the broadcast weight once per block (measured: a 49152 x 576
    # unembedding copied 9 times for a 512-row prefill), so there one call per block is cheaper.
    batched = most > 1 and (weight.dtype == torch.float32 or weight.device.type != "cpu")
    for blocks in (1, 2, 3, 8):
        for rows, w, b in (order_probe(weight, bias, blocks * most + 1, g), (
                torch.randn(blocks * most + 1, weight.shape[1], generator=g).to(weight.device, weight.dtype),
                weight, bias)):
            batched = batched and torch.equal(_linear_blocks(rows, w, b, most, fewest),
                                              _batched_blocks(rows, w, b, most))
    return most, fewest, batched


def order_probe(weight: Tensor, bias: Tensor | None, n: int, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor | None]:
    """Inputs (n rows), a weight and a bias of `weight`'s shape, dtype and strides whose products
    are exact (entries +-1, a few inputs +-big) while the running sums are not: a sum reaches
    `big`, where adding +-1 rounds, so two summation orders give different results in almost
    every row instead of rarely. Kernels are chosen by shape, not values, so what this shows
    holds for the real weight. (Session 13: on an AMD EPYC with AVX512-BF16, a 64x64 bf16 weight
    rounded one row alone differently from rows in calls of 2 or more, which random inputs
    showed on 1 row in 1280 and greedy at batch 3 then left greedy alone.)"""
    acc = torch.float32 if weight.dtype in (torch.bfloat16, torch.float16) else weight.dtype
    big = min(4 / torch.finfo(acc).eps, torch.finfo(weight.dtype).max / (16 * weight.shape[1]))
    k = weight.shape[1]

    def signs(*shape: int) -> Tensor:
        return torch.randint(0, 2, shape, generator=g).to(torch.float64) * 2 - 1

    x = signs(n, k)
    x.scatter_(1, torch.randint(0, k, (n, 4), generator=g), signs(n, 4) * big)
    w = torch.empty_like(weight).copy_(signs(*weight.shape))  # empty_like keeps the strides
    b = None if bias is None else torch.empty_like(bias).copy_(signs(*bias.shape))
    return x.to(weight.device, weight.dtype), w, b


def emulated_bf16(weight: Tensor) -> bool:
    """A bf16 weight on a CPU without bf16 dot products (AVX512-BF16/AMX). There bf16 matmuls
    are emulated, and whether a row rounds alike in calls of other sizes depends on the data
    too rarely for any calibration to see: on an Ice Lake Xeon one of the 192 outputs of a
    3-row call differed from the same row at offset 7 of an 8-row call, and bf16 greedy at batch 8 left greedy alone (session 9).
    So decoding computes these in fp32 (`decode_linear`), whose row blocks are measured, and
    rounds the result to bf16."""
    global _native_bf16
    if _native_bf16 is None:  # read once (row_block runs before any compiled pass)
        _native_bf16 = has_native_bf16()
    return weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and not _native_bf16


_native_bf16: bool | None = None


def _fp32_copy(weight: Tensor) -> Tensor:
    """An fp32 copy of a weight, kept on the tensor until the weight changes (in place)."""
    if torch.compiler.is_compiling():
        return weight.float()
    kept = getattr(weight, "_mtp_fp32", None)
    if kept is None or kept[0] != weight._version:
        kept = (weight._version, weight.detach().float())
        weight._mtp_fp32 = kept  # type: ignore[attr-defined]
    return kept[1]


def decode_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """F.linear as decoding computes it: in fp32 for a bf16 weight where bf16 is emulated."""
    if emulated_bf16(weight):
        return F.linear(x.float(), _fp32_copy(weight), None if bias is None else bias.float()).to(weight.dtype)
    return F.linear(x, weight, bias)


def _linear_blocks(flat: Tensor, weight: Tensor, bias: Tensor | None, most: int, fewest: int) -> Tensor:
    """One F.linear call per block of `most` rows (a short last block padded to `fewest`)."""
    parts = []
    for start in range(0, flat.shape[0], most):
        part = flat[start : start + most]
        n = part.shape[0]
        if n < fewest:
            part = torch.cat([part] * fewest)
        parts.append(decode_linear(part, weight, bias)[:n])
    return parts[0] if len(parts) == 1 else torch.cat(parts)  # one block (a greedy step's lone row): no copy


def _batched_blocks(flat: Tensor, weight: Tensor, bias: Tensor | None, most: int) -> Tensor:
    """The blocks of `most` rows as one batched matmul (the weight broadcast, not copied); the
    last block is padded with copies of its last row. On CPUs whose fp32 rows are invariant only
    in pairs this is one call instead of M/2 (3x faster at 64 rows, measured)."""
    m = flat.shape[0]
    blocks = -(-m // most)
    if blocks * most > m:
        flat = torch.cat([flat, flat[-1:].expand(blocks * most - m, -1)])
    x = flat.view(blocks, most, -1)
    wt = weight.t().expand(blocks, -1, -1)
    out = torch.bmm(x, wt) if bias is None else torch.baddbmm(bias.expand(blocks, most, -1), x, wt)
    return out.reshape(blocks * most, -1)[:m]


def invariant_linear(x: Tensor, weight: Tensor, bias: Tensor | None,
                     blocks: tuple[int, int, bool] | None = None) -> Tensor:
    """F.linear computed in row blocks, so each output row is bitwise independent of the others.
    `blocks`: the weight's `row_block`, when already known (a compiled forward must not calibrate)."""
    most, fewest, batched = row_block(weight, bias) if blocks is None else blocks
    flat = x.reshape(-1, x.shape[-1])
    m = flat.shape[0]
    if fewest <= m <= most:
        return unfused(decode_linear(x, weight, bias))
    out = _batched_blocks(flat, weight, bias, most) if batched and m > most else \
        _linear_blocks(flat, weight, bias, most, fewest)
    return unfused(out.view(*x.shape[:-1], weight.shape[0]))


def unfused(y: Tensor) -> Tensor:
    """y, kept apart from the ops that follow in a frozen compiled graph: inductor would otherwise
    fuse a prepacked matmul with the add or activation after it (one rounding instead of two),
    whose rows `row_block` has not calibrated (measured: frozen spec1 left frozen greedy on 1 of
    4 SmolLM2 prompts). Elsewhere y itself."""
    if torch.compiler.is_compiling() and FROZEN_TRACE:
        return torch.ops.mtp.unfused(y)
    return y


FROZEN_TRACE = False  # set by mtp.compiled while frozen graphs run (and compile)

# The opaque ops of compiled decoding (`mtp::unfused`, `mtp::cached_attention`), declared with
# torch.library's low-level API: dispatching a call costs about 3 us, against 10 us through
# torch.library.custom_op's wrappers (measured, session 14), and a compiled step makes one call
# per matmul (frozen) and per layer.
_LIB = torch.library.Library("mtp", "DEF")


def _opaque_op(schema: str, fn: Callable[..., Tensor], fake: Callable[..., Tensor]) -> None:
    _LIB.define(schema)
    name = schema.split("(", 1)[0]
    _LIB.impl(name, fn, "CompositeExplicitAutograd")
    torch.library.register_fake(f"mtp::{name}", fake, lib=_LIB)


def _unfused_op(y: Tensor) -> Tensor:
    return y.clone()


_opaque_op("unfused(Tensor y) -> Tensor", _unfused_op, lambda y: torch.empty_like(y))


def attention_dtype(dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The dtype cached attention computes in: fp32 for a bf16/fp16 cache on a CPU, whose
    half-precision SDPA kernels are 2-3x slower than fp32 ones at decoding's shapes (measured,
    session 13: SmolLM2's 36 folded heads over 128 keys at batch 8, 2.2-2.7 ms a call in bf16,
    0.95 ms in fp32 with two copies per query); the cache's own dtype elsewhere. Every cached pass
    attends in this dtype, so a greedy step and a verify pass still round alike."""
    if dtype in (torch.bfloat16, torch.float16) and torch.device(device).type == "cpu":
        return torch.float32
    return dtype


def sdpa_queries(dtype: torch.dtype) -> int:
    """Queries per SDPA call: a lone fp32/fp64 query takes another kernel than two (measured on
    CPU), so those calls carry the query twice."""
    return 2 if dtype in (torch.float32, torch.float64) else 1


def fused_linear(owner: nn.Module, parts: Sequence[nn.Linear],
                 keep: bool) -> tuple[Tensor, Tensor | None, tuple[int, int, bool]]:
    """The weights (and biases) of `parts` stacked into one matmul, with its row_block. `keep`:
    the copy stays on `owner` after decoding and is reused while the weights are unchanged
    (frozen compiled graphs take it as a constant: a new copy per decode would recompile them);
    otherwise it is made anew and freed with the cache."""
    key = tuple((id(m.weight), m.weight._version) for m in parts)
    kept = owner.__dict__.get("_kept_fused")
    if kept is not None and kept[0] == key:
        return kept[1]
    bias = torch.cat([m.bias for m in parts]).detach() if parts[0].bias is not None else None  # type: ignore[misc]
    weight = torch.cat([m.weight for m in parts]).detach()
    fused = (weight, bias, row_block(weight, bias))
    if keep:  # an unfrozen decode leaves the kept copy alone (frozen graphs may come back to it)
        owner.__dict__["_kept_fused"] = (key, fused)
    return fused


class Linear(nn.Linear):
    """nn.Linear that switches to `invariant_linear` while the model decodes with its KV cache."""

    invariant = False
    blocks: tuple[int, int, bool] | None = None  # row_block of the weight, set with `invariant`

    def forward(self, x: Tensor) -> Tensor:
        if self.invariant:
            return invariant_linear(x, self.weight, self.bias, self.blocks)
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x / rms(x) * weight, normalised in fp32 and rounded to x's dtype before the weight (as Hugging
    Face Llama does). F.rms_norm is one call where the spelled-out form is six (small calls are what
    decoding a small model pays for); in fp32 it gives the same bits (checked in the tests)."""
    if x.dtype == weight.dtype == torch.float32 and weight.dim() == 1:  # (stacked draft weights broadcast)
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return F.rms_norm(x.float(), (x.shape[-1],), None, eps).type_as(x) * weight


def make_norm(cfg: ModelConfig) -> nn.Module:
    return RMSNorm(cfg.dim, cfg.norm_eps) if cfg.norm == "rms" else nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)


class Embedding(nn.Embedding):
    """The token embedding; with pos_emb="learned" also the position table `pos_weight`, added at
    each token's position. The table lives here rather than in a module of its own so that
    whatever owns the embedding (e.g. the trunk part in mtp.distributed) owns and syncs it too."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg.vocab_size, cfg.dim)
        learned = cfg.pos_emb == "learned"
        self.pos_weight = nn.Parameter(torch.empty(cfg.max_seq_len, cfg.dim)) if learned else None

    def forward(self, tokens: Tensor, positions: Tensor | None = None) -> Tensor:
        x = super().forward(tokens)
        if self.pos_weight is not None:
            x = x + F.embedding(positions, self.pos_weight)
        return x


def rope_tables(head_dim: int, positions: Tensor, theta: float) -> tuple[Tensor, Tensor]:
    """cos and signed sin for the half-rotation RoPE convention (as in Hugging Face Llama), shape
    (*pos, hd): sin's first half is negated, so that `apply_rope` rotates with one roll."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """x (B, S, H, hd), tables (B, S, hd) from `rope_tables`, broadcast over heads:
    x * cos + [x2, x1] * [-sin, sin], the same bits as x * cos + [-x2, x1] * sin in fewer ops."""
    x32 = x.float()
    rotated = x32.roll(x.shape[-1] // 2, dims=-1)
    return (x32 * cos[:, :, None, :] + rotated * signed_sin[:, :, None, :]).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.use_rope = cfg.pos_emb == "rope"  # learned positions enter once, at the embedding
        qkv_bias = cfg.attn_bias or cfg.bias
        self.wq = Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=qkv_bias)
        self.wk = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=qkv_bias)
        self.wv = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=qkv_bias)
        self.wo = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.bias)
        self.cache_k: Tensor | None = None  # (B, L, H_kv, hd), set by MTPModel.setup_cache
        self.cache_v: Tensor | None = None
        # [wq; wk; wv], its bias and its row_block while decoding (see `fuse`)
        self.fused: tuple[Tensor, Tensor | None, tuple[int, int, bool]] | None = None
        self.exact = True  # batch-invariant matmuls while decoding; off in heads that only draft

    def fuse(self, on: bool, keep: bool = False) -> None:
        """While decoding, q/k/v come from one matmul over the stacked weights (a copy): fewer,
        larger calls, which is what small-batch decoding on a CPU pays for. `keep`: see `fused_linear`."""
        self.fused = fused_linear(self, (self.wq, self.wk, self.wv), keep) if on else None

    def forward(self, x: Tensor, rope: tuple[Tensor, ...], ctx: "CacheContext | None") -> Tensor:
        B, S, _ = x.shape
        H, H_kv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        if self.fused is not None:
            qkv = invariant_linear(x, *self.fused) if self.exact else F.linear(x, *self.fused[:2])
            qk, v = qkv.reshape(B, S, H + 2 * H_kv, hd).split([H + H_kv, H_kv], dim=2)
            if self.use_rope:  # q and k side by side: one rotation (elementwise, so the same bits)
                qk = apply_rope(qk, *rope)
            q, k = qk.split([H, H_kv], dim=2)
        else:
            q = self.wq(x).reshape(B, S, H, hd)
            k = self.wk(x).reshape(B, S, H_kv, hd)
            v = self.wv(x).reshape(B, S, H_kv, hd)
            if self.use_rope:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if ctx is None:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads,
            )
        else:
            assert self.cache_k is not None and self.cache_v is not None, "call setup_cache() first"
            # Write this step's keys/values at each row's own slots, then attend over the first
            # key_length(position) slots (masked): numerics that do not depend on the pass.
            # Cached keys never carry gradients (decoding only; head caches may be views of one buffer).
            self.cache_k[ctx.rows, ctx.slots] = k.detach().to(self.cache_k.dtype)
            self.cache_v[ctx.rows, ctx.slots] = v.detach().to(self.cache_v.dtype)
            if ctx.dense:  # drafts: one call over the whole cache, masked
                rows = slice(0, B) if ctx.leading else ctx.rows[:, 0]
                at = ctx.bias.dtype  # `attention_dtype`
                out = F.scaled_dot_product_attention(
                    q.transpose(1, 2).to(at), self.cache_k[rows].transpose(1, 2).to(at),
                    self.cache_v[rows].transpose(1, 2).to(at), attn_mask=ctx.bias,
                    enable_gqa=self.n_kv_heads != self.n_heads).to(q.dtype)
            else:
                out = self.cached_attention(q, ctx).view(B, H, S, hd)
        return self.wo(out.transpose(1, 2).reshape(B, S, -1))

    def cached_attention(self, q: Tensor, ctx: "CacheContext") -> Tensor:
        """Attention of queries q (B, S, H, hd) over the cache, (B, H * S, hd) (see `fold_queries`,
        `key_length` and `grouped_attention`). Without precomputed groups (a compiled forward,
        which must not sync with the host) the grouping happens inside the opaque op
        `mtp::cached_attention`."""
        assert self.cache_k is not None and self.cache_v is not None
        if ctx.groups is None:
            assert ctx.lengths is not None
            return torch.ops.mtp.cached_attention(q, self.cache_k, self.cache_v, ctx.bias, ctx.lengths,
                                                  ctx.rows[:, 0], ctx.leading, ctx.masked)
        rows = slice(0, q.shape[0]) if ctx.leading else ctx.rows[:, 0]
        out = grouped_attention(q, self.cache_k, self.cache_v, ctx.groups, rows)
        if ctx.reordered is not None and self.exact:
            attend_reordered(q, out, self.cache_k, self.cache_v, ctx.reordered)
        return out


def fold_queries(q: Tensor, copies: int) -> Tensor:
    """Queries (B, S, H, hd) as (B, H * S, copies, hd): the S queries of a row become extra heads,
    query s of head h at h * S + s, so grouped-query attention still gives it head h's keys, and
    each is alone in its (row, head) of an SDPA call, as in a greedy step, without a copy of the
    row's keys per query. `copies` of each query: see `sdpa_queries`. SDPA gives a (row, head)
    the same bits however many rows and heads share the call (measured: fp32 and bf16, 4/2 and
    9/3 heads, 32..1024 keys)."""
    B, S, H, hd = q.shape
    return q.transpose(1, 2).reshape(B, H * S, 1, hd).expand(-1, -1, copies, -1).contiguous()


def fold_mask(bias: Tensor, heads: int) -> Tensor:
    """Per-query masks (B, S, copies, L) laid out as `fold_queries` lays out the queries: (B, 1,
    copies, L), broadcast over heads, when S == 1; else (B, heads * S, copies, L), a copy."""
    B, S, copies, L = bias.shape
    if S == 1:
        return bias
    return bias[:, None].expand(B, heads, S, copies, L).reshape(B, heads * S, copies, L)


# A group of queries that share a key length: (input rows holding any of them, or None for every
# row; which of those rows' queries (R, S) are in the group, or None for all; key length; the
# group's mask, laid out for `fold_queries`).
KeyGroup = tuple[Tensor | None, Tensor | None, int, Tensor]


def key_groups(lengths: Tensor, bias: Tensor, heads: int) -> list[KeyGroup]:
    """Queries grouped by key length (lengths (B, S), masks bias (B, S, copies, L)); in the usual
    case one group, every row, nothing to gather. Host syncs: the distinct lengths and their rows."""
    lo, hi = lengths.aminmax()
    if bool(lo == hi):  # the usual case: every query needs the same keys
        n = int(lo)
        return [(None, None, n, fold_mask(bias[..., :n], heads).contiguous())]
    groups: list[KeyGroup] = []
    for n in lengths.unique().tolist():
        hit = lengths == n
        index = hit.any(1).nonzero().squeeze(1)
        take = hit[index]
        groups.append((index, None if bool(take.all()) else take, n,
                       fold_mask(bias[index, ..., :n], heads).contiguous()))
    return groups


def grouped_attention(q: Tensor, cache_k: Tensor, cache_v: Tensor, groups: Sequence[KeyGroup],
                      rows: slice | Tensor) -> Tensor:
    """Queries q (B, S, H, hd) over the cache rows `rows`: one SDPA call per group of queries that
    share a key length (`key_groups`), each query alone in its (row, head) (`fold_queries`),
    (B, H * S, hd). A row whose queries need different lengths joins several calls; each keeps
    the queries of its own length. The masks are contiguous, as a greedy step's are."""
    B, S, H, _ = q.shape
    at = groups[0][3].dtype  # the masks' dtype is the one attention computes in (`attention_dtype`)
    folded = fold_queries(q.to(at), groups[0][3].shape[2])
    gqa = cache_k.shape[2] != folded.shape[1]

    def attend(q_rows: Tensor, cache_rows: slice | Tensor, length: int, mask: Tensor) -> Tensor:
        def read(cache: Tensor) -> Tensor:  # index_select: 3x faster than [] for a row gather here
            part = cache[cache_rows, :length] if isinstance(cache_rows, slice) else \
                cache[:, :length].index_select(0, cache_rows)
            return part.transpose(1, 2).to(at)
        return F.scaled_dot_product_attention(q_rows, read(cache_k), read(cache_v), attn_mask=mask,
                                              enable_gqa=gqa)[:, :, 0]

    if len(groups) == 1 and groups[0][0] is None:  # every row, every query, the same keys
        _, _, length, mask = groups[0]
        return attend(folded, rows, length, mask).to(q.dtype).contiguous()
    out = folded.new_empty(B, H * S, folded.shape[3])
    for index, take, length, mask in groups:
        # The same ops whether a group holds every row or some (a query must not round
        # differently because another one, elsewhere in the pass, needs more keys).
        assert index is not None  # only a lone group covers every row without an index
        res = attend(folded[index], index if isinstance(rows, slice) else rows[index], length, mask)
        if take is not None:  # keep only this length's queries; the rows' others come from their own groups
            keep = take[:, None, :, None].expand(-1, H, -1, -1).reshape(len(index), H * S, 1)
            res = torch.where(keep, res, out[index])
        out[index] = res
    return out.to(q.dtype)


Reordered = list[tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]


def reordered_queries(mask: Tensor, lengths: Tensor, rows: Tensor, dtype: torch.dtype) -> Reordered | None:
    """`CacheContext.reordered` for queries with masks (B, S, cache_len) and key lengths (B, S)
    on cache rows `rows` (B,), masks in `dtype`; None when every query sees slots 0..p. Host syncs."""
    count = mask.sum(-1)  # slots each query sees; greedy decoding gives a query at p slots 0..p
    prefix = torch.arange(mask.shape[-1], device=mask.device) < count[..., None]
    off = (mask != prefix).any(-1)
    if not bool(off.any()):
        return None
    b, s = off.nonzero(as_tuple=True)
    order = torch.sort((~mask[b, s]).to(torch.int8), dim=-1, stable=True).indices  # seen slots first, ascending
    bias = torch.zeros(prefix[b, s].shape, dtype=dtype, device=mask.device).masked_fill_(~prefix[b, s], float("-inf"))
    bias = bias[:, None, None].expand(-1, -1, sdpa_queries(dtype), -1)
    groups = []
    for n in lengths[b, s].unique().tolist():
        hit = (lengths[b, s] == n).nonzero().squeeze(1)
        groups.append((b[hit], s[hit], rows[b[hit]], order[hit, :n], bias[hit, ..., :n].contiguous()))
    return groups


def attend_reordered(q: Tensor, out: Tensor, cache_k: Tensor, cache_v: Tensor, groups: Reordered) -> None:
    """Recompute into out (B, H * S, hd) the queries of `groups` (`reordered_queries`), each over
    its cache row's keys gathered in the order it sees them (what a greedy step of its token
    reads: its keys in slots 0..p), one SDPA call per key length, each query alone in its row."""
    B, S, H, hd = q.shape
    view = out.view(B, H, S, hd)
    for b, s, cache_rows, where, bias in groups:
        at = bias.dtype

        def read(cache: Tensor) -> Tensor:
            return cache[cache_rows[:, None], where].transpose(1, 2).to(at)  # (Q, kv heads, n, hd)
        qq = q[b, s].to(at)[:, :, None].expand(-1, -1, bias.shape[2], -1).contiguous()
        res = F.scaled_dot_product_attention(qq, read(cache_k), read(cache_v), attn_mask=bias,
                                             enable_gqa=cache_k.shape[2] != H)[:, :, 0]
        view[b, :, s] = res.to(out.dtype)


def _cached_attention_op(q: Tensor, cache_k: Tensor, cache_v: Tensor, bias: Tensor, lengths: Tensor,
                         rows: Tensor, leading: bool, masked: bool) -> Tensor:
    """`grouped_attention` with the grouping done here, at run time: a compiled forward keeps its
    shapes static (the keys attended vary with the positions) and never syncs with the host."""
    out = grouped_attention(q, cache_k, cache_v, key_groups(lengths, bias, q.shape[2]),
                            slice(0, rows.shape[0]) if leading else rows)
    if masked:  # a pass with explicit masks (a tree's) may have queries off the top-1 chain
        groups = reordered_queries(bias[:, :, 0] == 0, lengths, rows, bias.dtype)
        if groups is not None:
            attend_reordered(q, out, cache_k, cache_v, groups)
    return out


def _cached_attention_fake(q: Tensor, cache_k: Tensor, cache_v: Tensor, bias: Tensor, lengths: Tensor,
                           rows: Tensor, leading: bool, masked: bool) -> Tensor:
    B, S, H, hd = q.shape
    return q.new_empty(B, H * S, hd)


_opaque_op("cached_attention(Tensor q, Tensor cache_k, Tensor cache_v, Tensor bias, Tensor lengths, Tensor rows, "
           "bool leading, bool masked) -> Tensor", _cached_attention_op, _cached_attention_fake)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); or GPT-2's GELU MLP (mlp="gelu"): w2(gelu(w1 x)), no w3."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w1 = Linear(cfg.dim, cfg.ffn_dim, bias=cfg.bias)
        self.w2 = Linear(cfg.ffn_dim, cfg.dim, bias=cfg.bias)
        self.w3 = Linear(cfg.dim, cfg.ffn_dim, bias=cfg.bias) if cfg.mlp == "swiglu" else None
        self.fused: tuple[Tensor, Tensor | None, tuple[int, int, bool]] | None = None  # [w1; w3] while decoding
        self.exact = True  # as Attention.exact

    def fuse(self, on: bool, keep: bool = False) -> None:
        """As Attention.fuse: w1 and w3 as one matmul while decoding."""
        self.fused = fused_linear(self, (self.w1, self.w3), keep) if on and self.w3 is not None else None

    def forward(self, x: Tensor) -> Tensor:
        if self.w3 is None:
            return self.w2(F.gelu(self.w1(x), approximate="tanh"))  # GPT-2's gelu_new
        if self.fused is not None:
            ab = invariant_linear(x, *self.fused) if self.exact else F.linear(x, *self.fused[:2])
            a, b = ab.chunk(2, dim=-1)
            return self.w2(F.silu(a) * b)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = make_norm(cfg)
        self.attention = Attention(cfg)
        self.ffn_norm = make_norm(cfg)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: Tensor, rope: tuple[Tensor, ...], ctx: "CacheContext | None" = None) -> Tensor:
        x = x + self.attention(self.attention_norm(x), rope, ctx)
        return x + self.feed_forward(self.ffn_norm(x))


class SequentialHead(nn.Module):
    """A DeepSeek-V3-style MTP module, head i >= 2 of head_type="sequential": at position t it reads
    head i-1's output h and the embedding e of token x_{t+i-1} (the shared input embedding),
    RMS-norms each, projects [e; h] from 2 dim to dim and runs one block; the shared norm and
    unembedding then predict x_{t+i}. Knowing the token before its target is what lets it draft
    far better than a parallel head, which must guess x_{t+i} without knowing x_{t+i-1}. The
    names (enorm, hnorm, eh_proj, and the [e; h] order) follow DeepSeek-V3's checkpoints."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.enorm = make_norm(cfg)
        self.hnorm = make_norm(cfg)
        self.eh_proj = Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.block = Block(cfg)

    def forward(self, h: Tensor, emb: Tensor, rope: tuple[Tensor, ...], ctx: "CacheContext | None" = None) -> Tensor:
        return self.block(self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1)), rope, ctx)


class LinearHead(nn.Module):
    """The paper's linear-head alternative: one dim x dim map per head, no attention."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.proj = Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: Tensor, rope: tuple[Tensor, ...], ctx: "CacheContext | None" = None) -> Tensor:
        return self.proj(x)


@dataclass
class CacheContext:
    """Where a cached forward reads and writes: per-row slots, and which cache slots each query sees."""

    rows: Tensor  # (B, 1) cache row of each input row, broadcast against slots
    slots: Tensor  # (B, S) cache slot written by each input token
    # Which slots each query sees, as an additive mask (0 / -inf) in the cache's dtype, made once
    # per pass for every layer: (B, S, sdpa_queries, cache_len).
    bias: Tensor
    # Queries grouped by their number of keys (`key_length`), with their masks, made once per
    # pass (`key_groups`): one SDPA call per group and layer. None in a compiled forward: the
    # attention op groups `lengths` (B, S) itself.
    groups: list[KeyGroup] | None = None
    lengths: Tensor | None = None
    leading: bool = True  # rows are 0..B-1, so reads can slice the cache instead of gathering
    # Heads that only draft need no batch invariance (head 1 decides what is kept): one SDPA call
    # over every cache slot, bias (B, 1, S, cache_len), no groups.
    dense: bool = False
    # Queries whose visible slots are not 0..p (tree nodes off the top-1 chain: their ancestors'
    # keys sit in other slots than greedy decoding gives those tokens), grouped by key length n
    # once per pass: (their input rows, their indices in the pass, their cache rows, the n slots
    # each reads in order: the ones it sees ascending, then others (Q, n), masks as a greedy step's
    # (Q, 1, sdpa_queries, n)). `Attention.cached_attention` recomputes them over keys gathered in
    # that order, so each finds its keys where greedy would: SDPA sums in slot order, and a key in
    # another slot rounds differently (measured). None when every query sees 0..p, and in a
    # compiled forward.
    reordered: "Reordered | None" = None
    masked: bool = False  # the pass came with explicit masks (a tree's), not the causal ones


def causal_cache_mask(positions: Tensor, kv_len: int) -> Tensor:
    """Each query at position p sees cache slots 0..p (slot == position for chain decoding).
    Slots past p may hold stale keys from rejected drafts; the mask hides them."""
    slots = torch.arange(kv_len, device=positions.device)
    return slots[None, None, :] <= positions[:, :, None]


class DraftStack:
    """Parallel draft heads 2..n run as one: each head's weights stacked along a leading dim, so
    every projection is one batched matmul instead of n-1 (the heads share their input z).

    Built by `MTPModel.setup_cache` from the head blocks' current weights (a copy, dropped by
    `clear_cache`); the heads' KV caches are views into one stacked buffer, so the per-head path
    and this one read and write the same keys. Drafts only propose tokens (head 1 decides what is
    kept), so these batched kernels need not round like the per-head ones."""

    def __init__(self, heads: Sequence[Block], cfg: ModelConfig, cache_shape: tuple[int, ...],
                 dtype: torch.dtype, device: torch.device | str) -> None:
        def stacked(get: Callable[[Block], Tensor]) -> Tensor:  # weights are copied, never trained
            return torch.stack([get(h).detach() for h in heads])

        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.eps = cfg.norm_eps
        self.attn_norm = stacked(lambda h: h.attention_norm.weight)[:, None]  # (H, 1, dim)
        self.ffn_norm = stacked(lambda h: h.ffn_norm.weight)[:, None]
        a = [h.attention for h in heads]
        f = [h.feed_forward for h in heads]
        self.wqkv = torch.stack([torch.cat([x.wq.weight, x.wk.weight, x.wv.weight]).t() for x in a]).detach()
        self.wo = torch.stack([x.wo.weight.t() for x in a]).detach()
        self.w13 = torch.stack([torch.cat([x.w1.weight, x.w3.weight]).t() for x in f]).detach()  # type: ignore[union-attr]
        self.w2 = torch.stack([x.w2.weight.t() for x in f]).detach()
        self.ffn_dim = cfg.ffn_dim
        self.cache_k = torch.zeros((len(heads), *cache_shape), dtype=dtype, device=device)
        self.cache_v = torch.zeros_like(self.cache_k)
        self.views = [(self.cache_k[i], self.cache_v[i]) for i in range(len(heads))]
        self.attach(a)

    def attach(self, attentions: Sequence["Attention"]) -> None:
        """Point the heads' own caches at this stack's buffer (the same view objects every time:
        frozen compiled graphs are specialised on them)."""
        for x, (k, v) in zip(attentions, self.views):
            x.cache_k, x.cache_v = k, v

    @staticmethod
    def supports(cfg: ModelConfig) -> bool:
        return (cfg.head_type == "parallel" and cfg.n_future > 2 and cfg.norm == "rms" and cfg.mlp == "swiglu"
                and not cfg.bias and not cfg.attn_bias and cfg.pos_emb == "rope")

    def _norm(self, x: Tensor, weight: Tensor) -> Tensor:
        return rms_norm(x, weight, self.eps)

    def __call__(self, z: Tensor, rope: tuple[Tensor, ...], ctx: CacheContext) -> Tensor:
        """Hidden states (B, S, H, dim) of the stacked heads on trunk outputs z (B, S, dim)."""
        B, S, dim = z.shape
        H, nh, nkv, hd = self.cache_k.shape[0], self.n_heads, self.n_kv_heads, self.head_dim
        x = z.reshape(1, B * S, dim)
        qkv = torch.matmul(self._norm(x, self.attn_norm), self.wqkv)  # (H, B*S, (nh + 2 nkv) hd)
        q, k, v = qkv.view(H, B, S, nh + 2 * nkv, hd).split([nh, nkv, nkv], dim=3)
        cos, sin = (t.expand(H, -1, -1, -1).reshape(H * B, S, hd) for t in rope)  # (B, S, hd) per head
        q, k = (apply_rope(t.reshape(H * B, S, -1, hd), cos, sin) for t in (q, k))
        self.cache_k[:, ctx.rows, ctx.slots] = k.view(H, B, S, nkv, hd).to(self.cache_k.dtype)
        self.cache_v[:, ctx.rows, ctx.slots] = v.to(self.cache_v.dtype)
        rows = slice(0, B) if ctx.leading else ctx.rows[:, 0]
        L = self.cache_k.shape[2]
        at = ctx.bias.dtype  # `attention_dtype`
        keys = self.cache_k[:, rows].reshape(H * B, L, nkv, hd).transpose(1, 2).to(at)
        values = self.cache_v[:, rows].reshape(H * B, L, nkv, hd).transpose(1, 2).to(at)
        mask = ctx.bias.reshape(1, B, 1, S, L).expand(H, -1, -1, -1, -1).reshape(H * B, 1, S, L)  # dense (drafts)
        out = F.scaled_dot_product_attention(q.transpose(1, 2).to(at), keys, values, attn_mask=mask,
                                             enable_gqa=nkv != nh).to(q.dtype)  # (H*B, nh, S, hd)
        h = x + torch.matmul(out.transpose(1, 2).reshape(H, B * S, nh * hd), self.wo)
        w1x, w3x = torch.matmul(self._norm(h, self.ffn_norm), self.w13).split(self.ffn_dim, dim=-1)
        h = h + torch.matmul(F.silu(w1x) * w3x, self.w2)
        return h.view(H, B, S, dim).permute(1, 2, 0, 3)


def tie_parameters(dst: nn.Module, src: nn.Module) -> None:
    """Make dst (a module of src's structure) use src's parameters, the same tensors; dst keeps
    its own caches, so one set of weights runs at several depths."""
    for (name, _), p in zip(list(dst.named_parameters()), list(src.parameters())):
        owner, _, leaf = name.rpartition(".")
        setattr(dst.get_submodule(owner), leaf, p)


_SHARED = re.compile(r"heads\.([0-9]+)\.")


def _drop_shared_heads(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state if (m := _SHARED.match(k, len(prefix))) and int(m[1]) >= 2]:
        del state[key]


def _fill_shared_heads(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
    head = prefix + "heads.1."
    shared = {k[len(head):]: v for k, v in state.items() if k.startswith(head)}
    for i in range(2, len(module.heads)):  # type: ignore[arg-type]
        state.update({f"{prefix}heads.{i}.{k}": v for k, v in shared.items()})


def _retie_shared_head(module: nn.Module, incompatible_keys: Any) -> None:
    module.tie_shared_head()  # type: ignore[operator]  # load_state_dict(assign=True) gives each head its own


class MTPModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = Embedding(cfg)
        self.trunk_layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_trunk))
        head_cls = LinearHead if cfg.head_type == "linear" else Block
        later_cls = SequentialHead if cfg.head_type == "sequential" else head_cls
        self.heads = nn.ModuleList(head_cls(cfg) if i == 0 else later_cls(cfg) for i in range(cfg.n_future))
        if cfg.shared_head:
            self.tie_shared_head()
            # Saved once, as heads.1: heads 3..n are left out of state_dict and filled in on load.
            self.register_state_dict_post_hook(_drop_shared_heads)
            self.register_load_state_dict_pre_hook(_fill_shared_heads)
            self.register_load_state_dict_post_hook(_retie_shared_head)
        self.norm = make_norm(cfg)
        self.output = Linear(cfg.dim, cfg.vocab_size, bias=False)
        # The draft vocabulary: a buffer (saved with the weights) of cfg.draft_vocab token ids, set
        # by `set_draft_vocab`; None without one.
        if cfg.draft_vocab:
            self.register_buffer("draft_ids", torch.arange(cfg.draft_vocab))
        else:
            self.draft_ids: Tensor | None = None
        self._draft_rows: tuple[Any, Tensor] | None = None  # (key, output rows of draft_ids), decoding
        self.cache_batch = 0
        self.cache_len = 0
        self.draft_stack: DraftStack | None = None  # set by setup_cache for parallel heads
        self.causal_bias: Tensor | None = None  # (cache_len, cache_len) masks by position, set by setup_cache
        self.attn_dtype = torch.float32  # what cached attention computes in (`attention_dtype`)
        # While decoding with --compile: the torch.compile'd passes (mtp.compiled.CompiledPasses),
        # which the cached methods below hand their decoding calls to; None otherwise.
        self.compiled: Any = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):  # linear and LayerNorm biases
                nn.init.zeros_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                # Residual-branch outputs scaled down with depth, as in GPT-2.
                nn.init.normal_(p, std=std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, std=std)

    # ----- structure of the heads -------------------------------------------------------------
    def drafts_only(self, i: int) -> bool:
        """Head i (0-based) only proposes drafts: it never feeds head 1, which decides what is
        kept (anticausal heads do), so its decoding passes need no batch invariance."""
        return i >= 1 and self.cfg.head_type != "anticausal"

    def tie_shared_head(self) -> None:
        """With a shared sequential head: heads 3.. use heads.1's parameters (the same tensors)."""
        for head in list(self.heads)[2:]:
            tie_parameters(head, self.heads[1])

    def extend_shared_head(self, depth: int) -> None:
        """With a shared sequential head: heads at least up to 1 + `depth`, the new ones tied to
        heads.1 (no new weights, each with its own KV cache), for drafting deeper than trained.
        cfg.n_future, the heads trained and saved, is unchanged. Call before `setup_cache`."""
        if not self.cfg.shared_head:
            raise ConfigError("only a model with shared_head=true can draft deeper than its heads")
        while len(self.heads) < depth + 1:
            head = SequentialHead(self.cfg).to(self.heads[1].eh_proj.weight.device)
            tie_parameters(head, self.heads[1])
            self.heads.append(head)

    def head_parent(self, i: int) -> int:
        """Index of the head whose output feeds head i (0-based), or -1 for the trunk output."""
        if self.cfg.head_type in ("causal", "sequential"):
            return i - 1
        if self.cfg.head_type == "anticausal":
            return i + 1 if i + 1 < self.cfg.n_future else -1
        return -1

    def head_order(self) -> list[int]:
        """Heads in an order where each head's parent comes first (with a shared head, the depths
        `extend_shared_head` added too)."""
        n = len(self.heads)
        return list(range(n - 1, -1, -1)) if self.cfg.head_type == "anticausal" else list(range(n))

    # ----- forward pieces (used by the memory-efficient loss and by decoding) ----------------
    def rope(self, positions: Tensor) -> tuple[Tensor, ...]:
        """What the trunk and every block get about positions: RoPE's (cos, sin), looked up in a
        table (`rope_table`), or with learned positions just (positions,), which `trunk` looks up
        in the position table."""
        if self.cfg.pos_emb == "learned":
            return (positions,)
        hd = self.cfg.head_dim
        table = self.__dict__.get("_rope_table")
        if torch.compiler.is_compiling():  # setup_cache built it; a graph must not build or resize it
            if table is None or table.device != positions.device:
                return rope_tables(hd, positions, self.cfg.rope_theta)
        else:  # uncached passes take positions 0..T-1 ((B, T)); cached ones at most the cache plus a block
            table = self.rope_table(max(positions.shape[-1], self.cache_len + 2 * QUERY_SLACK), positions.device)
        both = F.embedding(positions, table)
        return both[..., :hd], both[..., hd:]

    def rope_table(self, length: int, device: torch.device | str) -> Tensor:
        """RoPE's cos and signed sin for positions 0..n-1 (n >= length), (n, 2 head_dim), fp32: one
        lookup per pass instead of computing them (about ten small calls). Built in chunks of
        ROPE_CHUNK positions, each computed alike, so a position's values never depend on how
        long the table is (a vectorised cos may round a tail of a call unlike its body: measured
        for head_dim 8)."""
        table = self.__dict__.get("_rope_table")
        device = torch.device(device)
        if table is None or table.shape[0] < length or table.device != device:
            n = -(-max(length, 1) // ROPE_CHUNK) * ROPE_CHUNK
            chunks = [torch.cat(rope_tables(self.cfg.head_dim, torch.arange(i, i + ROPE_CHUNK, device=device),
                                            self.cfg.rope_theta), dim=-1) for i in range(0, n, ROPE_CHUNK)]
            table = self.__dict__["_rope_table"] = torch.cat(chunks)
        return table

    def default_positions(self, tokens: Tensor) -> Tensor:
        B, T = tokens.shape
        return torch.arange(T, device=tokens.device).expand(B, T)

    def trunk(self, tokens: Tensor, rope: tuple[Tensor, ...], ctx: CacheContext | None = None) -> Tensor:
        x = self.tok_embeddings(tokens, rope[0] if self.cfg.pos_emb == "learned" else None)
        for layer in self.trunk_layers:
            x = layer(x, rope, ctx)
        return x

    def ahead_embedding(self, tokens: Tensor, i: int) -> Tensor:
        """Embeddings (B, T, dim) of x_{t+i} at every position t of tokens (B, T), the token that
        sequential head i+1 reads (0-based i); past the end, token 0 (those positions have no
        target: see `align_targets(sequential=True)`; decoding feeds its drafts instead)."""
        ahead = F.pad(tokens[:, i:], (0, min(i, tokens.shape[1])), value=0)
        return F.embedding(ahead, self.tok_embeddings.weight)

    def run_head(self, i: int, x: Tensor, rope: tuple[Tensor, ...], ctx: CacheContext | None = None,
                 tokens: Tensor | None = None, emb: Tensor | None = None) -> Tensor:
        """Head i (0-based) on its parent's output x; a sequential head also reads the embedding
        `emb` of the tokens i ahead (default: taken from `tokens`, see `ahead_embedding`)."""
        head = self.heads[i]
        if isinstance(head, SequentialHead):
            if emb is None:
                if tokens is None:
                    raise ValueError("sequential heads read the tokens ahead: pass tokens or emb")
                emb = self.ahead_embedding(tokens, i)
            return head(x, emb, rope, ctx)
        return head(x, rope, ctx)

    def cached_head(self, i: int, x: Tensor, emb: Tensor | None, input_pos: Tensor, slots: Tensor,
                    rows: Tensor | None = None) -> Tensor:
        """Head i (0-based) alone, with the KV cache, on its input x (B, S, dim) at input_pos
        (B, S) writing `slots` (causal mask); `emb`: the tokens ahead, for a sequential head.
        What drafters call between verify passes."""
        if self.compiled is not None and rows is None:
            return self.compiled.cached_head(self, i, x, emb, input_pos, slots)
        return self._cached_head(i, x, emb, input_pos, slots, rows)

    def _cached_head(self, i: int, x: Tensor, emb: Tensor | None, input_pos: Tensor, slots: Tensor,
                     rows: Tensor | None = None) -> Tensor:
        ctx = self.cache_context(x[..., 0], input_pos, slots, None, rows, dense=self.drafts_only(i))
        return self.run_head(i, x, self.rope(input_pos), ctx, emb=emb)

    def head_hidden(self, z: Tensor, rope: tuple[Tensor, ...], ctx: CacheContext | None = None,
                    heads: int | None = None, done: Sequence[Tensor] = (),
                    tokens: Tensor | None = None) -> list[Tensor]:
        """Hidden states (before the shared norm) of the first `heads` heads, in head order 1..n.
        `done`: outputs of heads 1..len(done), already computed on the same inputs (not with
        anticausal heads, whose head 1 comes last). `tokens`: the input tokens (sequential heads)."""
        n = self.cfg.n_future if heads is None else heads
        if done and self.cfg.head_type == "anticausal":
            raise ValueError("anticausal heads compute head 1 last: no heads can be done before the others")
        outs: dict[int, Tensor] = dict(enumerate(done))
        for i in self.head_order():
            parent = self.head_parent(i)
            if self.cfg.head_type != "anticausal" and i >= n:
                break
            if i not in outs:
                outs[i] = self.run_head(i, z if parent < 0 else outs[parent], rope, ctx, tokens)
        return [outs[i] for i in range(n)]

    def unembed(self, h: Tensor) -> Tensor:
        if self.compiled is not None:
            return self.compiled.unembed(self, h)
        return self._unembed(h)

    def _unembed(self, h: Tensor) -> Tensor:
        return self.output(self.norm(h))

    # ----- draft vocabulary -------------------------------------------------------------------
    def set_draft_vocab(self, ids: Sequence[int] | Tensor | None) -> None:
        """Let heads 2..n score only the tokens `ids` (stored sorted; cfg.draft_vocab = their
        number); None: every head scores the full vocabulary again."""
        if ids is None:
            if "draft_ids" in self._buffers:
                del self._buffers["draft_ids"]
            self.draft_ids = None
            self.cfg.draft_vocab = 0
        else:
            t = torch.as_tensor(ids, dtype=torch.long).flatten()
            sorted_ids = t.unique(sorted=True)
            if len(sorted_ids) != len(t) or len(t) == 0:
                raise ConfigError("the draft vocabulary needs distinct token ids, at least one")
            if int(sorted_ids[0]) < 0 or int(sorted_ids[-1]) >= self.cfg.vocab_size:
                raise ConfigError(f"draft vocabulary ids must lie in [0, {self.cfg.vocab_size})")
            sorted_ids = sorted_ids.to(self.output.weight.device)
            if "draft_ids" in self._buffers:
                self._buffers["draft_ids"] = sorted_ids
            else:
                del self.draft_ids
                self.register_buffer("draft_ids", sorted_ids)
            self.cfg.draft_vocab = len(sorted_ids)
        self._draft_rows = None

    def draft_weight(self) -> Tensor:
        """The unembedding's rows of the draft vocabulary (K, dim). With gradients on it is a
        slice in the autograd graph (training); otherwise a copy, kept until the weights change."""
        assert self.draft_ids is not None
        w = self.output.weight
        if torch.is_grad_enabled() and w.requires_grad:
            return w[self.draft_ids]
        key = (w.data_ptr(), w._version, w.dtype, w.device, self.draft_ids.data_ptr(), self.draft_ids._version)
        if self._draft_rows is None or self._draft_rows[0] != key:
            self._draft_rows = (key, w.detach()[self.draft_ids])
        return self._draft_rows[1]

    def draft_logits(self, h: Tensor) -> Tensor:
        """Logits (..., K) of draft-head outputs h (..., dim) over the draft vocabulary: column j
        scores token draft_ids[j] (the shared norm, then a K-row slice of the unembedding, K/V of
        its cost). Without a draft vocabulary: `unembed(h)` (K = V, column j is token j)."""
        if self.draft_ids is None:
            return self.unembed(h)
        return F.linear(self.norm(h), self.draft_weight())

    def draft_unembed(self, h: Tensor) -> Tensor:
        """Logits (..., V) of draft-head outputs h (..., dim) over the full vocabulary, -inf
        outside the draft vocabulary (so an argmax or a sample is always a draft token); equal to
        `unembed(h)` without one. For speculative sampling, softmax of these is the draft
        distribution q (zero outside the draft vocabulary)."""
        if self.draft_ids is None:
            # Eager: one plain matmul (drafts need no batch invariance); compiled: its graph.
            return self.unembed(h) if self.compiled is not None else F.linear(self.norm(h), self.output.weight)
        small = self.draft_logits(h)  # eager (also when compiled): the draft rows are cached by address
        out = small.new_full((*small.shape[:-1], self.cfg.vocab_size), float("-inf"))
        return out.index_copy_(-1, self.draft_ids, small)

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None, *, slots: Tensor | None = None,
                mask: Tensor | None = None, heads: int | None = None, rows: Tensor | None = None) -> Tensor:
        """Logits (B, T, heads, V). Without `input_pos` this is a plain causal forward.

        With `input_pos` (B, T) the KV cache is used: token (b, t) sits at position input_pos[b, t]
        (RoPE or learned), writes cache slot slots[b, t] (default: its position) and attends to the
        slots where mask[b, t] is True (default: slots <= its position). Trees pass both. Input row
        b uses cache row rows[b] (default: b); continuous batching prefills a new prompt into one row.
        """
        return self.unembed(self.hidden(tokens, input_pos, slots=slots, mask=mask, heads=heads, rows=rows))

    def hidden(self, tokens: Tensor, input_pos: Tensor | None = None, *, slots: Tensor | None = None,
               mask: Tensor | None = None, heads: int | None = None, rows: Tensor | None = None) -> Tensor:
        """The heads' outputs before the shared norm and unembedding, (B, T, heads, dim); same
        arguments as `forward`. Decoding uses it to unembed only the rows it needs."""
        return self.trunk_and_heads(tokens, input_pos, slots=slots, mask=mask, heads=heads, rows=rows)[1]

    def trunk_and_heads(self, tokens: Tensor, input_pos: Tensor | None = None, *, slots: Tensor | None = None,
                        mask: Tensor | None = None, heads: int | None = None,
                        rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """`hidden` plus the trunk output z (B, T, dim) it started from."""
        if self.compiled is not None and input_pos is not None and rows is None:
            return self.compiled.trunk_and_heads(self, tokens, input_pos, slots, mask, heads)
        return self._trunk_and_heads(tokens, input_pos, slots, mask, heads, rows)

    def _trunk_and_heads(self, tokens: Tensor, input_pos: Tensor | None, slots: Tensor | None,
                         mask: Tensor | None, heads: int | None, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if input_pos is None:
            if tokens.shape[1] > self.cfg.max_seq_len:
                raise ConfigError(f"sequence of {tokens.shape[1]} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
            rope = self.rope(self.default_positions(tokens))
            ctx = None
        else:
            input_pos = input_pos.expand(tokens.shape) if input_pos.dim() == 1 else input_pos
            ctx = self.cache_context(tokens, input_pos, slots, mask, rows)
            rope = self.rope(input_pos)
        z = self.trunk(tokens, rope, ctx)
        return z, torch.stack(self.head_hidden(z, rope, ctx, heads, tokens=tokens), dim=2)

    def later_heads(self, z: Tensor, done: Sequence[Tensor], input_pos: Tensor, heads: int,
                    slots: Tensor | None = None, rows: Tensor | None = None) -> Tensor:
        """Cached forward of heads len(done)+1..heads on trunk outputs z (B, T, dim) already
        computed at input_pos (causal mask), given the earlier heads' outputs `done`; returns
        (B, T, heads - len(done), dim). Speculative decoding verifies with head 1 at every draft
        node and runs the draft heads afterwards on the accepted tokens only. `rows` (B,): the
        cache rows of z's rows (default 0..B-1; eager only)."""
        if self.compiled is not None and rows is None:
            return self.compiled.later_heads(self, z, list(done), input_pos, heads, slots)
        return self._later_heads(z, done, input_pos, heads, slots, rows)

    def _later_heads(self, z: Tensor, done: Sequence[Tensor], input_pos: Tensor, heads: int,
                     slots: Tensor | None = None, rows: Tensor | None = None) -> Tensor:
        ctx = self.cache_context(z[..., 0], input_pos, slots, None, rows, dense=self.drafts_only(len(done)))
        if self.draft_stack is not None and len(done) == 1 and heads == self.cfg.n_future:
            return self.draft_stack(z, self.rope(input_pos), ctx)
        outs = self.head_hidden(z, self.rope(input_pos), ctx, heads, done)
        return torch.stack(outs[len(done):], dim=2)

    # ----- KV cache ---------------------------------------------------------------------------
    def setup_cache(self, max_batch: int, max_len: int, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> None:
        """Allocate key/value buffers for the trunk and every head block, for `max_len` positions
        (and the slots past the last one that its queries read, see `key_length`), and switch the
        matmuls to batch-invariant row blocks (see `invariant_linear`) until `clear_cache`."""
        if max_len > self.cfg.max_seq_len:
            raise ConfigError(f"cache length {max_len} exceeds max_seq_len={self.cfg.max_seq_len}")
        param = next(self.parameters())
        dtype = dtype or param.dtype
        device = device or param.device
        length = int(key_length(torch.tensor(max(max_len, 1) - 1)))
        # Frozen compiled graphs are specialised on the cache buffers themselves: those stay
        # allocated after decoding and are reused while long enough (stale slots are masked, as
        # within a decode; a query reads key_length(position) slots whatever the cache's length,
        # so a longer cache computes the same), and grow by powers of two, so prompts of other
        # lengths do not recompile.
        frozen = getattr(self.compiled, "freeze", False)
        kept = next((m.__dict__.get("_kept_cache") for m in self.modules() if isinstance(m, Attention)), None)
        if frozen and kept is not None and kept[0].shape[0] == max_batch and kept[0].shape[1] >= length:
            length = kept[0].shape[1]
        elif frozen:
            length = min(1 << (length - 1).bit_length(), int(key_length(torch.tensor(self.cfg.max_seq_len - 1))))
        shape = (max_batch, length, self.cfg.n_kv_heads, self.cfg.head_dim)
        for m in self.modules():
            if isinstance(m, Attention):
                kept = m.__dict__.get("_kept_cache")
                if frozen and kept is not None and kept[0].shape == shape and kept[0].dtype == dtype \
                        and kept[0].device == torch.device(device):
                    m.cache_k, m.cache_v = kept
                else:
                    m.cache_k = torch.zeros(shape, dtype=dtype, device=device)
                    m.cache_v = torch.zeros(shape, dtype=dtype, device=device)
                if frozen:
                    m.__dict__["_kept_cache"] = (m.cache_k, m.cache_v)
        self.draft_stack = None
        self.attn_dtype = attention_dtype(dtype, device)
        if self.cfg.pos_emb == "rope":  # every position a pass can reach, before any compiled pass
            self.rope_table(length + 2 * QUERY_SLACK, device)
        # Row p: the additive causal mask of a query at position p (0 for slots <= p, else -inf);
        # eager passes look their masks up here (one call instead of five). Positions past the
        # cache see every slot: the last row.
        self.causal_bias = torch.full((length, length), float("-inf"), dtype=self.attn_dtype, device=device).triu_(1) \
            if length <= CAUSAL_TABLE_MAX else None
        if DraftStack.supports(self.cfg):
            heads = list(self.heads)[1:]
            key = (tuple((id(p), p._version) for h in heads for p in h.parameters()), shape, dtype, str(device))
            kept = self.__dict__.get("_kept_stack")
            if frozen and kept is not None and kept[0] == key:  # as the caches above
                self.draft_stack = kept[1]
                self.draft_stack.attach([h.attention for h in heads])  # type: ignore[union-attr]
            else:
                self.draft_stack = DraftStack(heads, self.cfg, shape, dtype, device)  # type: ignore[arg-type]
            if frozen:
                self.__dict__["_kept_stack"] = (key, self.draft_stack)
        self.set_invariant(True, keep_fused=frozen)
        self.cache_batch, self.cache_len = max_batch, length
        if self.compiled is not None and not frozen:  # compiled passes: one graph for every cache length
            for m in self.modules():
                if isinstance(m, Attention):
                    torch._dynamo.mark_dynamic(m.cache_k, 1)
                    torch._dynamo.mark_dynamic(m.cache_v, 1)
            if self.draft_stack is not None:
                torch._dynamo.mark_dynamic(self.draft_stack.cache_k, 2)
                torch._dynamo.mark_dynamic(self.draft_stack.cache_v, 2)

    def clear_cache(self) -> None:
        for m in self.modules():
            if isinstance(m, Attention):
                m.cache_k = m.cache_v = None
        self.draft_stack = None
        self.causal_bias = None
        self.set_invariant(False)
        self.cache_batch = self.cache_len = 0

    def set_invariant(self, on: bool, keep_fused: bool = False) -> None:
        """Batch-invariant matmuls (slower for many rows) and fused q/k/v and w1/w3 weights (a
        copy of those weights, kept after decoding if `keep_fused`) on or off; on while a cache
        is set up."""
        fused: set[int] = set()  # linears that the fused q/k/v and w1/w3 weights stand in for
        for m in self.modules():
            if isinstance(m, (Attention, FeedForward)):
                m.fuse(on, keep_fused)
                if m.fused is not None:
                    parts = (m.wq, m.wk, m.wv) if isinstance(m, Attention) else (m.w1, m.w3)
                    fused.update(map(id, parts))
        drafting = {id(m) for i, head in enumerate(self.heads) if self.drafts_only(i) for m in head.modules()}
        for m in self.modules():
            if isinstance(m, Linear):
                # Each weight's row blocks measured now (once per shape), not inside a forward.
                m.invariant = on and id(m) not in drafting
                m.blocks = row_block(m.weight, m.bias) if m.invariant and id(m) not in fused else None
            elif isinstance(m, (Attention, FeedForward)):
                m.exact = id(m) not in drafting

    def cache_context(self, tokens: Tensor, input_pos: Tensor, slots: Tensor | None,
                      mask: Tensor | None, rows: Tensor | None = None, dense: bool = False) -> CacheContext:
        """Where a cached pass reads and writes; `dense`: for heads that only draft (see CacheContext)."""
        B, S = tokens.shape
        if torch.compiler.is_compiling():
            # The cache length from the cache itself, a dynamic size (see setup_cache): a compiled
            # pass neither checks nor specialises on the ints (the eager passes before it checked).
            kv_len = next(m for m in self.modules() if isinstance(m, Attention)).cache_k.shape[1]  # type: ignore[union-attr]
        else:
            kv_len = self.cache_len
            if self.cache_len == 0:  # clear_cache() resets it too
                raise ConfigError("KV cache not set up: call model.setup_cache(max_batch, max_len) first")
            if B > self.cache_batch:
                raise ConfigError(f"batch of {B} exceeds the cache's max_batch={self.cache_batch}")
        # No checks of slot values here (indexing past the cache raises anyway); the one host
        # sync per pass is the grouping of queries by key length below.
        slots = input_pos if slots is None else slots
        if mask is not None and mask.shape[-1] != kv_len:
            raise ConfigError(f"mask covers {mask.shape[-1]} cache slots, the cache has {kv_len}")
        leading = rows is None
        rows = torch.arange(B, device=tokens.device) if rows is None else rows
        explicit = mask is not None  # a tree's masks; the causal ones are made below
        if mask is None and not torch.compiler.is_compiling() and self.causal_bias is not None:  # (a graph never reads it)
            bias = F.embedding(input_pos.clamp(max=kv_len - 1), self.causal_bias)
        else:
            mask = causal_cache_mask(input_pos, kv_len) if mask is None else mask
            bias = torch.zeros(mask.shape, dtype=self.attn_dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        if dense:
            return CacheContext(rows=rows[:, None], slots=slots, bias=bias[:, None], leading=leading, dense=True)
        bias = bias[:, :, None].expand(-1, -1, sdpa_queries(self.attn_dtype), -1)
        # Host syncs once per pass (not per layer): which queries share a key length. Positions
        # past the cache (padding of finished rows) are capped; no real token gets there. A
        # compiled forward leaves the grouping to the attention op (once per layer).
        lengths = key_length(input_pos).clamp(max=kv_len)
        groups = None if torch.compiler.is_compiling() else key_groups(lengths, bias, self.cfg.n_heads)
        reordered = None if not explicit or torch.compiler.is_compiling() else \
            reordered_queries(mask, lengths, rows, self.attn_dtype)
        return CacheContext(rows=rows[:, None], slots=slots, bias=bias, groups=groups, lengths=lengths,
                            leading=leading, reordered=reordered, masked=explicit)

    def cache_move(self, rows: Tensor, src: Tensor, dst: Tensor) -> None:
        """Copy cached keys/values from slots `src` to slots `dst` (both (B, K)) for rows (B, 1):
        compacts an accepted tree path into consecutive slots."""
        for m in self.modules():
            if isinstance(m, Attention) and m.cache_k is not None:
                m.cache_k[rows, dst] = m.cache_k[rows, src].clone()
                m.cache_v[rows, dst] = m.cache_v[rows, src].clone()

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_embeddings.weight.numel() + self.output.weight.numel()
            if self.tok_embeddings.pos_weight is not None:
                n -= self.tok_embeddings.pos_weight.numel()
        return n
