"""Autoregressive decoding with the KV cache: sampling, prefill, one-token steps and `generate`.

Batches hold prompts of different lengths, right-padded. Every row keeps its own position: the
row's newest token sits at cache slot == its position, so rows never wait for one another and a
finished row simply stops growing (it still rides along in the batch, its outputs ignored), or,
with continuous batching (`batch_size` below the number of prompts), takes the next prompt: its
prompt is prefilled into that cache row alone, and the old keys past it are never visible.

Context budget: a row may generate until prompt + generated tokens fill `max_seq_len`. The last
generated token is never fed back, so the highest slot a row writes is prompt + limit - 2 and the
cache's last slot stays free; decoders use it as a scratch slot for padding inputs (see
`scratch_slots`), which keeps every write inside the cache without touching live keys.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Collection, Sequence

import torch
from torch import Tensor

from .compiled import compiled_decoding, eager
from .hardware import has_native_bf16
from .model import Attention, MTPModel

TokenCallback = Callable[[list[list[int]]], None]
# Prefill runs in chunks so that at most this many logits (batch x chunk x heads x vocab) exist.
PREFILL_LOGITS_BUDGET = 1 << 26
PAD_ID = 0  # any valid id: padded positions are never attended to by real tokens


class GenerationError(ValueError):
    """A decoding request that cannot run; the message is one line, meant for users."""


@dataclass
class GenerationResult:
    """Generated tokens per prompt (prompt excluded) and how many model passes they took."""

    tokens: list[list[int]]
    forwards: int  # model passes: the prefill (counted once however it is chunked) + decode steps
    row_forwards: list[int]  # passes during which each row was still generating
    stop_reasons: list[str]  # per row: "stop" (emitted a stop token) or "length"

    @property
    def tokens_per_forward(self) -> float:
        """Generated tokens per pass a row took part in; exactly 1.0 for plain decoding."""
        passes = sum(self.row_forwards)
        return sum(map(len, self.tokens)) / passes if passes else 0.0


# ----- sampling ---------------------------------------------------------------------------------
def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise GenerationError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise GenerationError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise GenerationError(f"top_p must be in (0, 1], got {top_p}")


def sampling_probs(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None) -> Tensor:
    """The distribution `sample_next` draws from, shape like `logits` (..., V).

    temperature == 0 gives a one-hot at the argmax, so speculative sampling reduces to greedy."""
    if temperature == 0:
        return torch.zeros_like(logits, dtype=torch.float).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    scaled = logits.float() / temperature
    if top_k is not None and top_k < scaled.shape[-1]:
        kept = scaled.topk(top_k, dim=-1).indices
        scaled = torch.full_like(scaled, float("-inf")).scatter(-1, kept, scaled.gather(-1, kept))
    probs = scaled.softmax(-1)
    if top_p is not None and top_p < 1.0:
        probs = _nucleus(probs, top_p)
    return probs


def _nucleus(probs: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (at least one)."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_p.cumsum(-1) - sorted_p
    sorted_p = sorted_p.masked_fill(mass_before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return kept / kept.sum(-1, keepdim=True)


def greedy_token(logits: Tensor) -> Tensor:
    """argmax over the last dim (first on ties). Half-precision logits on a CPU are compared in
    fp32: the same values and the same first maximum, but torch's bf16 argmax there is scalar
    (0.71 ms for 8 x 49152 logits against 0.19 ms converted, measured in session 14)."""
    if logits.dtype in (torch.bfloat16, torch.float16) and logits.device.type == "cpu":
        logits = logits.float()
    return logits.argmax(-1)


def sample_next(logits: Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Next token ids (B,) from logits (B, V); greedy (argmax, first on ties) when temperature == 0."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return greedy_token(logits)
    probs = sampling_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A seeded generator, or None to use torch's global RNG."""
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


