"""Multi-token losses: target alignment, the reference loss, and the memory-efficient step.

Target alignment (`align_targets`), for a window of L tokens fed as inputs x_0..x_{T-1}
(T = L - extra, extra >= 0 extra tokens at the end give every head full targets):

    head i (1-based) at position t  ->  target x_{t+i}      if t+i < L
                                    ->  IGNORE (-100)       otherwise (never wrapped around)

    e.g. L = T = 4, n = 2:    t = 0   1   2   3
                     head 1:      x1  x2  x3  -
                     head 2:      x2  x3  -   -

Sequential heads (head i reads the input token x_{t+i-1} as well) also need that token among the
inputs, t+i-1 < T, so with extra tokens (L > T) their last i-1 positions stay IGNORE.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .model import MTPModel

IGNORE = -100


def align_targets(tokens: Tensor, n_future: int, seq_len: int | None = None, sequential: bool = False) -> Tensor:
    """Targets (B, T, n_future) for inputs tokens[:, :T]; see the module docstring for the table.
    `sequential`: heads read x_{t+i-1} too, so it must be an input (head_type="sequential")."""
    B, L = tokens.shape
    T = L if seq_len is None else seq_len
    if T > L:
        raise ValueError(f"seq_len={T} is longer than the {L} tokens given")
    targets = torch.full((B, T, n_future), IGNORE, dtype=torch.long, device=tokens.device)
    for i in range(1, n_future + 1):
        m = min(T, L - i)  # positions t < m have x_{t+i} inside the window
        if sequential:
            m = min(m, T - i + 1)  # ... and x_{t+i-1} among the inputs
        if m > 0:
            targets[:, :m, i - 1] = tokens[:, i : i + m]
    return targets


def _upcast(x: Tensor) -> Tensor:
    """Cross-entropy in at least fp32 (bf16 logits lose too much); fp64 stays fp64."""
    return x.float() if x.element_size() < 4 else x


def _head_weights(n: int, weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise ValueError(f"got {len(weights)} head weights for {n} heads")
    return [float(w) for w in weights]


def mtp_loss(logits: Tensor, tokens: Tensor, weights: Sequence[float] | None = None, *,
             sequential: bool = False) -> tuple[Tensor, Tensor]:
    """Reference loss: sum over heads of (weight x mean cross-entropy). Returns (loss, per-head losses).

    logits: (B, T, n, V) from `MTPModel.forward(tokens[:, :T])`; tokens: (B, L >= T); `sequential`
    for a model with head_type="sequential" (see `align_targets`)."""
    B, T, n, V = logits.shape
    targets = align_targets(tokens, n, T, sequential)
    per_head = torch.stack([
        F.cross_entropy(_upcast(logits[:, :, i].reshape(-1, V)), targets[:, :, i].reshape(-1), ignore_index=IGNORE)
        for i in range(n)
    ])
    w = torch.tensor(_head_weights(n, weights), device=per_head.device, dtype=per_head.dtype)
    return (w * per_head).sum(), per_head


def chunked_ce_backward(model: MTPModel, hidden: Tensor, targets: Tensor, scale: float,
                        chunk_size: int | None, final: bool = False) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy of one head from its hidden states, backpropagated chunk by chunk.

    `hidden` (N, d) must be a leaf that requires grad: its .grad receives d(scale * loss)/d hidden,
    and the shared norm/unembedding receive their gradients. At most `chunk_size` rows of logits
    exist at a time (all rows when None). Returns (loss, number of counted targets), detached.
    `final`: no later call uses the unembedding in this micro-batch; a data-parallel model
    (mtp.distributed.ParallelMTP) then syncs the unembedding's gradients in the last chunk."""
    N = hidden.shape[0]
    count = int((targets != IGNORE).sum())
    total = torch.zeros((), device=hidden.device)
    if count == 0:
        return total, torch.tensor(0)
    step = N if chunk_size is None else max(1, chunk_size)
    final_hook = getattr(model, "final_unembed", None) if final else None
    for start in range(0, N, step):
        h = hidden[start : start + step]
        t = targets[start : start + step]
        last = final_hook is not None and start + step >= N
        with final_hook() if last else nullcontext():
            # No Python name for the logits: autograd saves only the log-softmax output, so the
            # logits are freed before backward (3 logits-sized buffers at the peak instead of 4).
            ce = F.cross_entropy(_upcast(model.unembed(h)), t, ignore_index=IGNORE, reduction="sum")
            if ce.requires_grad:  # False when this head and its input are frozen (finetuning)
                (ce * (scale / count)).backward()
        total += ce.detach()
        del ce
    return total / count, torch.tensor(count)


@torch.no_grad()
def greedy_labels(model: MTPModel, h: Tensor, chunk_size: int | None) -> Tensor:
    """Argmax (B, T) of head 1's output `h` (B, T, d): the model's own greedy next tokens."""
    flat = h.reshape(-1, h.shape[-1])
    step = flat.shape[0] if chunk_size is None else max(1, chunk_size)
    return torch.cat([model.unembed(flat[s : s + step]).argmax(-1) for s in range(0, flat.shape[0], step)]).view(
        h.shape[:-1])


