"""Data-parallel training on CPU: 2 gloo processes under torchrun against 1 process.

torchrun starts are slow (several seconds each), so one module-scoped launch runs every
2-process job of the non-elastic tests (see `dist_runs`), and the elastic test launches once
more. Run as a script (`torchrun ... tests/test_distributed.py SPEC.json`), this file is the worker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from mtp import distributed
from mtp.loss import mtp_backward
from mtp.model import ConfigError, MTPModel
from mtp.train import OptimizerConfig, TrainConfig, make_optimizer, train

from conftest import tiny_model, tiny_train_fields

# Global batch per micro-batch: 2 sequences; 1 process takes both, 2 processes one each.
STEPS, SAVE_EVERY = 8, 4


def run_cfg(data: Path | str, out: Path | str, world: int, **kw: Any) -> dict[str, Any]:
    """A TrainConfig (as a dict, to cross into the workers) for `world` processes."""
    return tiny_train_fields(data, out, **{"steps": STEPS, "batch_size": 2 // world, "grad_accum": 2,
                                           "eval_every": SAVE_EVERY, "save_every": SAVE_EVERY, "chunk_size": 20,
                                           "device": "cpu", **kw})


# ----- worker side (inside torchrun) ---------------------------------------------------------------

def _grads_job(info: distributed.DistInfo, strategy: str, head_type: str) -> dict[str, Any]:
    """Two steps of 2 micro-batches through ParallelMTP, against one process on the global batch:
    max gradient difference, and how often each parameter (DDP) or parameter group (FSDP2) was
    reduced in each step."""
    ref = tiny_model(0, training=True, n_future=3, head_type=head_type, vocab_size=50)
    model = MTPModel(ref.cfg)
    model.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 50, (4, 19), generator=gen) for _ in range(2)]
    for b in batches:  # chunk 20 < 2 x 16 rows: several unembedding backwards per head
        mtp_backward(ref, b, seq_len=16, chunk_size=20, loss_scale=0.5)
    pm = distributed.ParallelMTP(model, strategy, info.device)
    syncs = [0]
    if strategy == "ddp":
        def hook(_, bucket):  # type: ignore[no-untyped-def]  # DDP rejects string annotations
            syncs[0] += len(bucket.parameters())
            buf = bucket.buffer().div_(info.world_size)
            return torch.distributed.all_reduce(buf, async_op=True).get_future().then(lambda f: f.value()[0])

        for m in [pm._trunk, *pm._heads, pm._unembed]:
            m.register_comm_hook(None, hook)
        expected = sum(1 for _ in model.parameters())
    else:
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter

        class Counting(DefaultReduceScatter):
            def __call__(self, *args: Any, **kwargs: Any) -> Any:
                syncs[0] += 1
                return super().__call__(*args, **kwargs)

        groups = [*model.trunk_layers, pm._trunk, *pm._heads, pm._unembed]
        for m in groups:
            m.set_custom_reduce_scatter(Counting())
        expected = len(groups)
    per_step, err = [], 0.0
    for step in range(2):  # the second step accumulates onto the first step's gradients
        for mb, b in enumerate(batches):
            with pm.micro_batch(last=mb == len(batches) - 1):
                mtp_backward(pm, b[info.rank * 2:(info.rank + 1) * 2], seq_len=16, chunk_size=20, loss_scale=0.5)
        per_step.append(syncs[0])
        syncs[0] = 0
        for p, pr in zip(model.parameters(), ref.parameters()):
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            err = max(err, float((g - (step + 1) * pr.grad).abs().max()))
    return {"syncs": per_step, "expected": expected, "err": err}


def _worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    info = distributed.init("cpu")  # train() reuses this group and leaves it to us
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    results: dict[str, Any] = {}
    try:
        for job in spec["jobs"]:
            if job["kind"] == "grads":
                results[job["name"]] = _grads_job(info, job["strategy"], job["head_type"])
                continue
            crash = job.get("crash")  # {"rank", "step"}: die hard there on the first attempt

            def on_log(rec: dict[str, Any], job: dict[str, Any] = job, crash: Any = crash) -> None:
                if info.rank == 1 and "steps_file" in job:  # the rank that dies: its record is exact
                    with open(job["steps_file"], "a") as f:
                        f.write(json.dumps({"attempt": restart, "step": rec["step"]}) + "\n")
                if crash and restart == 0 and info.rank == crash["rank"] and rec["step"] == crash["step"]:
                    os.kill(os.getpid(), signal.SIGKILL)

            train(TrainConfig.from_dict(job["cfg"]), stop_after=job.get("stop_after"), on_log=on_log)
        if info.is_main and "results" in spec:
            Path(spec["results"]).write_text(json.dumps(results))
    finally:
        distributed.destroy(info)


# ----- test side ---------------------------------------------------------------------------------

def torchrun(spec: dict[str, Any], path: Path, *extra: str, timeout: float = 300) -> str:
    path.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "--monitor-interval=0.2", *extra, __file__, str(path)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    # A fresh store per restart: this PyTorch's shared one keeps the dead attempt's gloo
    # addresses, and restarted workers may connect to them (pytorch/pytorch#135712).
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return output


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """1-process runs here use one thread like each worker (2 processes on 2 shared cores):
    with more, OpenMP threads of busy cores wait on each other and steps get far slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def runs(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """1-process runs in this process, then one torchrun launch for all 2-process jobs:
    gradient/sync checks, one optimizer step under DDP and FSDP2, a 2-process run stopped after
    step 5 (resumed in 1 process by a test), and the 2-process resume of a stopped 1-process run."""
    d = tmp_path_factory.mktemp("runs")
    full = train(TrainConfig.from_dict(run_cfg(corpus, d / "full", 1)))
    one_step = {"single": train(TrainConfig.from_dict(run_cfg(corpus, d / "step-single", 1, steps=1)))}
    train(TrainConfig.from_dict(run_cfg(corpus, d / "c", 1)), stop_after=5)  # checkpoint at 4, "crash" after 5
    jobs: list[dict[str, Any]] = [
        {"kind": "grads", "name": f"{s}-{h}", "strategy": s, "head_type": h}
        for s in ("ddp", "fsdp") for h in ("parallel", "anticausal")
    ]
    jobs += [{"kind": "train", "cfg": run_cfg(corpus, d / f"step-{s}", 2, steps=1, parallel=s)} for s in ("ddp", "fsdp")]
    jobs += [
        {"kind": "train", "cfg": run_cfg(corpus, d / "b", 2, parallel="fsdp", activation_checkpointing=True),
         "stop_after": 5},
        {"kind": "train", "cfg": run_cfg(corpus, d / "c", 2, parallel="ddp", resume=True)},
    ]
    output = torchrun({"jobs": jobs, "results": str(d / "results.json")}, d / "spec.json")
    return {"dir": d, "full": full, "results": json.loads((d / "results.json").read_text()), "output": output}


def curve(records: list[dict[str, Any]]) -> list[tuple[str, int, float]]:
    return [(r["kind"], r["step"], r["loss"]) for r in records]


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_curve(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    """Same records, steps and (up to float summation order across ranks) losses."""
    assert [(k, s) for k, s, _ in curve(a)] == [(k, s) for k, s, _ in curve(b)]
    torch.testing.assert_close([x for *_, x in curve(a)], [x for *_, x in curve(b)], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", ["ddp-parallel", "ddp-anticausal", "fsdp-parallel", "fsdp-anticausal"])
def test_gradients_match_one_process_and_sync_once_per_step(runs: dict[str, Any], name: str) -> None:
    res = runs["results"][name]
    assert res["err"] < 1e-6
    # Every parameter (DDP) / parameter group (FSDP2) reduced exactly once in each of the 2 steps,
    # although each head, and each chunk of the unembedding, ran its own backward per micro-batch.
    assert res["syncs"] == [res["expected"]] * 2


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_one_step_gives_the_parameters_of_one_process(runs: dict[str, Any], strategy: str) -> None:
    d = runs["dir"]
    ref = load_file(str(d / "step-single" / "ckpt-00000001" / "model.safetensors"))
    got = load_file(str(d / f"step-{strategy}" / "ckpt-00000001" / "model.safetensors"))
    assert ref.keys() == got.keys()
    # Adam's first step moves each weight by about lr * g / (|g| + eps): where a gradient is
    # near eps, its summation-order rounding shows up at ~1e-6 (measured: 1 element of 12288 at
    # 1.2e-6). A missing or doubled gradient sync moves weights by up to lr = 3e-3.
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-5, msg=k)
    assert_same_curve(metrics(d / "step-single"), metrics(d / f"step-{strategy}"))


def test_two_process_checkpoint_resumes_in_one_process(runs: dict[str, Any], corpus: Path) -> None:
    d = runs["dir"]
    assert (d / "b" / "latest").read_text().strip() == "ckpt-00000004"  # written by the stopped FSDP2 run
    resumed = train(TrainConfig.from_dict(run_cfg(corpus, d / "b", 1, resume=True)))
    assert_same_curve(runs["full"]["records"], resumed["records"])
    assert_same_curve(runs["full"]["records"], metrics(d / "b"))


def test_one_process_checkpoint_resumes_in_two_processes(runs: dict[str, Any]) -> None:
    d = runs["dir"]
    assert "resuming at step 4" in runs["output"] and "2 processes (ddp)" in runs["output"]
    assert_same_curve(runs["full"]["records"], metrics(d / "c"))


def test_elastic_restart_resumes_from_last_checkpoint(runs: dict[str, Any], corpus: Path, tmp_path: Path) -> None:
    """Rank 1 is killed (SIGKILL) after step 6 on the first attempt; torchrun restarts both
    workers, which resume from the step-4 checkpoint: steps 5 and 6 are redone from the same
    data, nothing is skipped, and the loss curve is that of an uninterrupted run."""
    steps_file = tmp_path / "steps.jsonl"
    job = {"kind": "train", "cfg": run_cfg(corpus, tmp_path / "e", 2, parallel="fsdp", resume=True),
           "crash": {"rank": 1, "step": 6}, "steps_file": str(steps_file)}
    output = torchrun({"jobs": [job]}, tmp_path / "spec.json", "--max-restarts=1")
    done = [json.loads(line) for line in steps_file.read_text().splitlines()]
    assert [r["step"] for r in done if r["attempt"] == 0] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in done if r["attempt"] == 1] == [5, 6, 7, 8]
    assert "resuming at step 4" in output
    assert_same_curve(runs["full"]["records"], metrics(tmp_path / "e"))


# ----- single-process pieces -----------------------------------------------------------------------

def test_init_without_torchrun_is_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    info = distributed.init("cpu")
    assert (info.rank, info.world_size, info.is_main, info.owns_group) == (0, 1, True, False)
    assert distributed.resolve_strategy("auto", info) == "none"
    assert distributed.resolve_strategy("fsdp", info) == "none"
    distributed.destroy(info)
    two = distributed.DistInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))
    assert distributed.resolve_strategy("auto", two) == "ddp" and not two.is_main
    with pytest.raises(ConfigError, match="diverging"):
        distributed.resolve_strategy("none", two)
    with pytest.raises(ConfigError, match="parallel must be"):
        TrainConfig.from_dict({"parallel": "zero3"})


def test_legacy_optimizer_state_loads_by_name() -> None:
    """Checkpoints written before distributed training hold opt.state_dict() (index keys)."""
    model = tiny_model(0, training=True, n_future=2, vocab_size=40)
    opt = make_optimizer(model, OptimizerConfig())
    mtp_backward(model, torch.randint(0, 40, (2, 10)), seq_len=8)
    opt.step()
    legacy = opt.state_dict()
    model2 = MTPModel(model.cfg)
    opt2 = make_optimizer(model2, OptimizerConfig())
    distributed.load_optimizer_state(model2, opt2, legacy)
    for p, p2 in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(opt.state[p]["exp_avg"], opt2.state[p2]["exp_avg"])


def test_activation_checkpointing_keeps_gradients() -> None:
    model = tiny_model(0, training=True, n_future=2, vocab_size=40)
    tokens = torch.randint(0, 40, (2, 12))
    mtp_backward(model, tokens, seq_len=10, chunk_size=7)
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    distributed.checkpoint_activations(model)
    mtp_backward(model, tokens, seq_len=10, chunk_size=7)
    for p, g in zip(model.parameters(), ref):
        torch.testing.assert_close(p.grad, g)


if __name__ == "__main__":
    _worker(sys.argv[1])
