"""Decoding speed, measured: each decoding mode (`mtp.modes`) against plain greedy decoding on
the same prompts, with the speedup taken apart into fewer passes and the cost of each pass.

`decode_benchmark` gives one row per mode, `format_table` prints them; `forward_time_ratio` times
a cached multi-token forward against a one-token one (what a verify pass costs). Used by
`mtp bench decode`, bench/bench_decode.py and the experiments.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from .generate import GenerationResult, prefill, setup_decode_cache
from .model import MTPModel
from .modes import DecodeMode, parse_mode
from .speculative import SpeculativeResult


def default_modes(model: MTPModel) -> list[str]:
    """greedy, a chain for every usable k, the default tree, prompt lookup and heads + lookup
    (greedy and lookup3 for n_future = 1)."""
    draft_heads = model.cfg.n_future - 1
    heads = [f"spec{k}" for k in range(1, draft_heads + 1)] + ["tree", f"spec{draft_heads}+lookup"]
    return ["greedy"] + (heads if draft_heads else []) + ["lookup3"]


@dataclass
class ModeRun:
    """One mode's result, its best wall time, the part of it spent in the model, and its FLOPs."""

    result: GenerationResult
    seconds: float
    model_seconds: float = 0.0  # inside the model's forward methods (see `ModelTimer`)
    flops: float = 0.0  # matmul/attention FLOPs of the whole run (FlopCounterMode, untimed run)