# ----- dtype ------------------------------------------------------------------------------------
DECODE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def decode_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The dtype for `--dtype NAME`: fp32, bf16, or auto (bf16 on CUDA and on CPUs with bf16 dot
    products, AVX512-BF16 or AMX: measured on an AVX512-BF16 EPYC, SmolLM2 greedy ran at 26.1 tok/s
    in bf16 against 9.5 in fp32, once bf16 caches were attended in fp32 (session 13);
    fp32 elsewhere). Decoding is batch-invariant, so speculative output equals greedy in both."""
    if name == "auto":
        if torch.device(device).type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if has_native_bf16() else torch.float32
    if name not in DECODE_DTYPES:
        raise GenerationError(f"dtype must be auto, fp32 or bf16, got {name!r}")
    return DECODE_DTYPES[name]


# ----- request checks ---------------------------------------------------------------------------
def check_prompts(model: MTPModel, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """Raise GenerationError (one line) for requests the model cannot serve."""
    cfg = model.cfg
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if len(prompts) == 0:
        raise GenerationError("no prompts given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerationError(f"prompt {i} is empty; give at least one token (e.g. a BOS id)")
        if len(p) > cfg.max_seq_len:
            raise GenerationError(
                f"prompt {i} has {len(p)} tokens, longer than the model's context of {cfg.max_seq_len}")
        low, high = min(p), max(p)
        if low < 0 or high >= cfg.vocab_size:
            bad = low if low < 0 else high
            raise GenerationError(f"prompt {i} has token id {bad} outside the vocabulary [0, {cfg.vocab_size})")


def token_limits(model: MTPModel, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[int]:
    """Tokens each row may generate: max_new_tokens, cut so prompt + output fits the context."""
    return [max(0, min(max_new_tokens, model.cfg.max_seq_len - len(p))) for p in prompts]


def cache_length(prompts: Sequence[Sequence[int]], limits: Sequence[int], slack: int = 0,
                 max_seq_len: int | None = None) -> int:
    """Cache slots needed: the prompts, every row's output, one scratch slot, plus optional slack
    (room for draft blocks), capped at the context."""
    need = max(len(p) + n for p, n in zip(prompts, limits)) + slack
    return need if max_seq_len is None else min(need, max_seq_len)


def kv_cache_bytes(model: MTPModel, batch: int, length: int, dtype: torch.dtype) -> int:
    """Bytes of keys + values for every attention block (trunk and transformer heads)."""
    cfg = model.cfg
    blocks = sum(isinstance(m, Attention) for m in model.modules())  # a shared head has one per depth
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * blocks * batch * length * cfg.n_kv_heads * cfg.head_dim * itemsize


def available_memory_bytes() -> int | None:
    """Free RAM as the OS reports it (Linux MemAvailable), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def setup_decode_cache(model: MTPModel, batch: int, length: int) -> None:
    """(Re)allocate the model's KV cache for this request, failing early if it cannot fit."""
    param = next(model.parameters())
    need = kv_cache_bytes(model, batch, length, param.dtype)
    free = available_memory_bytes() if param.device.type == "cpu" else None
    if free is not None and need > 0.9 * free:
        raise GenerationError(
            f"a batch of {batch} x {length} positions needs {need / 2**30:.2f} GiB of KV cache, "
            f"but only {free / 2**30:.2f} GiB of memory is free; use a smaller batch")
    model.clear_cache()  # free the old buffers before allocating, not after
    model.setup_cache(batch, length)


