#!/usr/bin/env python
"""Training-step benchmark for multi-token prediction: peak memory and step time, side by side.

    python bench/bench_train.py [--preset 30M] [--vocab 32000] [--batch 8] [--seq 512]
                                [--repeats 3] [--chunks 1024,256] [--quick]

Configurations (all parameter matched: n_layers fixed, trunk = n_layers - n_future blocks):
    a   n=1 plain           mtp_loss(model(x), tokens)[0].backward()
    b   n=4 naive           same reference loss, all heads and their logits in one graph
    c   n=4 mem-efficient   mtp_backward(model, tokens, seq_len=T)
    d   n=4 mem-eff+chunk   mtp_backward(..., chunk_size=C) for each C in --chunks
    e   n=1 chunked         mtp_backward(..., chunk_size=C0) on the n=1 model

Memory: each configuration runs in a fresh subprocess. The child builds the model and batch,
preallocates every .grad, runs a warm-up step on a T/8 sequence, then measures one full step:
  * step RSS increment = peak RSS during the step (VmHWM, reset just before the step through
    /proc/self/clear_refs; fallback: a 1 ms /proc/self/statm poller) minus RSS before the step.
    glibc is told to mmap every block >= 128 KiB (MALLOC_MMAP_THRESHOLD_), so freed tensors go
    back to the OS and RSS follows live memory instead of malloc's cache.
  * step tensor peak = peak of live tensor bytes allocated during the step, from the profiler's
    allocator events (on CUDA: max_memory_allocated - memory_allocated before the step).
    It excludes library scratch (MKL/oneDNN) and the Python heap, which RSS includes.
Optimizer state is excluded everywhere; params and their grads exist before the step.

Speed: one subprocess (default malloc) holds the n=1 and n=4 models and interleaves the timed
configurations round by round, so background load hits them alike; median (and min) of
--repeats steps after one warm-up step each, plus process CPU time (all threads), which is less
sensitive to other processes (most robust with --threads 1). FLOPs are counted analytically
(see flops_per_step). Sizes are printed in MiB.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from mtp.loss import mtp_backward, mtp_loss
from mtp.model import ModelConfig, MTPModel

MiB = 2**20
MARK = "@@BENCH_RESULT@@ "  # prefix of the child's JSON result line
FULL = dict(preset="30M", vocab=32000, batch=8, seq=512, chunks="1024,256", threads=0)
QUICK = dict(preset="tiny", vocab=2048, batch=2, seq=128, chunks="64,16", threads=1)
TARGET_MEM_C, TARGET_MEM_D, TARGET_SPEED = 1.10, 0.60, 1.05


@dataclass(frozen=True)
class Run:
    """One benchmarked configuration."""

    key: str  # a, b, c, d1024, e
    label: str
    n_future: int
    mode: str  # "plain": reference loss in one graph; "mtp": mtp_backward
    chunk: int | None


def configs(n: int, chunks: list[int]) -> list[Run]:
    runs = [
        Run("a", "n=1 plain", 1, "plain", None),
        Run("b", f"n={n} naive", n, "plain", None),
        Run("c", f"n={n} mem-efficient", n, "mtp", None),
    ]
    runs += [Run(f"d{c}", f"n={n} mem-eff + chunk {c}", n, "mtp", c) for c in chunks]
    runs.append(Run("e", f"n=1 mem-eff + chunk {chunks[0]}", 1, "mtp", chunks[0]))
    return runs


# ----- building blocks shared by parent and children ------------------------------------------
def model_config(args: argparse.Namespace, n_future: int) -> ModelConfig:
    return ModelConfig.from_preset(args.preset, n_future=n_future, vocab_size=args.vocab,
                                   max_seq_len=max(args.seq, 16))


def build(args: argparse.Namespace, n_future: int, device: torch.device) -> tuple[MTPModel, torch.Tensor]:
    """Model with preallocated (zero) grads, and a batch of B x (T + n_future) random tokens."""
    torch.manual_seed(0)
    model = MTPModel(model_config(args, n_future)).to(device)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + n_future), generator=g).to(device)
    return model, tokens


def make_step(model: MTPModel, tokens: torch.Tensor, run: Run, seq: int) -> Callable[[], float]:
    """One forward+backward (no optimizer); returns the loss."""
    if run.mode == "plain":
        def step() -> float:
            loss, _ = mtp_loss(model(tokens[:, :seq]), tokens)  # logits die when mtp_loss returns
            loss.backward()
            return loss.item()
    else:
        def step() -> float:
            loss, _ = mtp_backward(model, tokens, seq_len=seq, chunk_size=run.chunk)
            return loss.item()
    return step


def zero_grads(model: MTPModel) -> None:
    for p in model.parameters():
        p.grad.zero_()  # keep the buffers: they belong to the baseline, not to the step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def param_bytes(model: MTPModel) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def flops_per_step(cfg: ModelConfig, batch: int, seq: int) -> dict[str, float]:
    """Analytic training FLOPs (forward + backward = 3x forward) of one step.

    Matmuls: 6 * tokens * (weights of every trunk/head linear + n_future * dim * vocab for the
    shared unembedding, applied once per head). The embedding is a lookup, not counted.
    Attention scores and values: forward 2 * 2 * T * dim per token and layer, halved for the
    causal mask (the CPU flash kernel skips masked blocks), times 3 -> 6 * T * dim.
    Norms, RoPE, SiLU and the softmax/cross-entropy are not counted (memory-bound, small FLOPs)."""
    d, hd = cfg.dim, cfg.head_dim
    attn_w = d * cfg.n_heads * hd * 2 + d * cfg.n_kv_heads * hd * 2
    block_w = attn_w + 3 * d * cfg.ffn_dim
    n_blocks = cfg.n_trunk + (0 if cfg.head_type == "linear" else cfg.n_future)
    head_w = cfg.n_future * d * d if cfg.head_type == "linear" else 0
    tokens = batch * seq
    body = 6.0 * tokens * (n_blocks * block_w + head_w)
    unembed = 6.0 * tokens * cfg.n_future * d * cfg.vocab_size
    attention = 6.0 * tokens * seq * cfg.n_heads * hd * n_blocks
    return dict(body=body, unembed=unembed, attention=attention, total=body + unembed + attention)


# ----- memory measurement helpers (Linux) -----------------------------------------------------
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return hwm_bytes() <= rss_bytes() + 1 * MiB
    except OSError:
        return False


def malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RssPoller:
    """Fallback peak-RSS tracker: polls /proc/self/statm every ~1 ms in a thread."""

    def __init__(self) -> None:
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __enter__(self) -> "RssPoller":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def tensor_peak_from_profile(prof: torch.profiler.profile) -> int | None:
    """Peak of live tensor bytes allocated inside the profiled region (CPU allocator events)."""
    try:  # kineto events carry ns timestamps; FunctionEvents only us
        evs = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
               if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    except AttributeError:
        evs = [(e.time_range.start, e.cpu_memory_usage) for e in prof.events() if e.name == "[memory]"]
    if not evs:
        return None
    evs.sort(key=lambda x: x[0])  # stable: allocations in one ns keep their order
    live = peak = 0
    for _, nbytes in evs:
        live += nbytes
        peak = max(peak, live)
    return peak


# ----- children -------------------------------------------------------------------------------
def child_memory(args: argparse.Namespace, run: Run, device: torch.device) -> dict[str, Any]:
    model, tokens = build(args, run.n_future, device)
    step = make_step(model, tokens, run, args.seq)
    # Warm-up on a short sequence (same batch and kernels, 1/8 of the time; full length with
    # --full-warmup gives the same increments): thread pools, kernel and profiler set-up happen
    # here, not in the measured step.
    tw = args.seq if args.full_warmup else max(8, args.seq // 8)
    warm = make_step(model, tokens[:, : tw + run.n_future], run, tw)
    use_prof = device.type == "cpu"
    acts = [torch.profiler.ProfilerActivity.CPU]
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=acts, profile_memory=use_prof) if use_prof else _null():
        warm()
    warm_s = time.perf_counter() - t0
    zero_grads(model)
    gc.collect()
    malloc_trim()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_alloc = torch.cuda.memory_allocated(device)
    base_rss = rss_bytes()
    hwm_ok = reset_hwm()
    poller = _null() if hwm_ok else RssPoller()
    t0 = time.perf_counter()
    with poller, (torch.profiler.profile(activities=acts, profile_memory=True) if use_prof else _null()) as prof:
        loss = step()
        sync(device)
        peak_rss = hwm_bytes() if hwm_ok else 0  # read before the profiler post-processes
    seconds = time.perf_counter() - t0
    if not hwm_ok:
        peak_rss = poller.peak
    if device.type == "cuda":
        tensor_peak = torch.cuda.max_memory_allocated(device) - base_alloc
    else:
        tensor_peak = tensor_peak_from_profile(prof)
    return dict(base_rss=base_rss, peak_rss=peak_rss, tensor_peak=tensor_peak, loss=loss,
                rss_method="VmHWM reset" if hwm_ok else "1 ms poll", seconds=seconds, warm_seconds=warm_s,
                param_bytes=param_bytes(model), n_params=model.num_params())


class _null:
    """A do-nothing context manager that yields None."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def child_speed(args: argparse.Namespace, runs: list[Run], device: torch.device) -> dict[str, Any]:
    models: dict[int, tuple[MTPModel, torch.Tensor]] = {}
    for r in runs:
        if r.n_future not in models:
            models[r.n_future] = build(args, r.n_future, device)
    steps = {r.key: make_step(*models[r.n_future], r, args.seq) for r in runs}
    timed = [r for r in runs if r.key != "b"]
    naive = [r for r in runs if r.key == "b"]

    times: dict[str, list[float]] = {r.key: [] for r in runs}
    cpu: dict[str, list[float]] = {r.key: [] for r in runs}  # process CPU time, all threads
    losses: dict[str, float] = {}

    def timed_step(r: Run, record: bool = True) -> None:
        zero_grads(models[r.n_future][0])
        sync(device)
        c0, t0 = time.process_time(), time.perf_counter()
        losses[r.key] = steps[r.key]()
        sync(device)
        if record:
            times[r.key].append(time.perf_counter() - t0)
            cpu[r.key].append(time.process_time() - c0)

    for r in timed:  # warm-up, not timed
        timed_step(r, record=False)
    for _ in range(args.repeats):  # interleaved rounds
        for r in timed:
            timed_step(r)
    check: dict[str, Any] = {}
    ref_run = [r for r in timed if naive and r.n_future == naive[0].n_future][-1:]
    if ref_run:
        # The last timed mtp_backward step left its grads in the n-head model: compare with naive's.
        model = models[naive[0].n_future][0]
        ref = [p.grad.clone() for p in model.parameters()]
        for i in range(args.naive_repeats):
            timed_step(naive[0])  # no warm-up: the other configurations warmed the kernels
            if i == 0:
                diff = max(float((p.grad - g).abs().max()) for p, g in zip(model.parameters(), ref))
                scale = max(float(g.abs().max()) for g in ref)
                check = dict(grad_max_abs_diff=diff, grad_max_abs=scale, ref=ref_run[0].key,
                             loss_diff=abs(losses["b"] - losses[ref_run[0].key]))
        del ref
    return dict(times=times, cpu=cpu, losses=losses, check=check)


