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

What heads 2..n learn (`mtp_backward(targets=...)`): "data", the corpus token x_{t+i}; "self",
head 1's greedy token for x_{t+i} (its argmax at position t+i-1); "distill", head 1's whole
distribution there, cut to its k likeliest tokens and renormalised (KL(teacher || head), see
`chunked_kl_backward`). Head 1 always learns the data. With "self" and "distill", head i has a
target at t < T - i + 1 (1-based i): head 1's output at t+i-1 must be among the T computed.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .model import MTPModel

IGNORE = -100
TARGETS = ("data", "self", "distill")  # what heads 2..n learn; see the module docstring


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


def _chunked_backward(model: MTPModel, hidden: Tensor, count: int, scale: float, chunk_size: int | None,
                      final: bool, unembed: Callable[[Tensor], Tensor],
                      chunk_loss: Callable[[Tensor, slice], Tensor]) -> Tensor:
    """Sum over chunks of rows of chunk_loss(logits of the chunk, its rows), each chunk's
    scale / count times it backpropagated at once, so at most `chunk_size` rows of logits exist;
    returns the detached sum. `final` as in `chunked_ce_backward`."""
    N = hidden.shape[0]
    total = torch.zeros((), device=hidden.device)
    step = N if chunk_size is None else max(1, chunk_size)
    final_hook = getattr(model, "final_unembed", None) if final else None
    for start in range(0, N, step):
        rows = slice(start, start + step)
        last = final_hook is not None and start + step >= N
        with final_hook() if last else nullcontext():
            # No Python name for the logits here: autograd saves only what the loss needs, so
            # they are freed before backward (3 logits-sized buffers at the peak instead of 4).
            loss = chunk_loss(_upcast(unembed(hidden[rows])), rows)
            if loss.requires_grad:  # False when this head and its input are frozen (finetuning)
                (loss * (scale / count)).backward()
        total += loss.detach()
        del loss
    return total