class ModelTimer:
    """Adds up the wall time spent inside the model's forward methods while active, so a decoding
    run splits into model work and everything around it (drafting, acceptance, bookkeeping).
    Wraps the instance's methods; `model(...)` reaches trunk_and_heads and unembed; drafters call
    cached_head and draft_unembed (which may call unembed: only the outermost call is timed, so
    nothing is counted twice). On CUDA each call synchronizes before and after (queued work would
    otherwise land in the wrong bucket), which slows the run itself."""

    METHODS = ("trunk_and_heads", "later_heads", "unembed", "cache_move", "cached_head", "draft_unembed")

    def __init__(self, model: MTPModel) -> None:
        self.model, self.seconds, self.depth = model, 0.0, 0
        self.sync = torch.cuda.synchronize if next(model.parameters()).device.type == "cuda" else lambda: None

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self.depth:  # inside another timed method
                return fn(*args, **kwargs)
            self.sync()
            start = time.perf_counter()
            self.depth += 1
            try:
                out = fn(*args, **kwargs)
            finally:
                self.depth -= 1
            self.sync()
            self.seconds += time.perf_counter() - start
            return out
        return timed

    def __enter__(self) -> "ModelTimer":
        for name in self.METHODS:
            setattr(self.model, name, self.wrap(getattr(self.model, name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for name in self.METHODS:
            delattr(self.model, name)  # the class's method shows through again


def time_mode(model: MTPModel, mode: DecodeMode, prompts: list[list[int]], max_new_tokens: int,
              batch_size: int, compile: bool = False) -> ModeRun:
    with ModelTimer(model) as timer:
        start = time.perf_counter()
        result = mode.run(model, prompts, max_new_tokens, batch_size=batch_size, compile=compile)
        seconds = time.perf_counter() - start
    return ModeRun(result, seconds, timer.seconds)


def decode_benchmark(model: MTPModel, prompts: list[list[int]], max_new_tokens: int,
                     modes: Sequence[str | DecodeMode], batch_size: int = 1, *, repeats: int = 1,
                     warmup_tokens: int | None = None, compile: bool = False) -> list[dict[str, Any]]:
    """Decode the same prompts with plain greedy and each mode (a DecodeMode or its `parse_mode`
    spelling), `batch_size` rows at a time with continuous batching; one row per mode (greedy
    first): mode, batch, tokens, seconds, tokens_per_s, tokens_per_forward, speedup (vs greedy
    tokens/s), acceptance (per draft head 2.., P(accepted | earlier drafts accepted)),
    matches_greedy, and the speedup taken apart: speedup = fewer_steps / step_cost, where
    fewer_steps is greedy's batch passes over this mode's, step_cost the time of one pass relative
    to a greedy pass, and step_flops its FLOPs relative to a greedy pass (what a pass costs where
    compute is the limit; counted during the warm-up). Every mode is warmed up first on the first
    batch of prompts, for `warmup_tokens` (default: max_new_tokens, so that no timed run meets a shape, e.g. a key
    length, for the first time: measured, a greedy run timed right after an 8-token warm-up took
    1.5x as long as one after a full warm-up); timings are the best of `repeats`, modes interleaved.
    `compile`: every mode's decoding passes run through torch.compile (`mtp.compiled`); the
    warm-up compiles them, and each row's `warmup_seconds` (its warm-up's wall time) includes compiling."""
    asked = [m if isinstance(m, DecodeMode) else parse_mode(m) for m in modes]
    plan = list(dict.fromkeys([DecodeMode()] + asked))  # greedy first, each mode once
    for mode in plan:
        mode.check(model)  # fail before timing anything
    warmups: dict[DecodeMode, float] = {}
    flops: dict[DecodeMode, float] = {}  # per pass, counted on the first batch of prompts
    plan[0].run(model, prompts[:1], 1)  # the first decode calibrates row blocks: not in any mode's FLOPs
    for mode in plan:
        warm = max_new_tokens if warmup_tokens is None else min(warmup_tokens, max_new_tokens)
        start = time.perf_counter()
        if compile:  # the warm-up compiles; FLOPs come from an eager run (compiled graphs hide their matmuls)
            mode.run(model, prompts[:batch_size], warm, batch_size=batch_size, compile=True)
            warmups[mode] = time.perf_counter() - start
        counter = FlopCounterMode(display=False)
        with counter:  # eager, the warm-up itself counts FLOPs (the counter slows it; it is not timed)
            res = mode.run(model, prompts[:batch_size], warm, batch_size=batch_size)
        flops[mode] = float(counter.get_total_flops()) / max(1, res.forwards)
        if not compile:
            warmups[mode] = time.perf_counter() - start
    runs: dict[DecodeMode, ModeRun] = {}
    for _ in range(max(1, repeats)):
        for mode in plan:
            out = time_mode(model, mode, prompts, max_new_tokens, batch_size, compile)
            if mode not in runs or out.seconds < runs[mode].seconds:
                runs[mode] = out
    for mode in plan:
        runs[mode].flops = flops[mode] * runs[mode].result.forwards  # the run's passes at the warm-up's FLOPs per pass
    return [{**benchmark_row(str(mode), runs[mode], runs[plan[0]], batch_size), "compiled": compile,
             "warmup_seconds": warmups[mode]} for mode in plan]


def benchmark_row(name: str, run: ModeRun, greedy: ModeRun, batch_size: int) -> dict[str, Any]:
    res, ref = run.result, greedy.result
    n_tokens = sum(map(len, res.tokens))
    rate = n_tokens / run.seconds if run.seconds > 0 else math.inf
    greedy_rate = sum(map(len, ref.tokens)) / greedy.seconds if greedy.seconds > 0 else math.inf
    rates = res.acceptance_rates if isinstance(res, SpeculativeResult) else []
    return {
        "mode": name,
        "batch": batch_size,
        "tokens": n_tokens,
        "seconds": run.seconds,
        "tokens_per_s": rate,
        "tokens_per_forward": res.tokens_per_forward,
        "speedup": rate / greedy_rate,
        "acceptance": rates,
        "matches_greedy": res.tokens == ref.tokens,
        "fewer_steps": ref.forwards / res.forwards,
        "step_cost": (run.seconds / res.forwards) / (greedy.seconds / ref.forwards),
        "step_flops": (run.flops / res.forwards) / (greedy.flops / ref.forwards) if greedy.flops else math.nan,
        "step_model": (run.model_seconds / res.forwards) / (greedy.model_seconds / ref.forwards)
        if greedy.model_seconds > 0 else math.nan,
        "outside_model": 1 - run.model_seconds / run.seconds if run.seconds > 0 else math.nan,
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table of `decode_benchmark` rows, columns aligned."""
    header = ["mode", "batch", "tok/s", "tok/fwd", "speedup", "fewer steps", "step time", "step model",
              "step FLOPs", "outside model", "accept h2/h3/..", "same as greedy"]
    lines = [header] + [[
        str(r["mode"]), str(r["batch"]), f"{r['tokens_per_s']:.1f}", f"{r['tokens_per_forward']:.2f}",
        f"{r['speedup']:.2f}x", f"{r['fewer_steps']:.2f}x", f"{r['step_cost']:.2f}x", f"{r['step_model']:.2f}x",
        f"{r['step_flops']:.2f}x", f"{100 * r['outside_model']:.0f}%",
        "/".join("-" if math.isnan(a) else f"{a:.2f}" for a in r["acceptance"]) or "-",
        "yes" if r["matches_greedy"] else "NO",
    ] for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]

    def fmt(line: list[str]) -> str:  # first column left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))

    return "\n".join([fmt(lines[0]), "  ".join("-" * w for w in widths)] + [fmt(line) for line in lines[1:]])


@torch.no_grad()
def forward_time_ratio(model: MTPModel, batch_size: int = 1, context: int = 64, n_tokens: int = 5,
                       repeats: int = 30) -> dict[str, float]:
    """Seconds per cached forward, measured side by side after a prefill of `context` tokens:
    t1 (1 token, head 1 only: a greedy step), t1_all (1 token, all heads), tn (n_tokens, all
    heads: a chain verify step with k = n_tokens - 1). ratio = tn / t1_all; step_ratio = tn / t1."""
    cfg = model.cfg
    context = min(context, cfg.max_seq_len - n_tokens)
    device = next(model.parameters()).device
    setup_decode_cache(model, batch_size, context + n_tokens)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(cfg.vocab_size, (batch_size, context + n_tokens), generator=gen).to(device)
    prefill(model, tokens[:, :context], torch.full((batch_size,), context, device=device))
    pos = torch.arange(context, context + n_tokens, device=device).expand(batch_size, -1)
    calls = {
        "t1": lambda: model(tokens[:, context : context + 1], pos[:, :1], heads=1),
        "t1_all": lambda: model(tokens[:, context : context + 1], pos[:, :1], heads=cfg.n_future),
        "tn": lambda: model(tokens[:, context:], pos, heads=cfg.n_future),
    }
    best = {name: math.inf for name in calls}
    for _ in range(3):  # warm up
        for call in calls.values():
            call()
    for _ in range(repeats):  # interleaved so drift hits all three alike
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            best[name] = min(best[name], time.perf_counter() - start)
    return {**best, "ratio": best["tn"] / best["t1_all"], "step_ratio": best["tn"] / best["t1"]}
