"""Process layout, process-group setup and data-parallel wrapping (DDP or FSDP2) of MTPModel.

Everything that depends on the process layout lives here; the training loop only asks for a
`DistInfo`, wraps the model with `ParallelMTP` and marks the last micro-batch of each step.
The same code runs as one plain process (`python -m mtp.cli train ...`) or under torchrun
(`torchrun --nproc-per-node 2 -m mtp.cli train ...`; several nodes: bench/bench_distributed.py).

Data parallelism with the sequential-head backward
--------------------------------------------------
`mtp.loss.mtp_backward` does not run one forward and one backward per micro-batch. The trunk runs
forward once; each head then runs forward + backward on a detached copy of the trunk output; the
shared norm + unembedding runs forward + backward once per cross-entropy chunk of every head; the
trunk runs backward last. Whole-model wrappers assume one backward per forward: DDP would mark the
unembedding's parameters ready once per chunk ("marked ready twice" errors, or partial sums
all-reduced), and an FSDP2 root over the whole model would run its post-backward callback after
the first head's backward, reducing (and resharding) every other part too early.

So the model is cut into the pieces mtp_backward calls, each wrapped on its own; the wrappers
share MTPModel's modules, so parameter names, state dicts and checkpoints do not change:

    part       modules                   forward + backward calls per micro-batch
    trunk      embedding + trunk blocks  1 (its backward is the last of the micro-batch)
    head i     one head block            1
    unembed    shared norm + output      n_future x chunks (one per cross-entropy chunk)

Each part reduces its gradients EXACTLY ONCE per optimizer step, in its last backward of the
step, with PyTorch's own machinery; every earlier backward only accumulates into .grad locally:
  * trunk and heads sync in the step's last micro-batch only (DDP: the other micro-batches run
    inside `no_sync()`; FSDP2: `set_requires_gradient_sync(False)`).
  * the unembedding syncs only in the last chunk of the last head of the last micro-batch:
    mtp_backward wraps that chunk's forward + backward in `final_unembed()` (its one hook here);
    all other chunks run in `no_sync()` / with gradient sync off.
DDP all-reduces (FSDP2 reduce-scatters) the accumulated .grad, so every rank ends the step with
the mean over ranks of its local mean-loss gradients: the gradient of the global batch, as one
process would compute it. Chained heads (causal/anticausal) need nothing more: each head block
still runs one forward and one backward per micro-batch.

DDP: one DistributedDataParallel per part that has trainable parameters (frozen parts, e.g. the
trunk with `trainable=heads`, stay plain: DDP refuses modules with nothing to train).
FSDP2: `fully_shard` on every trunk block, then on the trunk part (its root group holds the
embedding), on each head and on the unembed part. Every part is its own FSDP root, so one part's
backward never finalises another's. The unembed keeps its weights gathered across chunks
(`reshard_after_backward` off until its final chunk), else it would be all-gathered per chunk.
After each step every root is resharded, so the optimizer's update is seen by the next forward.

Checkpoints are world-size independent: `full_state` gathers the full model and optimizer state
(optimizer state keyed by parameter name) for rank 0 to write; `load_optimizer_state` loads such
a state (or an older one keyed by parameter index) into any layout, sharding it for FSDP2.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .model import ConfigError, MTPModel

STRATEGIES = ("auto", "none", "ddp", "fsdp")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False  # init() created the process group, so destroy() ends it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if dev.type == "cuda":
        # Checked here: torch's own error (on a CPU-only build) comes later, as a traceback.
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r}: no CUDA GPU is available to this torch build "
                              f"(torch {torch.__version__}); use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def init(device: str = "auto", threads: int = 0) -> DistInfo:
    """Read the layout torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT) and join the process group when WORLD_SIZE > 1: gloo on CPU, nccl on CUDA.
    Without torchrun this is one process and no process group. A group that already exists
    (made by the caller) is used as is and left for the caller to destroy.

    threads > 0 sets torch's intra-op threads; 0 gives each process of this node an equal share
    of the CPUs it may run on, so that N processes on N cores do not oversubscribe them."""
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    else:
        world, rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", 1)
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        if dev.index is None:  # "cuda": this process's GPU on the node
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    _set_threads(threads, local_world)
    if rank == 0 and world > 1 and _shared_store_with_restarts():
        warnings.warn("torchrun --max-restarts with its shared TCPStore: restarted workers may read the previous "
                      "attempt's addresses and fail to connect (pytorch/pytorch#135712); launch with "
                      "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment", stacklevel=2)
    owns = False
    if world > 1 and not dist.is_initialized():
        if not dist.is_available():
            raise ConfigError("this PyTorch build has no torch.distributed; run a single process")
        # device_id binds NCCL to this rank's GPU eagerly (no lazy per-collective setup).
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
        owns = True
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev, owns_group=owns)


def _shared_store_with_restarts() -> bool:
    """torchrun shares its rendezvous store with the workers and may restart them: in this
    PyTorch the store outlives a restart, keys included, so a new process group can pick up
    stale peer addresses."""
    return (os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and _env_int("TORCHELASTIC_MAX_RESTARTS", 0) > 0 and _env_int("TORCHELASTIC_RESTART_COUNT", 0) == 0)


def _set_threads(threads: int, local_world: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)
    elif local_world > 1:
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cpus = os.cpu_count() or 1
        torch.set_num_threads(max(1, cpus // local_world))


def destroy(info: DistInfo) -> None:
    """End the process group if init() created it (safe to call more than once)."""
    if info.owns_group and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def sum_over_ranks(t: Tensor, info: DistInfo) -> Tensor:
    """The sum of `t` over ranks, on every rank (for metrics; gradients sync through DDP/FSDP2)."""
    if not info.is_distributed:
        return t
    buf = t.detach().to(info.device, torch.float64)  # NCCL reduces device tensors only
    dist.all_reduce(buf)
    return buf.to(t.device, t.dtype)


def mean_over_ranks(t: Tensor, info: DistInfo) -> Tensor:
    return sum_over_ranks(t, info) / info.world_size


def same_on_all_ranks(value: int, info: DistInfo) -> bool:
    """Whether every rank passed the same `value` (a collective)."""
    if not info.is_distributed:
        return True
    buf = torch.tensor([value, -value], dtype=torch.int64, device=info.device)
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)  # max == min <=> all equal
    return int(buf[0]) == -int(buf[1])


def barrier(info: DistInfo) -> None:
    if info.is_distributed:
        dist.barrier()


def resolve_strategy(name: str, info: DistInfo) -> str:
    """auto -> ddp with several processes, none with one. One process never wraps the model."""
    if name not in STRATEGIES:
        raise ConfigError(f"parallel must be one of {', '.join(STRATEGIES)}, got {name!r}")
    if not info.is_distributed:
        return "none"
    if name == "none":
        raise ConfigError(f"parallel=none with {info.world_size} processes would train {info.world_size} "
                          "diverging copies; use auto, ddp or fsdp")
    return "ddp" if name == "auto" else name


def checkpoint_activations(model: MTPModel) -> None:
    """Recompute each trunk and head block's activations in backward instead of storing them.
    Non-reentrant checkpointing on the block's own forward: module hooks (DDP, FSDP2) and
    parameter names stay as they are."""
    from torch.utils.checkpoint import checkpoint

    def wrap(forward: Callable[..., Tensor]) -> Callable[..., Tensor]:
        def run(*args: Any, **kwargs: Any) -> Tensor:
            if not torch.is_grad_enabled():  # eval / decoding: nothing to save
                return forward(*args, **kwargs)
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return run

    for block in [*model.trunk_layers, *model.heads]:
        block.forward = wrap(block.forward)  # type: ignore[method-assign]


class _Part(nn.Module):
    """A piece of MTPModel with its own forward, registering the model's own submodules (same
    parameters), so that DDP / fully_shard can wrap it alone."""

    def __init__(self, forward: Callable[..., Tensor], **modules: nn.Module) -> None:
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)
        self._fn = forward

    def forward(self, *args: Any) -> Tensor:
        return self._fn(*args)


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


class ParallelMTP:
    """MTPModel split into separately wrapped parts (see the module docstring), with the interface
    `mtp_backward` and `evaluate` use: cfg, rope, default_positions, trunk, heads, unembed,
    head_order, head_parent, final_unembed, __call__, train/eval.

    Use `micro_batch(last)` around each micro-batch's mtp_backward: gradients are synchronised in
    the micro-batch with last=True only."""

    def __init__(self, model: MTPModel, strategy: str, device: torch.device) -> None:
        if strategy not in ("ddp", "fsdp"):
            raise ValueError(f"strategy must be ddp or fsdp, got {strategy!r}")
        if model.cfg.head_type == "sequential":
            # Its heads read the shared embedding, which here belongs to the wrapped trunk part.
            raise ConfigError("sequential heads do not train under DDP/FSDP2 yet; train them in one process")
        self.model = model
        self.cfg = model.cfg
        self.strategy = strategy
        self.rope = model.rope
        self.default_positions = model.default_positions
        self.head_order = model.head_order
        self.head_parent = model.head_parent
        trunk: nn.Module = _Part(model.trunk, tok_embeddings=model.tok_embeddings, trunk_layers=model.trunk_layers)
        unembed: nn.Module = _Part(model.unembed, norm=model.norm, output=model.output)
        heads: list[nn.Module] = list(model.heads)
        # DDP / FSDP2 modules (or plain ones), typed Any for their strategy-specific methods.
        self._trunk: Any
        self._unembed: Any
        self._heads: list[Any]
        self._synced: list[Any]  # parts that sync per micro-batch (all but the unembedding)
        self._roots: list[Any] = []  # FSDP2 roots
        self._last = True  # inside the step's last micro-batch
        self._unembed_sync = False  # inside final_unembed() of the last micro-batch
        if strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [device.index] if device.type == "cuda" else None

            def wrap(m: nn.Module) -> nn.Module:
                return DDP(m, device_ids=ids) if _trainable(m) else m

            self._trunk, self._unembed = wrap(trunk), wrap(unembed)
            self._heads = [wrap(h) for h in heads]
            self._synced = [m for m in [self._trunk, *self._heads] if isinstance(m, DDP)]
        else:
            from torch.distributed.fsdp import fully_shard

            for block in model.trunk_layers:
                fully_shard(block)
            self._trunk, self._unembed = fully_shard(trunk), fully_shard(unembed)
            self._heads = [fully_shard(h) for h in heads]
            self._roots = [self._trunk, *self._heads, self._unembed]
            self._synced = [self._trunk, *self._heads]
            self._unembed.set_requires_gradient_sync(False)
            self._unembed.set_reshard_after_backward(False)

    # ----- the pieces mtp_backward calls ------------------------------------------------------
    def trunk(self, tokens: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        return self._trunk(tokens, rope)

    @property
    def heads(self) -> list[nn.Module]:
        return self._heads

    def unembed(self, h: Tensor) -> Tensor:
        if self.strategy == "ddp" and not self._unembed_sync and hasattr(self._unembed, "no_sync"):
            with self._unembed.no_sync():  # DDP decides at forward time whether backward syncs
                return self._unembed(h)
        return self._unembed(h)

    @contextmanager
    def final_unembed(self) -> Iterator[None]:
        """Around the forward + backward of the unembedding's last chunk in a micro-batch: the
        one that synchronises its gradients, if this is the step's last micro-batch."""
        if not self._last:
            yield
            return
        fsdp = self.strategy == "fsdp"
        self._unembed_sync = True
        if fsdp:
            self._unembed.set_requires_gradient_sync(True)
            self._unembed.set_reshard_after_backward(True)
        try:
            yield
        finally:
            self._unembed_sync = False
            if fsdp:
                self._unembed.set_requires_gradient_sync(False)
                self._unembed.set_reshard_after_backward(False)

    @contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        """Run one micro-batch's mtp_backward in here; gradients sync only when `last`."""
        self._last = last
        with ExitStack() as stack:
            for m in self._synced:
                if self.strategy == "ddp":
                    if not last:
                        stack.enter_context(m.no_sync())
                else:
                    m.set_requires_gradient_sync(last)
            yield
        if last:
            self.reshard()

    def reshard(self) -> None:
        """Free FSDP2's gathered parameters (no-op for DDP), e.g. after evaluation, and so that
        the next forward gathers the optimizer's update rather than a stale copy."""
        for m in self._roots:
            m.reshard()

    # ----- inference (evaluation during training) ---------------------------------------------
    def __call__(self, tokens: Tensor) -> Tensor:
        """Logits (B, T, n_future, V) as MTPModel.forward without a KV cache."""
        if self.strategy == "ddp":  # every rank holds the full model: no wrapper needed
            return self.model(tokens)
        if tokens.shape[1] > self.cfg.max_seq_len:
            raise ConfigError(f"sequence of {tokens.shape[1]} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        rope = self.rope(self.default_positions(tokens))
        z = self.trunk(tokens, rope)
        outs: dict[int, Tensor] = {}
        for i in self.head_order():
            parent = self.head_parent(i)
            outs[i] = self._heads[i](z if parent < 0 else outs[parent], rope)
        logits = self._unembed(torch.stack([outs[i] for i in range(self.cfg.n_future)], dim=2))
        return logits

    @property
    def training(self) -> bool:
        return self.model.training

    def train(self, mode: bool = True) -> "ParallelMTP":
        self.model.train(mode)
        return self

    def eval(self) -> "ParallelMTP":
        return self.train(False)


# ----- checkpoint state ----------------------------------------------------------------------------

def _full_options(cpu_offload: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)


def full_state(model: MTPModel, opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(model state dict, optimizer state dict keyed by parameter name), both full (unsharded)
    CPU tensors, on rank 0; other ranks get empty dicts. A collective under FSDP2: every rank
    must call it. Loadable by any world size and strategy."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, opt, options=_full_options(cpu_offload=True))


def load_optimizer_state(model: MTPModel, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full optimizer state (from `full_state`, or an older `opt.state_dict()` keyed by
    parameter index) into `opt` on every rank; FSDP2 keeps each rank's shard of it."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, _by_name(model, opt, state), options=_full_options(cpu_offload=False))


def _by_name(model: MTPModel, opt: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """Re-key a `torch.optim.Optimizer.state_dict()` (parameters numbered in param-group order)
    by parameter name, the format `full_state` writes; a name-keyed state is returned as is."""
    groups = state["param_groups"]
    if not groups or not groups[0]["params"] or isinstance(groups[0]["params"][0], str):
        return state
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    if len(order) != sum(len(g["params"]) for g in groups):
        raise ConfigError("the checkpoint's optimizer state does not match the model's trainable parameters")
    return {
        "state": {order[i]: s for i, s in state["state"].items()},
        "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in groups],
    }
