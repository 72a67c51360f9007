#!/usr/bin/env python
"""Data-parallel overhead of the sequential-head backward: n=4 vs n=1 under DDP and FSDP2.

    python bench/bench_distributed.py [--nproc 2] [--preset 10M] [--vocab 4096] [--batch 4]
                                      [--seq 256] [--chunk 512] [--grad-accum 1] [--repeats 5]
                                      [--strategies ddp,fsdp] [--device auto] [--quick]

The script starts `torchrun --standalone --nproc-per-node NPROC` on itself; launched by torchrun
directly (WORLD_SIZE set) it is the worker, so the same file runs on several nodes, e.g. 2 nodes
x 8 GPUs (run on every node; HOST is node 0's address):

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes 2 --nproc-per-node 8 \\
        --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id mtp-bench \\
        bench/bench_distributed.py --preset 1B --vocab 32000 --batch 8 --seq 2048 --chunk 4096

and training the same way (the run directory must be on a filesystem all nodes share):

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes 2 --nproc-per-node 8 \\
        --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id mtp-run --max-restarts 3 \\
        -m mtp.cli train --config run.yaml --parallel fsdp --resume

(`--resume` makes every restart continue from the newest checkpoint; the environment variable
gives each restart a fresh rendezvous store, see pytorch/pytorch#135712.)

What is measured, in one torchrun launch, interleaved round by round so background load hits
every configuration alike: a training step's forward + backward (`mtp_backward` on each of
--grad-accum micro-batches; the optimizer is left out) for n=1 and n=4 heads (parameter matched:
the trunk has n_layers - n blocks), each as
    local   the bare model on this rank's batch, no gradient sync (the compute baseline)
    ddp     ParallelMTP with DDP per part
    fsdp    ParallelMTP with FSDP2 per block / part
Every rank holds --batch sequences (weak scaling: the per-rank work is that of `local`), so
ddp/local and fsdp/local are the data-parallel overheads (ideal 1.0), and n=4/n=1 within a
strategy is the cost of the extra heads; if that ratio stays near local's, the several backward
calls per step of the sequential-head backward add no communication overhead. Each step is
timed from a barrier to the slowest rank's end; the table shows medians. Collectives are counted
per step: DDP all-reduces (buckets), FSDP2 reduce-scatters and all-gathers, with their bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from mtp import distributed
from mtp.loss import mtp_backward
from mtp.model import ModelConfig, MTPModel

MARK = "@@BENCH_RESULT@@ "
QUICK = dict(preset="tiny", vocab=512, batch=2, seq=64, chunk=64, repeats=3)


@dataclass
class Counter:
    """Collectives issued by one configuration since the last reset."""

    calls: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, nbytes: int) -> None:
        self.calls[kind] = self.calls.get(kind, 0) + 1
        self.bytes[kind] = self.bytes.get(kind, 0) + nbytes

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()


@dataclass
class Case:
    strategy: str  # local | ddp | fsdp
    n: int
    runner: Any
    model: MTPModel
    counter: Counter
    times: list[float] = field(default_factory=list)
    per_step: dict[str, Any] = field(default_factory=dict)


def count_collectives(pm: distributed.ParallelMTP, counter: Counter, world: int) -> None:
    """Route the wrapper's gradient collectives through counting hooks (same communication)."""
    if pm.strategy == "ddp":
        def hook(_, bucket):  # type: ignore[no-untyped-def]  # DDP rejects string annotations
            buf = bucket.buffer()
            counter.add("all_reduce", buf.numel() * buf.element_size())
            fut = dist.all_reduce(buf.div_(world), async_op=True).get_future()
            return fut.then(lambda f: f.value()[0])

        for m in [pm._trunk, *pm._heads, pm._unembed]:
            if hasattr(m, "register_comm_hook"):
                m.register_comm_hook(None, hook)
        return
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter

    class Gather(DefaultAllGather):
        def __call__(self, output_tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            counter.add("all_gather", output_tensor.numel() * output_tensor.element_size())
            return super().__call__(output_tensor, *args, **kwargs)

    class Scatter(DefaultReduceScatter):
        def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            counter.add("reduce_scatter", input_tensor.numel() * input_tensor.element_size())
            return super().__call__(output_tensor, input_tensor, *args, **kwargs)

    for m in [*pm.model.trunk_layers, pm._trunk, *pm._heads, pm._unembed]:
        m.set_custom_all_gather(Gather())
        m.set_custom_reduce_scatter(Scatter())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(case: Case, batches: list[torch.Tensor], seq: int, chunk: int | None) -> None:
    for micro, batch in enumerate(batches):
        last = micro == len(batches) - 1
        with case.runner.micro_batch(last) if case.strategy != "local" else nullcontext():
            mtp_backward(case.runner, batch, seq_len=seq, chunk_size=chunk, loss_scale=1.0 / len(batches))
    for p in case.model.parameters():
        p.grad = None


def worker(args: argparse.Namespace) -> dict[str, Any] | None:
    info = distributed.init(args.device, args.threads)
    try:
        device = info.device
        strategies = ["local", *[s for s in args.strategies.split(",") if s]]
        cases: list[Case] = []
        for n in (1, args.n):
            overrides = dict(n_future=n, vocab_size=args.vocab, max_seq_len=max(args.seq + n, 512))
            cfg = ModelConfig.from_preset(args.preset, **overrides)
            for strategy in strategies:
                torch.manual_seed(0)  # every rank builds the same weights
                model = MTPModel(cfg).to(device)
                counter = Counter()
                runner: Any = model
                if strategy != "local":
                    runner = distributed.ParallelMTP(model, strategy, device)
                    count_collectives(runner, counter, info.world_size)
                cases.append(Case(strategy, n, runner, model, counter))
        gen = torch.Generator().manual_seed(1000 + info.rank)
        batches = [torch.randint(0, args.vocab, (args.batch, args.seq + args.n), generator=gen).to(device)
                   for _ in range(args.grad_accum)]
        chunk = args.chunk or None
        for rnd in range(args.repeats + 1):  # round 0 warms up (allocations, DDP bucket rebuild)
            for case in cases:
                case.counter.reset()
                sync(device)
                if info.is_distributed:
                    dist.barrier()
                t0 = time.perf_counter()
                step(case, [b[:, : args.seq + case.n] for b in batches], args.seq, chunk)
                sync(device)
                elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                if info.is_distributed:
                    elapsed = elapsed.to(device)
                    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a step ends with the slowest rank
                if rnd > 0:
                    case.times.append(float(elapsed.cpu()))
                case.per_step = {"calls": dict(case.counter.calls), "bytes": dict(case.counter.bytes)}
        if not info.is_main:
            return None
        rows_per_micro = args.batch * args.seq
        chunks = 1 if chunk is None else math.ceil(rows_per_micro / chunk)
        return {
            "world_size": info.world_size, "device": str(device), "threads": torch.get_num_threads(),
            "args": vars(args), "torch": torch.__version__, "platform": platform.platform(),
            "params": {str(c.n): c.model.num_params() for c in cases if c.strategy == "local"},
            # 1 trunk + n head blocks + n x chunks unembedding backwards per micro-batch
            "backward_calls": {str(n): args.grad_accum * (1 + n + n * chunks) for n in (1, args.n)},
            "cases": [{"strategy": c.strategy, "n": c.n, "median_s": statistics.median(c.times),
                       "min_s": min(c.times), "collectives": c.per_step} for c in cases],
        }
    finally:
        distributed.destroy(info)


def table(res: dict[str, Any]) -> str:
    n_hi = res["args"]["n"]
    by = {(c["strategy"], c["n"]): c for c in res["cases"]}
    strategies = list(dict.fromkeys(c["strategy"] for c in res["cases"]))
    a = res["args"]
    lines = [
        f"{res['world_size']} processes on {res['device']} ({res['threads']} threads each), torch {res['torch']}; "
        f"preset {a['preset']}, vocab {a['vocab']}, per-rank batch {a['batch']} x seq {a['seq']}, chunk {a['chunk']}, "
        f"grad_accum {a['grad_accum']}, median of {a['repeats']} steps (forward + backward, no optimizer)",
        f"params: n=1 {res['params']['1'] / 1e6:.2f}M, n={n_hi} {res['params'][str(n_hi)] / 1e6:.2f}M; "
        f"backward calls per step: n=1 {res['backward_calls']['1']}, n={n_hi} {res['backward_calls'][str(n_hi)]}",
        "",
        f"{'strategy':<9}{'n=1 ms':>10}{f'n={n_hi} ms':>10}{f'n={n_hi}/n=1':>10}{'vs local n=1':>14}"
        f"{f'vs local n={n_hi}':>14}   collectives per step n=1 | n={n_hi} (count, MB)",
    ]
    for s in strategies:
        lo, hi = by[(s, 1)], by[(s, n_hi)]
        base_lo, base_hi = by[("local", 1)], by[("local", n_hi)]

        def coll(c: dict[str, Any]) -> str:
            calls, nbytes = c["collectives"]["calls"], c["collectives"]["bytes"]
            return ", ".join(f"{k} {calls[k]} ({nbytes[k] / 2**20:.1f})" for k in sorted(calls)) or "-"

        lines.append(
            f"{s:<9}{lo['median_s'] * 1e3:>10.1f}{hi['median_s'] * 1e3:>10.1f}{hi['median_s'] / lo['median_s']:>10.2f}"
            f"{lo['median_s'] / base_lo['median_s']:>14.2f}{hi['median_s'] / base_hi['median_s']:>14.2f}"
            f"   {coll(lo)} | {coll(hi)}")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="processes to start (ignored under torchrun)")
    p.add_argument("--preset", default="10M")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4, help="sequences per rank and micro-batch")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--chunk", type=int, default=512, help="cross-entropy chunk (rows); 0: whole head")
    p.add_argument("--n", type=int, default=4, help="heads of the multi-token model")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--strategies", default="ddp,fsdp")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per process (0: CPUs / processes)")
    p.add_argument("--quick", action="store_true", help="tiny model: " + json.dumps(QUICK))
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if "WORLD_SIZE" in os.environ:  # started by torchrun: measure, rank 0 reports
        res = worker(args)
        if res is not None:
            print(MARK + json.dumps(res), flush=True)
            print(table(res), flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(res, f, indent=2)
        return 0
    forwarded: list[str] = []
    it = iter(argv if argv is not None else sys.argv[1:])
    for a in it:  # everything but --nproc goes to the workers
        if a == "--nproc":
            next(it, None)
        elif not a.startswith("--nproc="):
            forwarded.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           os.path.abspath(__file__), *forwarded]
    env = dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    print("$ " + shlex.join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        return proc.returncode or 1
    res = json.loads(lines[-1][len(MARK):])
    print(table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