def child_main(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    runs = {r.key: r for r in configs(args.n_future, parse_chunks(args.chunks))}
    if args.child == "memory":
        out = child_memory(args, runs[args.run], device)
    else:
        out = child_speed(args, [runs[k] for k in args.run.split(",")], device)
    print(MARK + json.dumps(out), flush=True)


# ----- parent -----------------------------------------------------------------------------------
def parse_chunks(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def spawn(args: argparse.Namespace, kind: str, run: str) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--run", run,
           "--preset", args.preset, "--vocab", str(args.vocab), "--batch", str(args.batch),
           "--seq", str(args.seq), "--repeats", str(args.repeats), "--chunks", args.chunks,
           "--n-future", str(args.n_future), "--naive-repeats", str(args.naive_repeats),
           "--device", args.device, "--threads", str(args.threads)] + (["--full-warmup"] if args.full_warmup else [])
    env = dict(os.environ)
    if kind == "memory":
        # Fixed thresholds: big blocks are mmapped and unmapped on free, so RSS tracks live memory.
        env.update(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    # Pass the child's stderr on, minus the profiler's start/stop chatter.
    err = "".join(ln for ln in proc.stderr.splitlines(True) if not ln.startswith("USDT:"))
    if err.strip():
        sys.stderr.write(err)
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child {kind}:{run} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(MARK):])