def self_distill_targets(targets: Tensor, greedy: Tensor) -> Tensor:
    """Targets where head i >= 2 at position t learns greedy[t + i - 1], head 1's prediction of the
    same token x_{t+i}: the drafts then aim at what verification accepts, not at the corpus."""
    out = targets.clone()
    T = greedy.shape[1]
    for i in range(1, targets.shape[2]):
        out[:, :, i] = IGNORE
        out[:, : T - i, i] = greedy[:, i:]
    return out


def mtp_backward(model: MTPModel, tokens: Tensor, weights: Sequence[float] | None = None, *,
                 seq_len: int | None = None, chunk_size: int | None = None,
                 loss_scale: float = 1.0, self_distill: bool = False) -> tuple[Tensor, Tensor]:
    """Memory-efficient training step (forward and backward); returns (loss, per-head losses).

    The trunk runs forward once; each head then runs forward and backward on a detached copy of
    its input, so only one head's activations and logits are alive at a time, and its gradient
    piles up at the trunk output; the trunk runs backward once at the end. Gradients equal those
    of `(loss_scale * mtp_loss(model(tokens[:, :T]), tokens)[0]).backward()`.
    With `chunk_size`, each head's cross-entropy is computed over at most that many positions at a
    time, so not even one head's full (B*T, V) logits exist. Call inside autocast if wanted.
    `model` may also be a data-parallel `mtp.distributed.ParallelMTP` (same pieces, wrapped).
    `self_distill`: heads 2..n learn head 1's greedy tokens (`self_distill_targets`), not the data."""
    n = model.cfg.n_future
    w = _head_weights(n, weights)
    B, L = tokens.shape
    T = L if seq_len is None else seq_len
    sequential = model.cfg.head_type == "sequential"
    targets = align_targets(tokens, n, T, sequential)
    inputs = tokens[:, :T]
    rope = model.rope(model.default_positions(inputs))
    z = model.trunk(inputs, rope)
    z_leaf = z.detach().requires_grad_(z.requires_grad)  # a frozen trunk needs no gradient
    if self_distill and model.cfg.head_type == "anticausal":
        raise ValueError("self-distillation needs head 1 to read the trunk output; anticausal heads do not")
    per_head = torch.zeros(n, device=tokens.device)
    # The last head whose cross-entropy runs (heads without targets skip it) is the unembedding's
    # last use in this call; data-parallel wrappers sync its gradients there.
    ce_order = list(range(n)) if model.cfg.head_type in ("parallel", "linear") else model.head_order()[::-1]
    has_targets = (targets != IGNORE).flatten(0, 1).any(0).tolist()
    if self_distill:  # head index i >= 1 learns head 1's labels at t < T - i: some exist when T > i
        has_targets[1:] = [T > i for i in range(1, n)]
    final_head = next((i for i in reversed(ce_order) if has_targets[i]), -1)

    def head_loss(i: int, out: Tensor) -> Tensor:
        """CE of head i on `out`; returns d loss / d out (gradient flowing into this head)."""
        out_leaf = out.detach().requires_grad_(out.requires_grad)
        loss, _ = chunked_ce_backward(model, out_leaf.view(B * T, -1), targets[:, :, i].reshape(-1),
                                      loss_scale * w[i], chunk_size, final=i == final_head)
        per_head[i] = loss
        return out_leaf.grad if out_leaf.grad is not None else torch.zeros_like(out)

    if model.cfg.head_type in ("parallel", "linear"):
        # Heads are independent: forward + backward one at a time.
        for i in range(n):
            out = model.heads[i](z_leaf, rope)
            if i == 0 and self_distill:  # labels from head 1's output, before heads 2..n need them
                targets = self_distill_targets(targets, greedy_labels(model, out.detach(), chunk_size))
            grad = head_loss(i, out)
            if out.requires_grad:
                out.backward(grad)
            del out
    else:
        # Chained heads (causal / anticausal): head i feeds its child, so run the chain forward
        # with a cut between heads, then backward from the last head to the first, passing the
        # gradient at each cut to the parent. Logits still exist for one head (chunk) at a time.
        inputs_of: dict[int, Tensor] = {}
        outs: dict[int, Tensor] = {}
        order = model.head_order()
        for i in order:
            parent = model.head_parent(i)
            x = z_leaf if parent < 0 else outs[parent].detach().requires_grad_(outs[parent].requires_grad)
            inputs_of[i] = x
            # A sequential head also reads the tokens ahead, through the shared embedding, whose
            # gradient therefore arrives from here as well as from the trunk.
            emb = model.ahead_embedding(inputs, i) if sequential and i > 0 else None
            outs[i] = model.heads[i](x, rope) if emb is None else model.heads[i](x, emb, rope)
        if self_distill:
            targets = self_distill_targets(targets, greedy_labels(model, outs[0].detach(), chunk_size))
        for i in reversed(order):
            grad = head_loss(i, outs[i])
            child = [c for c in order if model.head_parent(c) == i]
            for c in child:
                if inputs_of[c].grad is not None:
                    grad = grad + inputs_of[c].grad
            if outs[i].requires_grad:
                outs[i].backward(grad)
            del outs[i]
    if z.requires_grad and z_leaf.grad is not None:
        z.backward(z_leaf.grad)
    w_t = torch.tensor(w, device=per_head.device)
    return (w_t * per_head).sum().detach(), per_head.detach()