def chunked_ce_backward(model: MTPModel, hidden: Tensor, targets: Tensor, scale: float,
                        chunk_size: int | None, final: bool = False,
                        unembed: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy of one head from its hidden states, backpropagated chunk by chunk.

    `hidden` (N, d) must be a leaf that requires grad: its .grad receives d(scale * loss)/d hidden,
    and the shared norm/unembedding receive their gradients. At most `chunk_size` rows of logits
    exist at a time (all rows when None). Returns (loss, number of counted targets), detached.
    `final`: no later call uses the unembedding in this micro-batch; a data-parallel model
    (mtp.distributed.ParallelMTP) then syncs the unembedding's gradients in the last chunk.
    `unembed`: hidden -> logits (default `model.unembed`; draft heads: `model.draft_logits`)."""
    count = int((targets != IGNORE).sum())
    if count == 0:
        return torch.zeros((), device=hidden.device), torch.tensor(0)
    total = _chunked_backward(
        model, hidden, count, scale, chunk_size, final, unembed or model.unembed,
        lambda logits, rows: F.cross_entropy(logits, targets[rows], ignore_index=IGNORE, reduction="sum"))
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


@torch.no_grad()
def head1_outputs(model: MTPModel, h: Tensor, k: int, chunk_size: int | None,
                  next_tokens: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Head 1's k likeliest next tokens at every position of its output `h` (B, T, d): ids (B, T, k)
    (long, likeliest first) and their probabilities (B, T, k) (float32 or wider, not renormalised: their sum
    is the mass the k tokens hold). With `next_tokens` (B, T) also head 1's negative log-likelihood
    of them (B, T) (IGNORE entries give 0). Logits exist for `chunk_size` positions at a time."""
    B, T, d = h.shape
    flat = h.reshape(-1, d)
    nxt = None if next_tokens is None else next_tokens.reshape(-1)
    step = flat.shape[0] if chunk_size is None else max(1, chunk_size)
    ids, probs, nll = [], [], []
    for s in range(0, flat.shape[0], step):
        logits = _upcast(model.unembed(flat[s : s + step]))
        lse = logits.logsumexp(-1, keepdim=True)
        top, idx = logits.topk(min(k, logits.shape[-1]), dim=-1)  # ranked by logit: ids[..., 0] is the argmax
        ids.append(idx)
        probs.append((top - lse).exp())
        if nxt is not None:
            t = nxt[s : s + step]
            picked = (lse - logits.gather(-1, t.clamp(min=0)[:, None]))[:, 0]
            nll.append(picked.masked_fill(t == IGNORE, 0.0))
    shape = (B, T, ids[0].shape[-1])
    return (torch.cat(ids).view(shape), torch.cat(probs).view(shape),
            None if nxt is None else torch.cat(nll).view(B, T))


def shifted_teacher(ids: Tensor, probs: Tensor, i: int) -> tuple[Tensor, Tensor]:
    """Soft targets of head index i >= 1 (0-based) from head 1's top-k (B, T, k): at position t,
    head 1's distribution at t + i (its prediction of the same token x_{t+i+1}), renormalised
    over the k tokens; probabilities in float32 or wider, all zero (no target) at t >= T - i."""
    T = ids.shape[1]
    out_ids = torch.zeros_like(ids)
    out_p = torch.zeros(probs.shape, dtype=torch.promote_types(probs.dtype, torch.float32), device=probs.device)
    if T > i:
        p = probs[:, i:].to(out_p.dtype)
        out_ids[:, : T - i] = ids[:, i:]
        out_p[:, : T - i] = p / p.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    return out_ids, out_p


def chunked_kl_backward(model: MTPModel, hidden: Tensor, ids: Tensor, probs: Tensor, scale: float,
                        chunk_size: int | None, final: bool = False,
                        unembed: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Mean KL(teacher || head) of one head from its hidden states, backpropagated chunk by chunk.

    The teacher at row r puts probability probs[r, j] on token ids[r, j] (N, k), renormalised
    top-k, and nothing elsewhere; rows whose probs are all zero have no target. The gradient is
    that of the cross-entropy -sum_j p_j log q(ids_j), which differs from the KL only by the
    teacher's entropy, a constant; the KL is what is returned (0 when the head matches the
    teacher), with the number of rows counted. `hidden`, `chunk_size`, `scale`, `final` and
    `unembed` as in `chunked_ce_backward`: at most `chunk_size` rows of logits exist at a time."""
    count = int((probs.sum(-1) > 0).sum())
    if count == 0:
        return torch.zeros((), device=hidden.device), torch.tensor(0)
    neg_entropy = torch.xlogy(probs, probs).sum().double()  # sum of p log p over the teacher rows

    def cross_entropy(logits: Tensor, rows: slice) -> Tensor:
        logq = logits.log_softmax(-1)
        return -(probs[rows].to(logq.dtype) * logq.gather(-1, ids[rows])).sum()

    total = _chunked_backward(model, hidden, count, scale, chunk_size, final, unembed or model.unembed,
                              cross_entropy)
    return ((total.double() + neg_entropy) / count).to(total.dtype), torch.tensor(count)


def draft_index(draft_ids: Tensor, vocab_size: int) -> Tensor:
    """(V,) the position of each token in the draft vocabulary `draft_ids` (K,), -1 outside it."""
    index = torch.full((vocab_size,), -1, dtype=torch.long, device=draft_ids.device)
    index[draft_ids] = torch.arange(len(draft_ids), device=draft_ids.device)
    return index


def to_draft_targets(targets: Tensor, index: Tensor) -> Tensor:
    """Token targets as positions in the draft vocabulary (`draft_index`); a target outside it
    becomes IGNORE: a draft head cannot propose it, so it learns the distribution within it."""
    valid = targets != IGNORE
    out = torch.full_like(targets, IGNORE)
    out[valid] = index[targets[valid]]
    return out.masked_fill(out < 0, IGNORE)


def to_draft_teacher(ids: Tensor, probs: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """A top-k teacher (ids, renormalised probs) restricted to the draft vocabulary and
    renormalised again; rows with no mass inside it have no target (all zero)."""
    pos = index[ids]
    p = probs * (pos >= 0)
    return pos.clamp(min=0), p / p.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)


@dataclass
class BaseOutputs:
    """What the frozen base (trunk, head 1, norm and unembedding) computes for a batch, read from
    a cache (mtp.base_cache) so that heads-only training never runs it. `hidden` (B, T, dim) is
    what the trained heads read: the trunk output z for parallel and linear heads
    (`kind="z"`), head 1's output for causal and sequential heads (`kind="h1"`). `nll` (B, T): head
    1's negative log-likelihood of the next token (its logged loss). `topk_ids`/`topk_probs`
    (B, T, k): head 1's likeliest tokens and their probabilities (see `head1_outputs`), for
    targets "self" (k >= 1) and "distill"."""

    kind: str
    hidden: Tensor
    nll: Tensor
    topk_ids: Tensor | None = None
    topk_probs: Tensor | None = None


def base_kind(head_type: str) -> str:
    """What heads 2..n of `head_type` read from the frozen base: "z" or "h1" (see `BaseOutputs`)."""
    if head_type in ("parallel", "linear"):
        return "z"
    if head_type in ("causal", "sequential"):
        return "h1"
    raise ValueError(f"{head_type} heads read no fixed output of the base (head 1 comes last): "
                     "they cannot train from cached base outputs")


def mtp_backward(model: MTPModel, tokens: Tensor, weights: Sequence[float] | None = None, *,
                 seq_len: int | None = None, chunk_size: int | None = None,
                 loss_scale: float = 1.0, self_distill: bool = False, targets: str = "data",
                 distill_topk: int = 32, base: BaseOutputs | None = None) -> tuple[Tensor, Tensor]:
    """Memory-efficient training step (forward and backward); returns (loss, per-head losses).

    The trunk runs forward once; each head then runs forward and backward on a detached copy of
    its input, so only one head's activations and logits are alive at a time, and its gradient
    piles up at the trunk output; the trunk runs backward once at the end. Gradients equal those
    of `(loss_scale * mtp_loss(model(tokens[:, :T]), tokens)[0]).backward()`.
    With `chunk_size`, each head's cross-entropy is computed over at most that many positions at a
    time, so not even one head's full (B*T, V) logits exist. Call inside autocast if wanted.
    `model` may also be a data-parallel `mtp.distributed.ParallelMTP` (same pieces, wrapped).
    `targets`: what heads 2..n learn (module docstring): "data", "self" (head 1's greedy tokens,
    `self_distill_targets`; `self_distill=True` is the same) or "distill" (KL to head 1's
    distribution cut to its `distill_topk` likeliest tokens; their per-head loss is that KL).
    `base`: the frozen base's outputs for `tokens`, precomputed (`BaseOutputs`); then neither the
    trunk nor head 1 runs, head 1's loss is read from `base.nll`, and trunk, head 1, norm and
    unembedding must be frozen.
    A model with a draft vocabulary (`model.draft_ids`, cfg.draft_vocab > 0) scores heads 2..n
    over those K tokens only (`model.draft_logits`, a slice of the unembedding): targets outside
    them are ignored, a teacher is restricted to them and renormalised (`to_draft_targets`,
    `to_draft_teacher`); head 1 keeps the full vocabulary."""
    mode = "self" if self_distill else targets
    if mode not in TARGETS:
        raise ValueError(f"targets must be one of {', '.join(TARGETS)}, got {mode!r}")
    if distill_topk < 1:
        raise ValueError(f"distill_topk must be >= 1, got {distill_topk}")
    n = model.cfg.n_future
    w = _head_weights(n, weights)
    B, L = tokens.shape
    T = L if seq_len is None else seq_len
    head_type = model.cfg.head_type
    sequential = head_type == "sequential"
    if mode != "data" and head_type == "anticausal":
        raise ValueError(f"targets={mode} needs head 1 to read the trunk output; anticausal heads do not")
    targets_t = align_targets(tokens, n, T, sequential)
    inputs = tokens[:, :T]
    rope = model.rope(model.default_positions(inputs))
    if base is not None:
        _check_base(model, base, mode, distill_topk, B, T)
        z = base.hidden if base.kind == "z" else None
    else:
        z = model.trunk(inputs, rope)
    z_leaf = None if z is None else z.detach().requires_grad_(z.requires_grad)  # a frozen trunk needs no gradient
    per_head = torch.zeros(n, device=tokens.device)
    # The last head whose cross-entropy runs (heads without targets skip it) is the unembedding's
    # last use in this call; data-parallel wrappers sync its gradients there.
    ce_order = list(range(n)) if head_type in ("parallel", "linear") else model.head_order()[::-1]
    has_targets = (targets_t != IGNORE).flatten(0, 1).any(0).tolist()
    if mode != "data":  # head index i >= 1 learns from head 1 at t < T - i: some exist when T > i
        has_targets[1:] = [T > i for i in range(1, n)]
    if base is not None:
        has_targets[0] = False  # head 1's loss comes from the cache; it runs nowhere
        if bool((targets_t[:, :, 0] != IGNORE).any()):
            valid = targets_t[:, :, 0] != IGNORE
            per_head[0] = base.nll.float()[valid].mean()
    final_head = next((i for i in reversed(ce_order) if has_targets[i]), -1)
    teacher: tuple[Tensor, Tensor] | None = None  # head 1's top-k (ids, probs), for "distill"
    draft_ids = getattr(model, "draft_ids", None)
    index = None if draft_ids is None else draft_index(draft_ids, model.cfg.vocab_size)

    def learn_from_head1(h1: Tensor | None) -> None:
        """Targets of heads 2..n from head 1's output (or the cached top-k when h1 is None)."""
        nonlocal targets_t, teacher
        if mode == "data":
            return
        if h1 is None:
            assert base is not None and base.topk_ids is not None and base.topk_probs is not None
            ids, probs = base.topk_ids.long(), base.topk_probs
        elif mode == "self":
            ids, probs = greedy_labels(model, h1.detach(), chunk_size)[..., None], None
        else:
            ids, probs, _ = head1_outputs(model, h1.detach(), distill_topk, chunk_size)
        if mode == "self":
            targets_t = self_distill_targets(targets_t, ids[..., 0])
        else:
            assert probs is not None
            teacher = (ids[..., :distill_topk], probs[..., :distill_topk])

    def head_loss(i: int, out: Tensor) -> Tensor:
        """Loss of head i on `out`; returns d loss / d out (gradient flowing into this head)."""
        out_leaf = out.detach().requires_grad_(out.requires_grad)
        draft = index is not None and i > 0
        unembed = model.draft_logits if draft else None
        if mode == "distill" and i > 0:
            assert teacher is not None
            ids, probs = shifted_teacher(*teacher, i)
            if draft:
                ids, probs = to_draft_teacher(ids, probs, index)
            loss, _ = chunked_kl_backward(model, out_leaf.view(B * T, -1), ids.view(B * T, -1),
                                          probs.view(B * T, -1), loss_scale * w[i], chunk_size,
                                          final=i == final_head, unembed=unembed)
        else:
            t = targets_t[:, :, i] if not draft else to_draft_targets(targets_t[:, :, i], index)
            loss, _ = chunked_ce_backward(model, out_leaf.view(B * T, -1), t.reshape(-1),
                                          loss_scale * w[i], chunk_size, final=i == final_head, unembed=unembed)
        per_head[i] = loss
        return out_leaf.grad if out_leaf.grad is not None else torch.zeros_like(out)

    if head_type in ("parallel", "linear"):
        # Heads are independent: forward + backward one at a time.
        if base is not None:
            learn_from_head1(None)
        for i in range(n):
            if base is not None and i == 0:
                continue  # head 1 is frozen and its loss cached
            out = model.heads[i](z_leaf, rope)
            if i == 0:  # head 1's output gives heads 2..n their targets, before they need them
                learn_from_head1(out)
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
            if base is not None and i == 0:
                outs[0] = base.hidden  # head 1's output, frozen
                continue
            parent = model.head_parent(i)
            x = z_leaf if parent < 0 else outs[parent].detach().requires_grad_(outs[parent].requires_grad)
            inputs_of[i] = x
            # A sequential head also reads the tokens ahead, through the shared embedding, whose
            # gradient therefore arrives from here as well as from the trunk.
            emb = model.ahead_embedding(inputs, i) if sequential and i > 0 else None
            outs[i] = model.heads[i](x, rope) if emb is None else model.heads[i](x, emb, rope)
        learn_from_head1(None if base is not None else outs[0])
        for i in reversed(order):
            if base is not None and i == 0:
                del outs[0]
                continue
            grad = head_loss(i, outs[i])
            child = [c for c in order if model.head_parent(c) == i]
            for c in child:
                if inputs_of[c].grad is not None:
                    grad = grad + inputs_of[c].grad
            if outs[i].requires_grad:
                outs[i].backward(grad)
            del outs[i]
    if z is not None and z.requires_grad and z_leaf is not None and z_leaf.grad is not None:
        z.backward(z_leaf.grad)
    w_t = torch.tensor(w, device=per_head.device)
    return (w_t * per_head).sum().detach(), per_head.detach()


def _check_base(model: MTPModel, base: BaseOutputs, mode: str, distill_topk: int, B: int, T: int) -> None:
    want = base_kind(model.cfg.head_type)
    if base.kind != want:
        raise ValueError(f"{model.cfg.head_type} heads read the base's {want!r}, the cache holds {base.kind!r}")
    if tuple(base.hidden.shape[:2]) != (B, T) or tuple(base.nll.shape) != (B, T):
        raise ValueError(f"cached base outputs cover {tuple(base.hidden.shape[:2])} positions, the batch {(B, T)}")
    frozen = [model.tok_embeddings, *model.trunk_layers, model.heads[0], model.norm, model.output]
    if any(p.requires_grad for m in frozen for p in m.parameters()):
        raise ValueError("cached base outputs need the embedding, trunk, head 1, norm and unembedding frozen "
                         "(trainable=extra_heads)")
    k = 0 if base.topk_ids is None or base.topk_probs is None else base.topk_ids.shape[-1]
    need = {"data": 0, "self": 1, "distill": distill_topk}[mode]
    if k < need:
        raise ValueError(f"targets={mode} needs head 1's top-{need} tokens; the cache holds its top-{k}")