def fmt_mb(x: float | None) -> str:
    return "n/a" if x is None else f"{x / MiB:,.0f}"


def ratio(x: float | None, y: float | None) -> str:
    return "n/a" if x is None or not y else f"{x / y:.2f}x"


def verdict(x: float | None, y: float | None, target: float) -> str:
    if x is None or not y:
        return "n/a"
    return f"{x / y:.3f}x  (target <= {target:.2f}x: {'PASS' if x / y <= target else 'MISS'})"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def memory_section(args: argparse.Namespace, runs: list[Run]) -> None:
    B, T, V = args.batch, args.seq, args.vocab
    res: dict[str, dict[str, Any]] = {}
    for r in runs:
        t0 = time.perf_counter()
        res[r.key] = spawn(args, "memory", r.key)
        print(f"  [memory] {r.key:6s} {r.label:28s} done in {time.perf_counter() - t0:5.0f} s", flush=True)

    pbytes = res["a"]["param_bytes"]
    print(f"\nMEMORY  (one training step, fresh process per row; params {res['a']['n_params'] / 1e6:.1f}M "
          f"for every n; params + grads = {fmt_mb(2 * pbytes)} MiB, allocated before the step)")
    print(f"  one fp32 logits copy for all B*T={B * T} positions = B*T*V*4 = {fmt_mb(B * T * V * 4)} MiB")
    rows = []
    for r in runs:
        m = res[r.key]
        rows_ = B * T if r.chunk is None else min(r.chunk, B * T)
        copies = r.n_future if r.key == "b" else 1  # the naive graph holds every head's logits
        m["floor"] = copies * rows_ * V * 4
        m["incr"] = m["peak_rss"] - m["base_rss"]
        rows.append([
            f"({r.key}) {r.label}", fmt_mb(m["floor"]), fmt_mb(m["tensor_peak"]), fmt_mb(m["incr"]),
            fmt_mb(m["peak_rss"]), ratio(m["incr"], res["a"]["incr"]),
            ratio(m["tensor_peak"], res["a"]["tensor_peak"]), ratio(m["incr"], m["floor"]),
            ratio(m["tensor_peak"] and m["tensor_peak"] + 2 * pbytes, m["floor"] + 2 * pbytes),
        ])
    print(table(["config", "logits floor MiB", "step tensor peak MiB", "step RSS incr MiB", "total peak RSS MiB",
                 "RSS incr vs (a)", "tensor vs (a)", "RSS incr / floor", "(P+G+tensor)/(P+G+floor)"], rows))
    print(f"  RSS method: {res['a']['rss_method']}; RSS incr = peak RSS during the step - RSS just before it "
          f"(baseline RSS of (a) = {fmt_mb(res['a']['base_rss'])} MiB: runtime + params + grads + batch).")
    print("  logits floor = fp32 logits that must exist at once: one (rows x V) copy, rows = B*T or the chunk;"
          f" naive keeps all {args.n_future} heads' copies. The rest of the increment is activations and"
          " CE temporaries (log-softmax output, its gradient, the logits gradient).")
    a = res["a"]
    c = res["c"]
    d = res[f"d{parse_chunks(args.chunks)[0]}"]
    tot = lambda m: None if m["tensor_peak"] is None else m["tensor_peak"] + 2 * pbytes
    print("\n  targets (step increment = memory the step adds on top of params + grads; total = P + G + step):")
    print(f"    (c) mem-efficient / (a):  RSS incr {verdict(c['incr'], a['incr'], TARGET_MEM_C)};"
          f"  tensor incr {verdict(c['tensor_peak'], a['tensor_peak'], TARGET_MEM_C)};"
          f"  tensor total {verdict(tot(c), tot(a), TARGET_MEM_C)}")
    print(f"    (d) + chunk / (a):        RSS incr {verdict(d['incr'], a['incr'], TARGET_MEM_D)};"
          f"  tensor incr {verdict(d['tensor_peak'], a['tensor_peak'], TARGET_MEM_D)};"
          f"  tensor total {verdict(tot(d), tot(a), TARGET_MEM_D)}")


