"""The training loop: AdamW, warmup + cosine schedule, accumulation, autocast, eval, checkpoints.

A run is a pure function of its config and seed: the batch for step s is `TokenData.batch(s)`, so
resuming from a checkpoint at step s reproduces the loss curve of an uninterrupted run.
Under torchrun each rank takes its share of every step's global batch (batch_size sequences per
rank and micro-batch) and the model is wrapped for data parallelism (see mtp.distributed);
checkpoints hold the full state, so a run may resume with a different number of processes
(keep batch_size x grad_accum x processes fixed to keep the same global batch).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import base_cache as base_cache_io
from . import checkpoint as ckpt_io
from . import distributed, fsutil
from .data import TokenData, Tokenizer, validation_batches
from .hardware import train_dtype
from .loss import IGNORE, align_targets, base_kind, mtp_backward
from .model import ConfigError, ModelConfig, MTPModel, head_blocks
from .train_config import (CheckpointConfig, DataConfig, FinetuneConfig, ModelSpec, OptimizerConfig, RuntimeConfig,
                           TrainConfig)

__all__ = ["CheckpointConfig", "DataConfig", "FinetuneConfig", "ModelSpec", "OptimizerConfig", "RuntimeConfig",
           "TrainConfig", "evaluate", "init_model", "lr_at", "make_optimizer", "set_trainable", "train"]


def init_model(cfg: TrainConfig, vocab_size: int) -> MTPModel:
    """A fresh model from the preset, or (with init_from) a saved one with n_future heads: the trunk
    is kept, existing heads are reused, new heads copy head 1 or start random."""
    spec, init_from = cfg.model, cfg.finetuning.init_from
    if init_from is None:
        return MTPModel(spec.build(vocab_size))
    base, _ = ckpt_io.load_model(init_from)
    old = base.cfg
    if old.vocab_size < vocab_size:
        raise ConfigError(f"{init_from} has vocab_size={old.vocab_size}, smaller than the data's tokenizer ({vocab_size})")
    fields = {**old.to_dict(), "n_future": spec.n_future, "head_type": spec.head_type or old.head_type,
              "shared_head": spec.shared_head or old.shared_head, **spec.overrides}
    fields["n_layers"] = old.n_trunk + head_blocks(fields["head_type"], spec.n_future, fields["shared_head"])
    new_cfg = ModelConfig.from_dict(fields)
    # parallel <-> causal only rewires the same blocks (head i reads the trunk or head i-1); head 1
    # reads the trunk either way, so the model's own next-token output is kept.
    # Sequential heads may replace them too: head 1 is the same block, and each new sequential
    # head starts from a copy of a block (see `_seed_sequential_head`).
    rewire = {old.head_type, new_cfg.head_type} <= {"parallel", "causal"} or (
        new_cfg.head_type == "sequential" and old.head_type in ("parallel", "causal"))
    if new_cfg.n_trunk != old.n_trunk or (new_cfg.head_type != old.head_type and not rewire):
        raise ConfigError("init_from keeps the trunk and head type (parallel and causal heads may swap, "
                          "either may become sequential); only n_future may change")
    model = MTPModel(new_cfg)
    state = {k: v for k, v in base.state_dict().items() if not k.startswith("heads.")}
    to_sequential = new_cfg.head_type == "sequential" and old.head_type != "sequential"
    for i in range(new_cfg.n_future):
        if i < old.n_future and (i == 0 or not to_sequential):  # the same kind of head: kept
            src, prefix = i, f"heads.{i}."
        elif cfg.finetuning.init_heads == "random":
            continue
        elif new_cfg.head_type == "sequential" and old.head_type == "sequential" and old.n_future > 1:
            src, prefix = old.n_future - 1, f"heads.{i}."  # copies of the last sequential head
        elif new_cfg.head_type == "sequential":  # a block becomes a new sequential head's block
            src, prefix = (i if i < old.n_future else 0), f"heads.{i}.block."
            state.update(_seed_sequential_head(model, i))
        else:  # copies of head 1
            src, prefix = 0, f"heads.{i}."
        for k, v in base.heads[src].state_dict().items():
            state[prefix + k] = v
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("heads.") for k in missing), (missing, unexpected)
    return model


def _seed_sequential_head(model: MTPModel, i: int) -> dict[str, torch.Tensor]:
    """Norms and projection of a new sequential head i whose block is copied from another head:
    the projection starts as [0, I], passing the normed previous hidden state through, so the head
    starts as that block on head i-1's output (a causal head) and learns to use the token."""
    dim = model.cfg.dim
    proj = torch.cat([torch.zeros(dim, dim), torch.eye(dim)], dim=1)
    return {f"heads.{i}.eh_proj.weight": proj, **{f"heads.{i}.{n}.weight": torch.ones(dim) for n in ("enorm", "hnorm")}}