# ----- decoding steps ---------------------------------------------------------------------------
def pad_prompts(prompts: Sequence[Sequence[int]], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Right-padded tokens (B, T) and prompt lengths (B,)."""
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    tokens = torch.full((len(prompts), int(lengths.max())), PAD_ID, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long, device=device)
    return tokens, lengths


def prefill(model: MTPModel, tokens: Tensor, lengths: Tensor, *, heads: int = 1,
            chunk_size: int | None = None, rows: Tensor | None = None) -> Tensor:
    """Fill the KV cache with right-padded prompts (B, T), into cache rows `rows` (default
    0..B-1); logits (B, heads, V) at each row's last prompt token. Runs in chunks of positions so
    the full (B, T, heads, V) logits never exist; padding writes slots past a row's prompt, which
    the row overwrites before it reads them."""
    B, T = tokens.shape
    if chunk_size is None:
        chunk_size = max(1, PREFILL_LOGITS_BUDGET // (B * heads * model.cfg.vocab_size))
    last = lengths.to(tokens.device) - 1
    out: Tensor | None = None
    for start in range(0, T, chunk_size):
        stop = min(T, start + chunk_size)
        positions = torch.arange(start, stop, device=tokens.device).expand(B, -1)
        with eager(model):  # never compiled: the lengths vary with the prompts
            logits = model(tokens[:, start:stop], positions, heads=heads, rows=rows)
        if out is None:
            out = logits.new_empty(B, heads, logits.shape[-1])
        ends = ((last >= start) & (last < stop)).nonzero().squeeze(-1)  # rows whose prompt ends here
        out[ends] = logits[ends, last[ends] - start]
    assert out is not None
    return out


def decode_one(model: MTPModel, tokens: Tensor, positions: Tensor, *, slots: Tensor | None = None,
               heads: int = 1) -> Tensor:
    """One cached step: tokens (B,) at positions (B,) -> logits (B, heads, V)."""
    slots = None if slots is None else slots[:, None]
    return model(tokens[:, None], positions[:, None], slots=slots, heads=heads)[:, 0]


def scratch_slots(slots: Tensor, cache_len: int) -> Tensor:
    """Send writes that would fall past the cache to its last slot, which no live token uses
    (see the module docstring); only padding inputs of finished or nearly finished rows go there."""
    return slots.clamp(max=cache_len - 1)


# ----- per-row bookkeeping ----------------------------------------------------------------------
class RowState:
    """What every decoder tracks: each request's output, token budget, stop reason and passes, and
    which request each batch row serves. With fewer rows than requests (continuous batching) a
    row whose request finished takes the next one (`refill`). Methods taking `r` index batch rows."""

    def __init__(self, prompts: Sequence[Sequence[int]], limits: Sequence[int],
                 stop_tokens: Collection[int], batch_size: int | None = None) -> None:
        self.prompts = [list(p) for p in prompts]
        self.prompt_lens = [len(p) for p in prompts]
        self.limits = list(limits)
        self.stop = frozenset(int(t) for t in stop_tokens)
        self.out: list[list[int]] = [[] for _ in prompts]
        self.reasons = ["length" if n == 0 else "" for n in self.limits]
        self.row_forwards = [0] * len(prompts)
        self.forwards = 0
        if batch_size is not None and batch_size < 1:
            raise GenerationError(f"batch_size must be >= 1, got {batch_size}")
        rows = len(prompts) if batch_size is None else min(batch_size, len(prompts))
        self.request = list(range(rows))  # request served by each batch row
        self.queued = rows  # next request to start

    @property
    def batch(self) -> int:
        return len(self.request)

    def is_active(self, r: int) -> bool:
        return not self.reasons[self.request[r]]

    def active_rows(self) -> list[int]:
        return [r for r in range(self.batch) if self.is_active(r)]

    def remaining(self, r: int) -> int:
        """Tokens row r may still emit (0 once finished)."""
        q = self.request[r]
        return 0 if self.reasons[q] else self.limits[q] - len(self.out[q])

    def pending_position(self, r: int) -> int:
        """Position of row r's newest token (the one to feed next)."""
        q = self.request[r]
        return self.prompt_lens[q] + len(self.out[q]) - 1

    def last_token(self, r: int) -> int:
        out = self.out[self.request[r]]
        return out[-1] if out else PAD_ID

    def count_forward(self, rows: Sequence[int] | None = None) -> None:
        """Record one model pass over the active ones of `rows` (default: all rows); call before
        committing its tokens."""
        self.forwards += 1
        for r in range(self.batch) if rows is None else rows:
            if self.is_active(r):
                self.row_forwards[self.request[r]] += 1

    def commit(self, r: int, tokens: Sequence[int]) -> list[int]:
        """Append tokens to row r's request, stopping after a stop token (kept) or at the budget."""
        q = self.request[r]
        added: list[int] = []
        for t in tokens:
            if self.reasons[q]:
                break
            self.out[q].append(t)
            added.append(t)
            if t in self.stop:
                self.reasons[q] = "stop"
            elif len(self.out[q]) >= self.limits[q]:
                self.reasons[q] = "length"
        return added

    def refill(self) -> list[int]:
        """Give every finished row the next queued request that has anything to generate; returns
        the rows that need a prefill."""
        fresh: list[int] = []
        for r in range(self.batch):
            while not self.is_active(r) and self.queued < len(self.prompts):
                self.request[r], self.queued = self.queued, self.queued + 1
                if self.is_active(r):
                    fresh.append(r)
        return fresh

    def prompts_of(self, rows: Sequence[int]) -> list[list[int]]:
        return [self.prompts[self.request[r]] for r in rows]

    def result(self) -> GenerationResult:
        return GenerationResult(self.out, self.forwards, self.row_forwards, self.reasons)


def commit_rows(state: RowState, rows: Sequence[int], tokens: Sequence[Sequence[int]],
                on_tokens: TokenCallback | None) -> None:
    """Commit tokens[i] to rows[i] and report the new tokens of every request (empty for most)."""
    new: list[list[int]] = [[] for _ in state.out]
    for r, toks in zip(rows, tokens):
        new[state.request[r]] = state.commit(r, toks)
    if on_tokens is not None:
        on_tokens(new)


def prefill_rows(model: MTPModel, state: RowState, rows: Sequence[int], heads: int) -> Tensor:
    """Prefill the prompts of `rows` (their current requests) into those cache rows; one pass.
    Returns logits (len(rows), heads, V) at each prompt's last token."""
    device = next(model.parameters()).device
    tokens, lengths = pad_prompts(state.prompts_of(rows), device)
    everyone = list(rows) == list(range(state.batch))
    logits = prefill(model, tokens, lengths, heads=heads,
                     rows=None if everyone else torch.tensor(list(rows), device=device))
    state.count_forward(rows)
    return logits


# ----- generation -------------------------------------------------------------------------------
@torch.no_grad()
def generate(model: MTPModel, prompts: list[list[int]], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, stop_tokens: Collection[int] = (),
             on_tokens: TokenCallback | None = None, batch_size: int | None = None,
             compile: bool = False) -> GenerationResult:
    """Decode prompts with the KV cache, one token per row per forward, using head 1 only.

    Greedy when temperature == 0. `on_tokens` gets, after each pass, the list of new tokens of
    every prompt. A row stops after a stop token (kept in its output) or `max_new_tokens`, or when
    it fills the context. With `batch_size` below the number of prompts, that many rows decode at
    once and a finished row takes the next prompt (continuous batching); by default all prompts
    form one batch. `compile`: the decoding steps run through torch.compile (`mtp.compiled`).
    Sets up (replaces) the model's KV cache."""
    check_prompts(model, prompts, max_new_tokens)
    check_sampling(temperature, top_k, top_p)
    with compiled_decoding(model, compile):
        return _generate(model, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens, on_tokens,
                         batch_size)


def _generate(model: MTPModel, prompts: list[list[int]], max_new_tokens: int, temperature: float,
              top_k: int | None, top_p: float | None, seed: int | None, stop_tokens: Collection[int],
              on_tokens: TokenCallback | None, batch_size: int | None) -> GenerationResult:
    limits = token_limits(model, prompts, max_new_tokens)
    state = RowState(prompts, limits, stop_tokens, batch_size)
    state.refill()
    if not state.active_rows():
        return state.result()
    device = next(model.parameters()).device
    cache_len = cache_length(prompts, limits)
    setup_decode_cache(model, state.batch, cache_len)
    generator = make_generator(seed, device)
    logits = prefill_rows(model, state, range(state.batch), heads=1)[:, 0]
    choose = state.active_rows()
    while True:
        chosen = sample_next(logits[choose], temperature, top_k, top_p, generator).tolist()
        commit_rows(state, choose, [[t] for t in chosen], on_tokens)
        if fresh := state.refill():  # new prompts: prefill them, then pick their first token
            logits[fresh] = prefill_rows(model, state, fresh, heads=1)[:, 0]
            choose = fresh
            continue
        if not (choose := state.active_rows()):
            return state.result()
        # Finished rows are fed a dummy token at their own position; nothing reads it.
        positions = torch.tensor([state.pending_position(r) for r in range(state.batch)], device=device)
        last = torch.tensor([state.last_token(r) for r in range(state.batch)], device=device)
        logits = decode_one(model, last, positions, slots=scratch_slots(positions, cache_len), heads=1)[:, 0]
        state.count_forward()


@torch.no_grad()
def generate_reference(model: MTPModel, prompts: list[list[int]], max_new_tokens: int, *,
                       temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                       seed: int | None = None, stop_tokens: Collection[int] = ()) -> GenerationResult:
    """`generate` without the KV cache: every step recomputes the full causal forward over each
    unfinished row's prompt + output. Slow; the yardstick the cached decoders are tested against.
    Draws random numbers in the same order as `generate`, so seeded samples match too."""
    check_prompts(model, prompts, max_new_tokens)
    check_sampling(temperature, top_k, top_p)
    state = RowState(prompts, token_limits(model, prompts, max_new_tokens), stop_tokens)
    device = next(model.parameters()).device
    generator = make_generator(seed, device)
    while rows := state.active_rows():
        # Right padding leaves earlier positions untouched under causal attention.
        tokens, lengths = pad_prompts([list(prompts[r]) + state.out[r] for r in rows], device)
        logits = model(tokens, heads=1)[torch.arange(len(rows), device=device), lengths - 1, 0]
        state.count_forward()
        chosen = sample_next(logits, temperature, top_k, top_p, generator).tolist()
        commit_rows(state, rows, [[t] for t in chosen], None)
    return state.result()