def speed_section(args: argparse.Namespace, runs: list[Run]) -> None:
    keys = ["a", "c", f"d{parse_chunks(args.chunks)[0]}"] + (["b"] if args.naive_repeats > 0 else [])
    by_key = {r.key: r for r in runs}
    t0 = time.perf_counter()
    res = spawn(args, "speed", ",".join(keys))
    print(f"  [speed] done in {time.perf_counter() - t0:.0f} s", flush=True)
    tokens = args.batch * args.seq
    fl = {k: flops_per_step(model_config(args, by_key[k].n_future), args.batch, args.seq) for k in keys}
    med = {k: statistics.median(res["times"][k]) for k in keys}
    cpu = {k: statistics.median(res["cpu"][k]) for k in keys}
    print(f"\nSPEED  (wall time: median of {args.repeats} interleaved steps after one warm-up step each; naive: "
          f"{args.naive_repeats} step(s), no warm-up of its own; optimizer excluded; CPU s = process CPU time, "
          f"all threads, less sensitive to other load)")
    rows = []
    for k in keys:
        ts = res["times"][k]
        f_ratio = fl[k]["total"] / fl["a"]["total"]
        rows.append([
            f"({k}) {by_key[k].label}", f"{fl[k]['total'] / 1e12:.3f}", f"{fl[k]['unembed'] / fl[k]['total']:.0%}",
            f"{med[k]:.3f}", f"{min(ts):.3f}", " ".join(f"{t:.2f}" for t in ts), f"{cpu[k]:.2f}",
            f"{tokens / med[k]:,.0f}", f"{fl[k]['total'] / med[k] / 1e9:.1f}", f"{med[k] / med['a']:.2f}x",
            f"{cpu[k] / cpu['a']:.2f}x", f"{f_ratio:.2f}x", f"{med[k] / med['a'] / f_ratio:.2f}",
        ])
    print(table(["config", "TFLOP/step", "unembed share", "median s", "min s", "all s", "CPU s", "tok/s",
                 "GFLOP/s", "time vs (a)", "CPU vs (a)", "FLOPs vs (a)", "time ratio / FLOP ratio"], rows))
    r_t = med["c"] / med["a"]
    r_f = fl["c"]["total"] / fl["a"]["total"]
    r_min = min(res["times"]["c"]) / min(res["times"]["a"])
    r_cpu = cpu["c"] / cpu["a"]
    print(f"\n  target: (c) n={args.n_future} mem-efficient / (a) n=1 step time = {r_t:.3f}x "
          f"(min/min {r_min:.3f}x, CPU time {r_cpu:.3f}x; target <= {TARGET_SPEED:.2f}x: "
          f"{'PASS' if r_t <= TARGET_SPEED else 'MISS'})")
    print(f"  FLOP limit: n={args.n_future} needs {r_f:.3f}x the FLOPs of n=1 (each head applies the "
          f"{args.vocab}x{model_config(args, 1).dim} unembedding), so {TARGET_SPEED:.2f}x is "
          f"{'reachable' if r_f <= TARGET_SPEED else 'physically unreachable'} at this size.")
    print(f"  implementation overhead = time ratio / FLOP ratio = {r_t / r_f:.3f} (min/min {r_min / r_f:.3f}, "
          f"CPU time {r_cpu / r_f:.3f}); 1.0 = n={args.n_future} costs exactly its extra FLOPs")
    chk = res.get("check") or {}
    if chk:
        print(f"  check (b) naive vs ({chk['ref']}): |loss diff| = {chk['loss_diff']:.2e}, "
              f"max |grad diff| = {chk['grad_max_abs_diff']:.2e} (max |grad| {chk['grad_max_abs']:.2e})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help=f"model size (default {FULL['preset']})")
    p.add_argument("--vocab", type=int, default=None, help=f"vocabulary size (default {FULL['vocab']})")
    p.add_argument("--batch", type=int, default=None, help=f"batch size B (default {FULL['batch']})")
    p.add_argument("--seq", type=int, default=None, help=f"sequence length T (default {FULL['seq']})")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per configuration")
    p.add_argument("--naive-repeats", type=int, default=1, help="timed naive steps (0: skip); slow and huge")
    p.add_argument("--chunks", default=None, help=f"CE chunk sizes, first is the main one (default {FULL['chunks']})")
    p.add_argument("--n-future", type=int, default=4, help="heads of the multi-token model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in the children (0: torch's default; --quick uses 1)")
    p.add_argument("--quick", action="store_true",
                   help=f"tiny smoke run: {QUICK['preset']}, V={QUICK['vocab']}, B*T={QUICK['batch']}x{QUICK['seq']}")
    p.add_argument("--full-warmup", action="store_true",
                   help="memory children warm up on the full sequence instead of T/8")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--child", choices=["memory", "speed"], help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return
    start = time.perf_counter()
    runs = configs(args.n_future, parse_chunks(args.chunks))
    cfg1 = model_config(args, 1)
    print(f"command: {shlex.join(getattr(sys, 'orig_argv', [sys.executable] + sys.argv))}")
    print(f"torch {torch.__version__}, python {platform.python_version()}, device {args.device}, "
          f"threads {args.threads or torch.get_num_threads()}, cpu: {cpu_name()} x{os.cpu_count()}")
    print(f"model: preset {args.preset} (dim {cfg1.dim}, {cfg1.n_layers} layers = trunk + heads), "
          f"V={args.vocab}, B*T={args.batch}x{args.seq}, n_future={args.n_future}, chunks {args.chunks}, fp32")
    print(f"load average at start: {loadavg()}  (timings assume an otherwise idle machine)", flush=True)
    if args.quick:
        print("--quick: smoke check only; at this size fixed overheads dominate and the targets mean little")
    busy = os.getloadavg()[0] > 0.5 if hasattr(os, "getloadavg") else False
    if busy and not args.skip_speed:
        print("WARNING: the machine is already busy: wall times are inflated and noisy; "
              + ("CPU times with 1 thread are robust" if args.threads == 1 else
                 "so are CPU times with >1 thread; compare CPU-time ratios, ideally with --threads 1"))
    if not args.skip_memory:
        memory_section(args, runs)
    if not args.skip_speed:
        print(flush=True)
        speed_section(args, runs)
    print(f"\nload average at end: {loadavg()}; total wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