def set_trainable(model: MTPModel, trainable: str) -> None:
    """Freeze what finetuning should not touch. `extra_heads` keeps head 1 and the shared
    norm/unembedding fixed, so the model's next-token predictions (and greedy output) stay the same."""
    for p in model.parameters():
        p.requires_grad_(trainable == "all")
    if trainable == "heads":
        for m in [model.heads, model.norm, model.output]:
            m.requires_grad_(True)
    elif trainable == "extra_heads":
        for h in list(model.heads)[1:]:
            h.requires_grad_(True)


def lr_at(step: int, cfg: OptimizerConfig) -> float:
    """Linear warmup to the peak, then cosine decay to min_lr_ratio x peak at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    ratio = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * ratio


def make_optimizer(model: MTPModel, cfg: OptimizerConfig) -> torch.optim.AdamW:
    # Decoupled weight decay on matrices only; norms' gains are left alone.
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def autocast(device: torch.device, dtype: str):
    if dtype == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(model: MTPModel | distributed.ParallelMTP, data: TokenData, batch_size: int, seq_len: int,
             max_batches: int, device: torch.device, dtype: str = "fp32",
             dist: distributed.DistInfo | None = None) -> dict[str, list[float]]:
    """Per-head validation cross-entropy and top-1 accuracy over the first windows of a split, and
    `agree`: how often head i's argmax at t equals head 1's argmax at t+i-1, i.e. the rate at which
    head i's draft would pass greedy verification on this text (1.0 for head 1).

    With a draft vocabulary (`draft_ids`), heads 2..n choose among those tokens only (as when
    drafting): their argmax is taken there, and their loss is the cross-entropy within it, over
    the targets inside it (as trained); their accuracy still counts every target.

    With `dist` (several processes) each batch holds batch_size windows per rank and every rank
    evaluates its slice; the sums are added over ranks, so the result is that of one process
    with batch_size x world_size, on every rank."""
    n = model.cfg.n_future
    world, rank = (dist.world_size, dist.rank) if dist is not None else (1, 0)
    sums = torch.zeros(6, n, dtype=torch.float64)  # loss, correct, count, agree, agree count, loss count
    draft_ids = getattr(model, "draft_ids", None)
    in_draft = None
    if draft_ids is not None:
        in_draft = torch.zeros(model.cfg.vocab_size, dtype=torch.bool, device=device)
        in_draft[draft_ids.to(device)] = True
    was_training = model.training
    model.eval()
    for tokens in validation_batches(data, batch_size * world, seq_len, n, max_batches):
        part = tokens.tensor_split(world)[rank].to(device)
        counted = len(part) > 0
        if not counted:  # a short last batch: still run a forward, as FSDP2 needs every rank
            part = tokens[:1].to(device)
        targets = align_targets(part, n, seq_len, model.cfg.head_type == "sequential")
        with autocast(device, dtype):
            logits = model(part[:, :seq_len])
        if not counted:
            continue
        if in_draft is not None and n > 1:  # draft heads: nothing outside the draft vocabulary
            logits = logits.float()
            logits[:, :, 1:] = logits[:, :, 1:].masked_fill(~in_draft, float("-inf"))
        greedy = logits.argmax(-1)  # (B, T, n)
        for i in range(n):
            lg = logits[:, :, i].reshape(-1, logits.shape[-1]).float()
            tg = targets[:, :, i].reshape(-1)
            valid = tg != IGNORE
            scored = tg
            if in_draft is not None and i > 0:  # the loss within the draft vocabulary, as trained
                scored = tg.masked_fill(valid & ~in_draft[tg.clamp(min=0)], IGNORE)
            sums[0, i] += F.cross_entropy(lg, scored, ignore_index=IGNORE, reduction="sum").double().cpu()
            sums[1, i] += ((greedy[:, :, i].reshape(-1) == tg) & valid).sum().double().cpu()
            sums[2, i] += valid.sum().double().cpu()
            sums[5, i] += (scored != IGNORE).sum().double().cpu()
            same = greedy[:, : seq_len - i, i] == greedy[:, i:, 0]
            sums[3, i] += same.sum().double().cpu()
            sums[4, i] += same.numel()
    model.train(was_training)
    if dist is not None:
        sums = distributed.sum_over_ranks(sums, dist)
    loss_sum, correct, count = sums[0], sums[1], sums[2].clamp(min=1)
    return {"loss": (loss_sum / sums[5].clamp(min=1)).tolist(), "acc": (correct / count).tolist(),
            "agree": (sums[3] / sums[4].clamp(min=1)).tolist()}


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class MetricsLog:
    """metrics.jsonl in the run directory; on resume, records past the resumed step are dropped
    so the file always describes one consistent run."""

    def __init__(self, path: Path, resume_step: int | None, write: bool = True) -> None:
        self.path = path
        self.write = write  # one writer (rank 0); other ranks only keep the records in memory
        self.records: list[dict[str, Any]] = []
        if resume_step is not None and path.exists():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                if rec.get("step", 0) <= resume_step:
                    self.records.append(rec)
        if write:
            path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def add(self, rec: dict[str, Any]) -> None:
        self.records.append(rec)
        if self.write:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")


def plot_losses(records: list[dict[str, Any]], path: Path) -> None:
    """Per-head training (and validation) loss curves, one line per head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    if not train:
        return
    n = len(train[0]["head_loss"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i in range(n):
        line, = ax.plot([r["step"] for r in train], [r["head_loss"][i] for r in train], lw=1, alpha=0.8,
                        label=f"head {i + 1} (t+{i + 1}) train")
        if val:
            ax.plot([r["step"] for r in val], [r["head_loss"][i] for r in val], "o--", color=line.get_color(),
                    label=f"head {i + 1} val")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title("per-head loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def train(cfg: TrainConfig, stop_after: int | None = None,
          on_log: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run (or resume) training; returns the final validation metrics and the run directory.

    Under torchrun every rank calls this; rank 0 alone prints, logs and writes checkpoints, and
    `on_log` is called on every rank with the same (rank-averaged) record.
    `stop_after` ends the run early after that many steps, as a crash would (used in tests)."""
    dist = distributed.init(cfg.runtime.device, cfg.runtime.threads)
    out = Path(cfg.checkpointing.out)
    existed, fresh = out.exists(), fsutil.describe_dir(out) is None
    try:
        return _train(cfg, dist, stop_after, on_log)
    except BaseException:
        # A new run that fails before its first checkpoint leaves no half-written directory.
        if dist.is_main and fresh and not ckpt_io.checkpoints(out):
            _discard(out, existed)
        raise
    finally:
        distributed.destroy(dist)


def _discard(out: Path, keep_dir: bool) -> None:
    """Remove what a failed new run wrote, except a complete base cache (base_cache=auto): it
    cost a pass of the base over the data and a retry with the same --out reuses it."""
    if not out.is_dir():
        return
    cache = out / BASE_CACHE_AUTO
    keep_cache = (cache / base_cache_io.META).is_file()
    if not keep_dir and not keep_cache:
        shutil.rmtree(out, ignore_errors=True)
        return
    for p in out.iterdir():
        if keep_cache and p == cache:
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _train(cfg: TrainConfig, dist: distributed.DistInfo, stop_after: int | None,
           on_log: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    device = dist.device
    amp = train_dtype(cfg.runtime.dtype, device)
    strategy = distributed.resolve_strategy(cfg.runtime.parallel, dist)
    # Every rank builds the same initial weights from the seed (FSDP2 shards them in place).
    torch.manual_seed(cfg.data.seed)
    out = Path(cfg.checkpointing.out)
    found = fsutil.describe_dir(out)
    if found is not None and found[0] in (fsutil.DATASET, fsutil.CHECKPOINT, fsutil.HF_MODEL, fsutil.META_MODEL):
        raise ConfigError(f"--out {out} already holds {found[1]}; choose another --out")
    if dist.is_main:
        for stale in ckpt_io.remove_stale_checkpoint_temps(out):
            print(f"removed {stale}, a checkpoint left half-written by an earlier run", file=sys.stderr)
    train_data = TokenData(cfg.data.dir, "train")
    val_data: TokenData | None = TokenData(cfg.data.dir, "val")
    tokenizer = Tokenizer.load(cfg.data.dir)
    model = init_model(cfg, tokenizer.vocab_size).to(device)
    if cfg.model.draft_vocab:
        model.set_draft_vocab(train_data.most_frequent(min(cfg.model.draft_vocab, model.cfg.vocab_size)))
    if model.cfg.draft_vocab and dist.is_distributed:
        raise ConfigError("a model with a draft vocabulary trains in one process (not under torchrun)")
    mcfg = model.cfg
    if cfg.data.seq_len > mcfg.max_seq_len:
        raise ConfigError(f"seq_len={cfg.data.seq_len} exceeds the model's max_seq_len={mcfg.max_seq_len}")
    set_trainable(model, cfg.finetuning.trainable)

    start = 0
    latest = ckpt_io.resume_checkpoint(out, report=dist.is_main) if cfg.checkpointing.resume else None
    if cfg.checkpointing.resume and latest is None and dist.is_main:
        print(f"--resume: {out} has no checkpoint yet; starting fresh at step 0", file=sys.stderr)
    state: dict[str, Any] | None = None
    if latest is not None:
        saved_cfg = ckpt_io.load_config(latest)
        if saved_cfg != mcfg:
            raise ConfigError(f"--resume: the model config differs from the one saved in {latest}")
        ckpt_io.load_weights(model, latest)  # full weights, before any sharding
        state = ckpt_io.load_trainer_state(latest)
        start = state["step"]
    elif out.exists() and any(out.glob("ckpt-*")) and not cfg.checkpointing.resume:
        raise ConfigError(f"{out} already holds checkpoints; pass --resume to continue or choose another --out")
    if not distributed.same_on_all_ranks(start, dist):
        raise ConfigError(f"the ranks found different checkpoints in {out}; on several nodes the run "
                          "directory must be on a shared filesystem")
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(out / "metrics.jsonl", start if latest is not None else None, write=dist.is_main)
    writer = _tensorboard(out) if dist.is_main else None

    if cfg.runtime.activation_checkpointing:
        distributed.checkpoint_activations(model)
    if cfg.runtime.compile:
        for block in [*model.trunk_layers, *model.heads]:
            block.compile()
    # The wrapped model (what training calls) shares its parameters with `model`; the optimizer
    # is built after wrapping because FSDP2 replaces the parameters by sharded ones.
    runner: MTPModel | distributed.ParallelMTP = (
        model if strategy == "none" else distributed.ParallelMTP(model, strategy, device))
    opt = make_optimizer(model, cfg.optimizer)
    if state is not None:
        distributed.load_optimizer_state(model, opt, state["optimizer"])
        set_rng_state(state["rng"])

    def micro_batch(last: bool) -> Any:
        return runner.micro_batch(last) if isinstance(runner, distributed.ParallelMTP) else nullcontext()

    if val_data.num_windows(cfg.data.seq_len, mcfg.n_future) < 1:
        if dist.is_main:
            print(f"warning: the validation split of {cfg.data.dir} is shorter than one window; skipping validation")
        val_data = None
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * cfg.data.grad_accum * dist.world_size
    if dist.is_main:
        layout = f"; {dist.world_size} processes ({strategy})" if dist.is_distributed else ""
        heads = f"{mcfg.n_future} {mcfg.head_type} heads" + (" (2..n one shared module)" if mcfg.shared_head else "")
        print(f"model: {mcfg.n_trunk} trunk blocks + {heads}, dim {mcfg.dim}, "
              f"vocab {mcfg.vocab_size}, {model.num_params() / 1e6:.2f}M parameters; "
              f"{len(train_data.tokens):,} training tokens; device {device}, {amp}{layout}"
              + (f"; resuming at step {start}" if start else ""), flush=True)
    cache = (None if cfg.finetuning.base_cache is None or start >= cfg.optimizer.steps
             else _base_cache(cfg, model, train_data, dist, amp))
    bar = _progress(cfg, start, dist.is_main)
    end = cfg.optimizer.steps if stop_after is None else min(cfg.optimizer.steps, start + stop_after)
    final_eval: dict[str, list[float]] | None = None
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    t_last, last_logged = time.perf_counter(), start
    for step in range(start, end):
        lr = lr_at(step, cfg.optimizer)
        for g in opt.param_groups:
            g["lr"] = lr
        head_loss = torch.zeros(mcfg.n_future)
        accum, seq_len = cfg.data.grad_accum, cfg.data.seq_len
        for micro in range(accum):
            windows = train_data.batch_windows(step * accum + micro, cfg.data.batch_size, seq_len, mcfg.n_future,
                                               seed=cfg.data.seed, rank=dist.rank, world_size=dist.world_size)
            batch = train_data.gather(windows, seq_len, mcfg.n_future).to(device)
            base = None if cache is None else cache.get(windows, device, next(model.parameters()).dtype)
            with micro_batch(micro == accum - 1), autocast(device, amp):
                _, per_head = mtp_backward(runner, batch, cfg.optimizer.head_weights, seq_len=seq_len,  # type: ignore[arg-type]
                                           chunk_size=cfg.runtime.chunk_size, loss_scale=1.0 / accum,
                                           targets=cfg.finetuning.targets, distill_topk=cfg.finetuning.distill_topk,
                                           base=base)
            head_loss += per_head.float().cpu() / accum
        # Logged on every rank and checked for NaN alike, so all ranks stop together.
        head_loss = distributed.mean_over_ranks(head_loss, dist)
        clip = cfg.optimizer.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, clip if clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor holding the global norm
            grad_norm = grad_norm.full_tensor()
        opt.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        loss = float(head_loss.sum()) if cfg.optimizer.head_weights is None else float(
            (head_loss * torch.tensor(cfg.optimizer.head_weights)).sum())
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {done}; lower --lr or use --dtype fp32")
        if done % cfg.checkpointing.log_every == 0 or done == end:
            now = time.perf_counter()
            tok_s = tokens_per_step * (done - last_logged) / max(1e-9, now - t_last)
            t_last, last_logged = now, done
            rec = {"kind": "train", "step": done, "loss": loss, "head_loss": head_loss.tolist(), "lr": lr,
                   "grad_norm": float(grad_norm), "tokens_per_s": tok_s}
            log.add(rec)
            if writer is not None:
                writer.add_scalar("train/loss", loss, done)
                writer.add_scalar("train/lr", lr, done)
                writer.add_scalar("train/tokens_per_s", tok_s, done)
                for i, v in enumerate(head_loss.tolist()):
                    writer.add_scalar(f"train/head{i + 1}_loss", v, done)
            if on_log is not None:
                on_log(rec)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.3f}", h1=f"{head_loss[0]:.3f}", tok_s=f"{tok_s:,.0f}")
        if bar is not None:
            bar.update(1)
        last = done == cfg.optimizer.steps
        eval_every, save_every = cfg.checkpointing.eval_every, cfg.checkpointing.save_every
        if val_data is not None and ((eval_every and done % eval_every == 0) or last):
            final_eval = evaluate(runner, val_data, cfg.data.batch_size, cfg.data.seq_len,
                                  cfg.checkpointing.eval_batches, device, amp, dist)
            if isinstance(runner, distributed.ParallelMTP):
                runner.reshard()
            rec = {"kind": "val", "step": done, "loss": final_eval["loss"][0], "head_loss": final_eval["loss"],
                   "head_acc": final_eval["acc"], "head_agree": final_eval["agree"]}
            log.add(rec)
            if writer is not None:
                for i, (l_, a_) in enumerate(zip(final_eval["loss"], final_eval["acc"])):
                    writer.add_scalar(f"val/head{i + 1}_loss", l_, done)
                    writer.add_scalar(f"val/head{i + 1}_acc", a_, done)
            if dist.is_main:
                heads = "  ".join(f"h{i + 1} {l_:.3f}/{a_:.1%}" for i, (l_, a_) in
                                  enumerate(zip(final_eval["loss"], final_eval["acc"])))
                agree = "/".join(f"{a_:.1%}" for a_ in final_eval["agree"][1:])
                _write(bar, f"step {done} val loss/acc per head: {heads}"
                       + (f"; heads 2..{mcfg.n_future} agree with head 1: {agree}" if agree else ""))
        if (save_every and done % save_every == 0) or last:
            # Gathering the full state is collective under FSDP2: every rank takes part.
            model_state, opt_state = distributed.full_state(model, opt)
            if dist.is_main:
                state = {"step": done, "optimizer": opt_state, "rng": rng_state()}
                ckpt_io.save_checkpoint(out, done, model, tokenizer, state, dataclasses.asdict(cfg),
                                        keep=cfg.checkpointing.keep, model_state=model_state)
                plot_losses(log.records, out / "loss_curves.png")
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()
    distributed.barrier(dist)  # every rank returns once rank 0 has written the last checkpoint
    return {"out": str(out), "step": end, "val": final_eval, "records": log.records, "is_main": dist.is_main}


BASE_CACHE_AUTO = "base-cache"  # base_cache=auto: this directory inside the run directory


def _base_cache(cfg: TrainConfig, model: MTPModel, train_data: TokenData,
                dist: distributed.DistInfo, amp: str) -> base_cache_io.BaseCache:
    """The frozen base's outputs on the training split (see mtp.base_cache), reused or built
    under autocast `amp` (the resolved --dtype)."""
    if dist.is_distributed:
        raise ConfigError("base_cache runs in one process; drop it under torchrun")
    kind = base_kind(model.cfg.head_type)  # refuses anticausal heads
    ft = cfg.finetuning
    path = Path(cfg.checkpointing.out) / BASE_CACHE_AUTO if ft.base_cache == "auto" else Path(ft.base_cache or "")
    topk = {"data": 0, "self": 1, "distill": ft.distill_topk}[ft.targets]
    spec = base_cache_io.CacheSpec(kind=kind, topk=topk, dtype=ft.base_cache_dtype, autocast=amp)
    cache, _ = base_cache_io.ensure_cache(path, model, train_data, cfg.data.seq_len, model.cfg.n_future, spec,
                                          batch_size=cfg.data.batch_size, chunk_size=cfg.runtime.chunk_size,
                                          device=dist.device, progress=cfg.checkpointing.progress)
    return cache


def _progress(cfg: TrainConfig, start: int, main: bool):
    if not (cfg.checkpointing.progress and main):
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.optimizer.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)


def _write(bar: Any, msg: str) -> None:
    if bar is not None:
        bar.write(msg)
    else:
        print(msg, flush=True)


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but logs are optional
        return None
    return SummaryWriter(log_dir=str(out / "tb"))
