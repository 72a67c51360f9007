"""Self-speculative decoding: the extra heads of a multi-token model draft, head 1 verifies.

Greedy, chain of k drafts (blockwise parallel decoding, Stern et al. 2018; Gloeckle et al. 2024,
sec. 3.2): after a pass, head 1 gives the next token y and heads 2..k+1 give drafts d1..dk. One
forward over [y, d1..dk] at positions p..p+k lets head 1 check every draft at once: draft j is
accepted when head 1 at the previous position predicts it, the longest agreeing prefix (a drafts)
is kept, head 1's prediction after it is a free bonus token, and heads 2..k+1 there draft the next
block. Each pass commits a+1 tokens and the output equals plain greedy decoding token for token.
Only head 1 runs on every draft; heads 2..k+1 run afterwards on the a+1 committed tokens alone,
which is all their caches and the next drafts need.

Tree (Medusa, Cai et al. 2024): the top candidates of each head form a tree (e.g. top-3 of head 2
x top-2 of head 3 x top-1 of head 4). All nodes are verified in one forward: node i writes cache
slot p+i, sits at RoPE position p+depth and attends to the prefix plus its ancestors. The longest
accepted path is then copied into consecutive slots (`MTPModel.cache_move`).

Sampling (Leviathan et al. 2023, Chen et al. 2023): draft j is drawn from head j+1's distribution
q, accepted with probability min(1, p(d)/q(d)) where p is head 1's distribution in the verify
pass, and on rejection the token is redrawn from norm(max(0, p - q)). The output then has exactly
the distribution of plain sampling with the same temperature / top-k / top-p.

Rows of a batch accept different numbers of tokens; each keeps its own position (see
`mtp.generate`). Drafts are cut so that no row verifies more tokens than it may still emit, and
the cut-off inputs write to the scratch slot, so blocks fit in the cache near the context end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .generate import (
    GenerationError, GenerationResult, RowState, TokenCallback, cache_length, check_prompts,
    check_sampling, commit_rows, greedy_token, make_generator, pad_prompts, prefill_rows, sampling_probs, scratch_slots,
    setup_decode_cache, token_limits,
)
from .compiled import compiled_decoding, eager, is_compiled
from .lookup import NGramIndex
from .model import QUERY_SLACK, MTPModel

DEFAULT_TREE = (3, 2, 1)  # candidates taken from heads 2, 3, 4
DRAFTERS = ("heads", "lookup", "both")  # the model's heads, prompt lookup, lookup where it matches else heads
LOOKUP_MAX_N = 3  # longest n-gram prompt lookup matches


# ----- draft trees ------------------------------------------------------------------------------
@dataclass(frozen=True)
class DraftTree:
    """Which candidates are verified: each path lists candidate ranks from depth 1 down, so (1, 0)
    is head 3's best token after head 2's second best. Node 0 (the token already chosen) is
    implicit, node i >= 1 is paths[i - 1] (order: see `from_paths`)."""

    paths: tuple[tuple[int, ...], ...]

    @classmethod
    def chain(cls, k: int) -> "DraftTree":
        """The top draft of heads 2..k+1, one after another (blockwise parallel decoding)."""
        return cls.from_paths([(0,) * d for d in range(1, k + 1)])

    @classmethod
    def from_branching(cls, widths: Sequence[int]) -> "DraftTree":
        """Full tree: widths[d] candidates of head d+2 below every node of depth d."""
        if not widths or any(w < 1 for w in widths):
            raise GenerationError(f"tree widths must be positive integers, got {tuple(widths)}")
        level: list[tuple[int, ...]] = [()]
        paths: list[tuple[int, ...]] = []
        for w in widths:
            level = [p + (r,) for p in level for r in range(w)]
            paths += level
        return cls.from_paths(paths)

    def __post_init__(self) -> None:
        # Node order: the top-1 chain (0,), (0, 0), ... first, so when it is the accepted path its
        # keys/values already sit in consecutive slots and need no copy; then breadth first.
        # Either way every node comes after its ancestors.
        clean = sorted({tuple(int(r) for r in p) for p in self.paths}, key=lambda p: (any(p), len(p), p))
        if not clean or any(len(p) == 0 or min(p) < 0 for p in clean):
            raise GenerationError("tree paths must be non-empty tuples of ranks >= 0")
        known = set(clean)
        for p in clean:
            if len(p) > 1 and p[:-1] not in known:
                raise GenerationError(f"tree path {p} has no parent {p[:-1]}")
        object.__setattr__(self, "paths", tuple(clean))

    @classmethod
    def from_paths(cls, paths: Sequence[Sequence[int]]) -> "DraftTree":
        """A sparse tree (as in Medusa's hand-picked trees); every prefix of a path must be a path."""
        return cls(tuple(tuple(p) for p in paths))

    @property
    def depth(self) -> int:
        return max(map(len, self.paths))

    @property
    def size(self) -> int:
        """Tokens per verify pass, the chosen token included."""
        return len(self.paths) + 1

    @property
    def is_chain(self) -> bool:
        """Only the top-1 chain: node i sits at position p+i, so the plain causal mask works and
        accepted tokens are already in place."""
        return len(self.paths) == self.depth and not any(map(any, self.paths))

    def widths(self) -> list[int]:
        """Candidates needed from each draft head (depth 1..depth)."""
        return [1 + max(p[-1] for p in self.paths if len(p) == d) for d in range(1, self.depth + 1)]

    def tables(self, device: torch.device | str) -> "TreeTables":
        return TreeTables.build(self, device)


@dataclass
class TreeTables:
    """Index tensors of a tree over nodes 0..N-1 (node 0 = the chosen token)."""

    depth: Tensor  # (N,)
    parent: Tensor  # (N,), node 0 is its own parent
    rank: Tensor  # (N,)
    ancestors: Tensor  # (N, N) bool: ancestors[i, j] when j is i or an ancestor of i
    path: Tensor  # (N, D + 1): path[i, d] = the node at depth d on the way to i (i itself past its depth)
    # Host copies: acceptance is decided on the host from one copy of the pass's tokens (a few
    # small tensor ops cost more than the whole decision in Python at these sizes).
    depths: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    paths: list[list[int]] = field(default_factory=list)

    @classmethod
    def build(cls, tree: DraftTree, device: torch.device | str) -> "TreeTables":
        index = {(): 0, **{p: i + 1 for i, p in enumerate(tree.paths)}}
        nodes = [()] + list(tree.paths)
        n = len(nodes)
        ancestors = torch.zeros(n, n, dtype=torch.bool)
        path = torch.zeros(n, tree.depth + 1, dtype=torch.long)
        for i, p in enumerate(nodes):
            for d in range(tree.depth + 1):
                j = index[p[:d]] if d <= len(p) else i
                path[i, d] = j
                ancestors[i, j] = True
        depths = [len(p) for p in nodes]
        parents = [index[p[:-1]] if p else 0 for p in nodes]
        return cls(
            depth=torch.tensor(depths, device=device),
            parent=torch.tensor(parents, device=device),
            rank=torch.tensor([p[-1] if p else 0 for p in nodes], device=device),
            ancestors=ancestors.to(device),
            path=path.to(device),
            depths=depths, parents=parents, paths=path.tolist(),
        )


def as_tree(tree: DraftTree | Sequence[int]) -> DraftTree:
    return tree if isinstance(tree, DraftTree) else DraftTree.from_branching(tree)


def default_tree(n_future: int) -> DraftTree:
    """DEFAULT_TREE cut (or padded with width 1) to the model's n_future - 1 draft heads."""
    depth = n_future - 1
    if depth < 1:
        raise GenerationError("speculative decoding needs a model with n_future >= 2 heads")
    return DraftTree.from_branching((list(DEFAULT_TREE) + [1] * depth)[:depth])


def check_tree(model: MTPModel, tree: DraftTree) -> None:
    if tree.depth > model.cfg.max_draft_depth:
        raise GenerationError(
            f"drafts {tree.depth} deep need {tree.depth + 1} heads, but the model has n_future={model.cfg.n_future}"
            if not model.cfg.shared_head else f"drafts {tree.depth} deep: a shared head drafts at most "
                                              f"{model.cfg.max_draft_depth} deep in one pass")
    if max(tree.widths()) > model.cfg.vocab_size:
        raise GenerationError(f"tree asks for {max(tree.widths())} candidates per head, "
                              f"more than the vocabulary of {model.cfg.vocab_size}")
    if not tree.is_chain and tree.size - 2 > QUERY_SLACK:  # node i: slot base + i, position base + depth
        raise GenerationError(f"a tree of {tree.size - 1} drafts is too large; at most {QUERY_SLACK + 1}")


def chain_for(model: MTPModel, k: int | None) -> DraftTree:
    """The chain of k drafts (default: every extra head), checked against the model."""
    k = model.cfg.n_future - 1 if k is None else k
    if k < 1:
        raise GenerationError(f"k must be >= 1 drafts (and the model needs n_future >= 2), got k={k}")
    tree = DraftTree.chain(k)
    check_tree(model, tree)
    return tree


# ----- results ----------------------------------------------------------------------------------
@dataclass
class SpeculativeResult(GenerationResult):
    """GenerationResult plus draft statistics, per draft depth j = 1.. (head j+1)."""

    draft_attempts: list[int] = field(default_factory=list)  # steps where drafts 1..j-1 were accepted
    draft_accepts: list[int] = field(default_factory=list)  # ... and draft j was accepted too

    @property
    def acceptance_rates(self) -> list[float]:
        """P(draft j accepted | drafts 1..j-1 accepted); nan when never tried."""
        return [a / n if n else math.nan for a, n in zip(self.draft_accepts, self.draft_attempts)]


class DraftStats:
    """Per-depth attempts / accepts, counted on the host from each pass's accepted drafts (which
    the host reads anyway to commit them)."""

    def __init__(self, depth: int) -> None:
        self.attempts = [0] * depth
        self.accepts = [0] * depth

    def update(self, accepted: Sequence[int], max_depth: Sequence[int], active: Sequence[bool]) -> None:
        """accepted: drafts accepted per row; max_depth: deepest draft a row could accept."""
        for a, m, on in zip(accepted, max_depth, active):
            if on:
                for j in range(min(a + 1, m)):  # depth j+1 tried when drafts 1..j were accepted
                    self.attempts[j] += 1
                for j in range(a):
                    self.accepts[j] += 1

    def finish(self, state: RowState) -> SpeculativeResult:
        base = state.result()
        return SpeculativeResult(base.tokens, base.forwards, base.row_forwards, base.stop_reasons,
                                 list(self.attempts), list(self.accepts))


# ----- one verify pass --------------------------------------------------------------------------
@dataclass
class HostBlock:
    """A Block's base, useful and active on the host, where acceptance is decided."""

    base: list[int]
    useful: list[list[bool]]
    active: list[bool]

    def path_length(self, accepted: Sequence[int]) -> int:
        """Tokens on the longest accepted path of an unfinished row (the chosen token and its drafts)."""
        return 1 + max((a for a, on in zip(accepted, self.active) if on), default=0)

    def max_depth(self, tables: TreeTables) -> list[int]:
        """Deepest draft each row could accept (0 when none)."""
        return [max((d for d, u in zip(tables.depths, us) if u), default=0) for us in self.useful]


@dataclass
class Block:
    """Where the nodes of one verify pass go, per row."""

    base: Tensor  # (B,) position of the chosen (pending) token
    positions: Tensor  # (B, N) RoPE positions: base + depth
    slots: Tensor  # (B, N) cache slots: base + node index (scratch slot when past the cache)
    useful: Tensor  # (B, N) nodes that may be accepted: row unfinished, depth within its budget, slot in the cache
    active: Tensor  # (B,)
    host: HostBlock  # base, useful and active on the host (`block_layout`)


def block_layout(state: RowState, tables: TreeTables, cache_len: int) -> Block:
    """The pass's layout, made on the host and copied to the device in one tensor."""
    depths = tables.depths
    n, depth = len(depths), max(depths)
    base, useful, active = [], [], []
    planes: list[list[list[int]]] = [[], [], [], []]  # positions, slots, useful, active: (4, B, N)
    for r in range(state.batch):
        b = state.pending_position(r)
        # A row with m tokens left can use at most m-1 drafts (the bonus token is the m-th).
        budget = min(depth, state.remaining(r) - 1) if state.is_active(r) else -1
        us = [d <= budget and b + i <= cache_len - 2 for i, d in enumerate(depths)]
        base.append(b)
        useful.append(us)
        active.append(budget >= 0)
        planes[0].append([b + d for d in depths])
        planes[1].append([min(b + i, cache_len - 1) for i in range(n)])  # as scratch_slots
        planes[2].append([int(u) for u in us])
        planes[3].append([int(budget >= 0)] * n)
    t = torch.tensor(planes, device=tables.depth.device)
    flags = t[2:].bool()
    return Block(t[0, :, 0], t[0], t[1], flags[0], flags[1, :, 0], HostBlock(base, useful, active))


def tree_mask(block: Block, ancestors: Tensor, kv_len: int) -> Tensor:
    """(B, N, kv_len): each node sees the slots before the block plus its ancestors and itself."""
    slot_ids = torch.arange(kv_len, device=block.base.device)
    prefix = slot_ids[None, :] < block.base[:, None]
    at = (block.slots[:, :, None] == slot_ids).to(torch.float32)  # (B, N, kv) one-hot of each node
    own = torch.matmul(ancestors.to(torch.float32), at) > 0
    return prefix[:, None, :] | own


def verify_forward(model: MTPModel, tree: DraftTree, tables: TreeTables, block: Block,
                   nodes: Tensor, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Trunk output (B, N, dim) and the heads' hidden states (B, N, heads, dim) at every node;
    with `rows` (R,), only those rows of the batch (in their cache rows), (R, N, ...).

    Only head 1 runs here (all heads with anticausal heads, whose head 1 needs the others): it
    decides what is accepted, and the draft heads are needed only on the accepted path
    (`draft_hidden`), so running them on every node would be wasted work."""
    mask = None if tree.is_chain else tree_mask(block, tables.ancestors, model.cache_len)
    if mask is not None and is_compiled(model) and not model.compiled.freeze:
        torch._dynamo.mark_dynamic(mask, 2)  # as long as the cache: a dynamic size when compiled (unfrozen)
    heads = min(tree.depth + 1, model.cfg.n_future) if model.cfg.head_type == "anticausal" else 1
    if rows is None:
        return model.trunk_and_heads(nodes, block.positions, slots=block.slots, mask=mask, heads=heads)
    return model.trunk_and_heads(nodes[rows], block.positions[rows], slots=block.slots[rows],
                                 mask=None if mask is None else mask[rows], heads=heads, rows=rows)


def draft_hidden(dec: "Decoder", block: Block, z: Tensor, hidden: Tensor, best: Tensor, accepted: Tensor,
                 length: int, index: Tensor | None = None) -> Tensor:
    """Heads 2..depth+1 at each row's accepted node (R, depth, dim), the next step's drafts;
    `index` (R,): the batch rows that z, hidden (R, N, ...) hold (default: all); best and
    accepted (B,); `length`: the longest accepted path, in tokens.

    Runs those heads over the accepted path (the chosen token and the accepted drafts, already in
    consecutive cache slots) so their caches hold exactly the committed tokens; rows with a
    shorter path pad with positions their next pass overwrites before any query can see them.
    Callers unembed the result: at a small model the unembedding is the largest matmul."""
    base = block.base
    if index is not None:
        base, best, accepted = base[index], best[index], accepted[index]
    rows = torch.arange(z.shape[0], device=z.device)
    if hidden.shape[2] > 1:  # anticausal: every head ran at every node
        return hidden[rows, best, 1:]
    if is_compiled(dec.model):  # one shape per batch: the longest path, every time
        length = dec.tree.depth + 1
    path = dec.tables.path[best][:, :length]  # (R, L) nodes of the accepted path (padded with the last)
    gather = path[:, :, None].expand(-1, -1, z.shape[-1])
    positions = base[:, None] + torch.arange(length, device=z.device)
    out = dec.model.later_heads(z.gather(1, gather), [hidden[:, :, 0].gather(1, gather)], positions,
                                dec.tree.depth + 1, slots=scratch_slots(positions, dec.cache_len), rows=index)
    return out[rows, accepted.clamp(max=length - 1)]


class SequentialDrafter:
    """Drafts of sequential heads (head_type="sequential"), one after another: head j+1 at
    position t reads head j's output there and the token x_{t+j}, so draft j feeds draft j+1.

    Each draft head has its own KV cache. After a pass whose head-1 states are new at positions
    start..last (last = the accepted node; x_{last+1} is the pending token), head j+1 (j >= 1)
    runs over positions start-j+1..last: at position t it reads x_{t+j}, a committed token while
    t+j <= last+1 and a draft beyond. The j-1 positions before `start` are redone because they
    read drafts last time; the position before them read committed tokens only and stays. Each
    head's outputs are kept per position (`hidden`), as the next head reads them there. Padding
    (rows with shorter windows) writes positions past `last`, which the next pass rewrites before
    any query sees them, as everywhere in decoding.

    Trees: the drafts are still this chain, each after the previous head's top token, and a tree
    takes head j's top candidates below every node of depth j-1 (as for parallel heads); after
    the pass the accepted path's states are moved to consecutive positions (`after_verify`)."""

    def __init__(self, model: MTPModel, state: RowState, depth: int, batch: int, cache_len: int,
                 tree_path: Tensor | None = None) -> None:
        param = next(model.parameters())
        self.model, self.state, self.depth, self.cache_len = model, state, depth, cache_len
        self.tree_path = tree_path  # `TreeTables.path` of a tree; None for a chain (node i at depth i)
        # hidden[j]: head j+1's outputs per (row, position), read by head j+2 (heads 1..depth).
        self.hidden = torch.zeros(depth, batch, cache_len, model.cfg.dim, dtype=param.dtype, device=param.device)
        self.positions = torch.arange(cache_len, device=param.device)

    def tokens(self, r: int, start: int, stop: int) -> list[int]:
        """Committed tokens at positions start..stop-1 of row r (its prompt, then its output)."""
        q = self.state.request[r]
        prompt, out = self.state.prompts[q], self.state.out[q]
        return prompt[start:stop] + out[max(0, start - len(prompt)): max(0, stop - len(prompt))]

    def prefill(self, rows: Sequence[int]) -> Tensor:
        """Prefill the prompts of `rows` (head 1 only), then draft: logits (R, depth+1, V), head
        1's at each prompt's last token followed by the drafts after its greedy token."""
        with eager(self.model):  # prompt lengths vary: never compiled
            return self._prefill(rows)

    def _prefill(self, rows: Sequence[int]) -> Tensor:
        model, device = self.model, self.hidden.device
        tokens, lengths = pad_prompts(self.state.prompts_of(rows), device)
        index = torch.tensor(list(rows), device=device)
        everyone = list(rows) == list(range(self.state.batch))
        positions = torch.arange(tokens.shape[1], device=device).expand(len(rows), -1)
        _, hidden = model.trunk_and_heads(tokens, positions, heads=1, rows=None if everyone else index)
        self.state.count_forward(rows)
        self.hidden[0, index[:, None], positions] = hidden[:, :, 0]
        last = lengths - 1
        first = model.unembed(hidden[torch.arange(len(rows), device=device), last, 0])  # (R, V)
        drafts = self.draft(rows, [0] * len(rows), last.tolist(), greedy_token(first))
        return torch.cat([first[:, None], drafts], dim=1)

    def after_verify(self, block: Block, best: Tensor, hidden: Tensor, accepted: Sequence[int], pending: Tensor,
                     rows: Sequence[int] | None = None) -> Tensor:
        """Draft logits (R, depth, V) after a verify pass with head-1 states `hidden` (R, N, 1, dim)
        at its nodes, for the batch rows `rows` (default: all, R = B); `best` (B,) each row's
        accepted node, `accepted` drafts (B, on the host) and the new pending tokens (B,). The
        accepted path's states go to positions base..base+depth, where its tokens now are."""
        every = rows is None
        rows = range(self.state.batch) if rows is None else rows
        starts = [block.host.base[r] for r in rows]
        if self.tree_path is None:  # chain: node i's state goes to position base + i (past the path: padding)
            states = hidden[:, :, 0]
        else:
            path = self.tree_path[best if every else best[list(rows)]]  # (R, depth+1) nodes of the accepted path
            states = hidden[:, :, 0].gather(1, path[:, :, None].expand(-1, -1, hidden.shape[-1]))
        n = states.shape[1]
        if every and len(set(starts)) == 1 and starts[0] + n <= self.cache_len:  # one slice (always at batch 1)
            self.hidden[0, :, starts[0] : starts[0] + n] = states
        else:
            index = torch.tensor(list(rows), device=hidden.device)
            slots = scratch_slots(block.base[index][:, None] + torch.arange(n, device=hidden.device), self.cache_len)
            self.hidden[0, index[:, None], slots] = states
        if not every:
            pending = pending[list(rows)]
        return self.draft(rows, starts, [s + accepted[r] for s, r in zip(starts, rows)], pending)

    def draft(self, rows: Sequence[int], starts: list[int], lasts: list[int], pending: Tensor) -> Tensor:
        """Draft logits (R, depth, V) of `rows` whose head-1 states are new at positions
        starts..lasts (per row, on the host) and whose pending token (R,) sits at last + 1; runs
        heads 2..depth+1 one after another."""
        model, device = self.model, self.hidden.device
        R = len(rows)
        every = list(rows) == list(range(self.state.batch))
        # Tokens x_{start+1} .. x_{last+1} (committed; the last is pending), then the drafts.
        known = [self.tokens(r, s + 1, e + 1) for r, s, e in zip(rows, starts, lasts)]
        width = max(map(len, known)) + 1 + self.depth
        # One host-to-tensor copy per call, not one per row (small ops dominate a draft at this size).
        seq = torch.tensor([t + [0] * (width - len(t)) for t in known], dtype=torch.long, device=device)
        # Every row at the same positions (always at batch 1): windows are slices, not gathers
        # (a dozen fewer small ops per head, which is what a draft costs at this size).
        same = every and len(set(starts)) == 1 and len(set(lasts)) == 1

        def row_tables() -> tuple[Tensor, Tensor, Tensor]:  # what gathers need: rows, tokens known, 0..R-1
            index, n_known = torch.tensor([list(rows), [len(t) for t in known]], device=device)
            return index, n_known, torch.arange(R, device=device)

        gathers = None if same else row_tables()
        cache_rows = None if gathers is None or every else gathers[0]
        seq[(slice(None), len(known[0])) if gathers is None else (gathers[2], gathers[1])] = pending
        out = []
        for j in range(1, self.depth + 1):
            firsts = [max(s - (j - 1), 0) for s in starts]
            if is_compiled(model):  # one shape per head and batch: the widest window after a verify pass
                span = self.depth + j
            else:  # from the host's copies: no sync
                span = max(e - f for e, f in zip(lasts, firsts)) + 1
            f0, a0 = firsts[0], firsts[0] + j - starts[0] - 1  # x_{t+j} sits at seq[:, t + j - start - 1]
            if same and f0 + span <= self.cache_len and a0 >= 0 and a0 + span <= width:
                pos = slots = self.positions[f0 : f0 + span].expand(R, -1)
                window: tuple[Any, ...] = (slice(None), slice(f0, f0 + span))  # (row, position) of hidden
                ahead = seq[:, a0 : a0 + span]
                at_last: tuple[Any, ...] = (slice(None), lasts[0] - f0)
                drafted: tuple[Any, ...] = (slice(None), len(known[0]) + j)
            else:
                index, n_known, arange_r = gathers = gathers or row_tables()
                first, start, last = torch.tensor([firsts, starts, lasts], device=device)  # (R,) each
                pos = first[:, None] + torch.arange(span, device=device)
                slots = scratch_slots(pos, self.cache_len)
                window = (index[:, None], slots)
                ahead = seq.gather(1, (pos + j - start[:, None] - 1).clamp(0, width - 1))
                at_last, drafted = (arange_r, last - first), (arange_r, n_known + j)
            emb = F.embedding(ahead, model.tok_embeddings.weight)  # x_{t+j}
            h = model.cached_head(j, self.hidden[j - 1][window], emb, pos, slots, cache_rows)
            if j < self.depth:
                self.hidden[j][window] = h
            logits = model.draft_unembed(h[at_last])  # (R, V) at each row's last position
            out.append(logits)
            seq[drafted] = greedy_token(logits)  # draft j: x_{last+1+j}
        return torch.stack(out, dim=1)


def draft_tokens(draft_logits: Tensor, tree: DraftTree, tables: TreeTables) -> Tensor:
    """Candidate tokens (B, N-1) of the tree's nodes from heads 2..depth+1 logits (B, depth, V)."""
    if tree.is_chain:  # each head's greedy token, as sequential heads were fed
        return greedy_token(draft_logits)
    top = draft_logits.topk(max(tree.widths()), dim=-1).indices  # (B, depth, width)
    return top[:, tables.depth[1:] - 1, tables.rank[1:]]


def accepted_nodes(nodes: list[list[int]], verdict: list[list[int]], host: HostBlock,
                   tables: TreeTables) -> list[int]:
    """Per row, the deepest node whose whole path head 1 agrees with; node 0 when no draft
    survives. `verdict[r][i]`: head 1's greedy token after node i.

    Siblings hold distinct tokens (ranks of one top-k), so at most one path can survive."""
    best = []
    for nd, vd, us in zip(nodes, verdict, host.useful):
        alive, b = [us[0]] + [False] * (len(nd) - 1), 0
        for i in range(1, len(nd)):
            p = tables.parents[i]  # every node comes after its parent
            if us[i] and alive[p] and nd[i] == vd[p]:
                alive[i] = True
                if tables.depths[i] > tables.depths[b]:
                    b = i
        best.append(b)
    return best


def compact_path(model: MTPModel, block: Block, tables: TreeTables, best: Tensor, accepted: Tensor) -> None:
    """Copy the accepted path's keys/values from slots base+node to consecutive slots base+depth."""
    depth = tables.path.shape[1] - 1
    levels = torch.arange(1, depth + 1, device=best.device)
    keep = (levels <= accepted[:, None]) & block.active[:, None]
    base = block.base[:, None]
    src = torch.where(keep, base + tables.path[best][:, 1:], base)  # no-op copies base -> base
    dst = torch.where(keep, base + levels, base)
    rows = torch.arange(best.numel(), device=best.device)[:, None]
    model.cache_move(rows, src, dst)


# ----- greedy (chain or tree) -------------------------------------------------------------------
@dataclass
class Decoder:
    """Everything a decoding loop carries between passes."""

    model: MTPModel
    tree: DraftTree
    tables: TreeTables
    state: RowState
    stats: DraftStats
    cache_len: int
    on_tokens: TokenCallback | None
    drafter: str = "heads"  # see DRAFTERS
    lookups: dict[int, NGramIndex] = field(default_factory=dict)  # per request, for prompt lookup
    sequential: SequentialDrafter | None = None  # drafts of sequential heads, made one after another

    @property
    def heads(self) -> int:
        """Heads run at a verified position: 1 when drafts come from prompt lookup alone."""
        return 1 if self.drafter == "lookup" else self.tree.depth + 1

    def prefill(self, rows: Sequence[int]) -> Tensor:
        """Prefill the prompts of `rows` into their cache rows; logits (R, heads, V) at each
        prompt's last token (head 1, then the drafts)."""
        if self.sequential is not None:
            return self.sequential.prefill(rows)
        logits = prefill_rows(self.model, self.state, rows, heads=self.heads)
        ids = self.model.draft_ids
        if ids is not None and logits.shape[1] > 1:  # drafts only from the draft vocabulary
            outside = torch.ones(logits.shape[-1], dtype=torch.bool, device=logits.device).index_fill_(0, ids, False)
            logits[:, 1:, outside] = float("-inf")
        return logits

    def propose(self, head_drafts: Tensor | None) -> Tensor:
        """Draft tokens (B, k) of a chain: the heads' (drafter "heads"); prompt lookup's where the
        text's suffix occurred before, else the heads' ("both") or a repeat of the last token."""
        if self.drafter == "heads":
            assert head_drafts is not None
            return head_drafts
        k, st = self.tree.depth, self.state
        fallback = head_drafts.tolist() if head_drafts is not None else None
        rows = []
        for r in range(st.batch):
            q = st.request[r]
            history = st.prompts[q] + st.out[q]
            found = self.lookups.setdefault(q, NGramIndex(LOOKUP_MAX_N)).propose(history, k) if st.is_active(r) else []
            rest = fallback[r][len(found):] if fallback is not None else [history[-1]] * (k - len(found))
            rows.append(found + rest)
        return torch.tensor(rows, dtype=torch.long, device=self.tables.depth.device)


def start_decoder(model: MTPModel, prompts: list[list[int]], max_new_tokens: int, tree: DraftTree,
                  stop_tokens: Collection[int], on_tokens: TokenCallback | None,
                  batch_size: int | None = None, drafter: str = "heads") -> tuple[Decoder, Tensor | None]:
    """Check the request, set up the cache and prefill the first batch of rows; returns the
    decoder and the prefill logits (B, heads, V), or None when no row has anything to generate."""
    check_prompts(model, prompts, max_new_tokens)
    if drafter not in DRAFTERS:
        raise GenerationError(f"drafter must be one of {', '.join(DRAFTERS)}, got {drafter!r}")
    if drafter != "heads" and not tree.is_chain:
        raise GenerationError("prompt lookup drafts a chain; use it with k drafts, not a tree")
    sequential = drafter != "lookup" and model.cfg.head_type == "sequential"
    if drafter != "lookup":
        check_tree(model, tree)
    device = next(model.parameters()).device
    limits = token_limits(model, prompts, max_new_tokens)
    state = RowState(prompts, limits, stop_tokens, batch_size)
    state.refill()
    cache_len = cache_length(prompts, limits, slack=tree.size, max_seq_len=model.cfg.max_seq_len)
    dec = Decoder(model, tree, tree.tables(device), state, DraftStats(tree.depth), cache_len, on_tokens,
                  drafter)
    if not state.active_rows():
        return dec, None
    if sequential and tree.depth + 1 > len(model.heads):  # a shared head drafting deeper than trained
        model.extend_shared_head(tree.depth)
    setup_decode_cache(model, state.batch, cache_len)
    if sequential:
        dec.sequential = SequentialDrafter(model, state, tree.depth, state.batch, cache_len,
                                          None if tree.is_chain else dec.tables.path)
    return dec, dec.prefill(range(state.batch))


# First tokens (R,) and drafts (R, depth, ...) from prefill logits (R, depth+1, V).
Pick = Callable[[Tensor], tuple[Tensor, Tensor]]


def first_tokens(dec: Decoder, logits: Tensor, pick: Pick) -> tuple[Tensor, Tensor]:
    """Commit every row's first token from the prefill logits; the pending tokens and drafts."""
    pending, drafts = pick(logits)
    rows = dec.state.active_rows()
    commit_rows(dec.state, rows, [[t] for t in pending[rows].tolist()], dec.on_tokens)
    return refill_rows(dec, pick, pending, drafts)


def refill_rows(dec: Decoder, pick: Pick, pending: Tensor, drafts: Tensor) -> tuple[Tensor, Tensor]:
    """Continuous batching: rows whose request finished take the next prompts; each is prefilled
    and its first token committed (again, while rows finish at once). Updates pending / drafts."""
    while rows := dec.state.refill():
        first, new_drafts = pick(dec.prefill(rows))
        index = torch.tensor(rows, device=pending.device)
        pending[index], drafts[index] = first, new_drafts
        commit_rows(dec.state, rows, [[t] for t in first.tolist()], dec.on_tokens)
    return pending, drafts


def commit_block(dec: Decoder, nodes: list[list[int]], best: list[int], final: list[int]) -> None:
    """Commit each unfinished row's accepted path (drafts on the way to node `best`) and its
    final (bonus or corrected) token."""
    paths, depths = dec.tables.paths, dec.tables.depths
    rows = dec.state.active_rows()
    commit_rows(dec.state, rows, [[nodes[r][i] for i in paths[best[r]][1 : depths[best[r]] + 1]] + [final[r]]
                                  for r in rows], dec.on_tokens)


def greedy_step(dec: Decoder, pending: Tensor, draft_logits: Tensor) -> tuple[Tensor, Tensor]:
    """One verify pass; returns the next pending tokens (B,) and draft logits (B, depth, V)."""
    block = block_layout(dec.state, dec.tables, dec.cache_len)
    host = block.host
    head_drafts = draft_tokens(draft_logits, dec.tree, dec.tables) if dec.heads > 1 else None
    nodes = torch.cat([pending[:, None], dec.propose(head_drafts)], dim=1)
    live = active_subset(dec)
    index = None if live is None else torch.tensor(live, device=nodes.device)
    if index is None:
        z, hidden = verify_forward(dec.model, dec.tree, dec.tables, block, nodes)
    else:  # finished rows sit out; the others' logits are bitwise the same (batch-invariant passes)
        z, hidden = verify_forward(dec.model, dec.tree, dec.tables, block, nodes, rows=index)
    verdict = greedy_token(dec.model.unembed(hidden[:, :, 0]))  # head 1: the greedy token after each node
    # One copy to the host decides acceptance, the statistics and the commit.
    both = torch.cat([nodes, verdict]).tolist()
    nodes_h, verdict_h = both[: len(pending)], both[len(pending):]
    if live is not None:  # finished rows: any tokens (not useful, never committed)
        verdict_h = list(nodes_h)
        for i, r in enumerate(live):
            verdict_h[r] = both[len(pending) + i]
    best_h = accepted_nodes(nodes_h, verdict_h, host, dec.tables)
    accepted_h = [dec.tables.depths[b] for b in best_h]
    bonus_h = [v[b] for v, b in zip(verdict_h, best_h)]
    dec.stats.update(accepted_h, host.max_depth(dec.tables), host.active)
    dec.state.count_forward()
    commit_block(dec, nodes_h, best_h, bonus_h)
    bonus, best, accepted = torch.tensor([bonus_h, best_h, accepted_h], device=nodes.device)
    # Chain nodes come first (node index == depth): only paths leaving the top-1 chain move.
    if not dec.tree.is_chain and any(b != a and on for b, a, on in zip(best_h, accepted_h, host.active)):
        compact_path(dec.model, block, dec.tables, best, accepted)
    if dec.heads == 1:  # prompt lookup alone: no draft heads to run
        return bonus, draft_logits
    if dec.sequential is not None:
        drafted = dec.sequential.after_verify(block, best, hidden, accepted_h, bonus, live)
        if index is None:
            return bonus, drafted
        draft_logits[index] = drafted  # in place, as refill_rows does; finished rows' stale drafts go unused
        return bonus, draft_logits
    drafted = dec.model.draft_unembed(draft_hidden(dec, block, z, hidden, best, accepted,
                                                   host.path_length(accepted_h), index))
    if index is None:
        return bonus, drafted
    draft_logits[index] = drafted
    return bonus, draft_logits


def active_subset(dec: Decoder) -> list[int] | None:
    """The batch rows still decoding, when some have finished and a greedy verify pass can leave
    the others out (eager passes; speculative sampling keeps full passes); None: the pass runs
    every row. Finished rows then cost nothing while the slowest rows of a batch finish."""
    live = dec.state.active_rows()
    if len(live) == dec.state.batch or is_compiled(dec.model):
        return None
    return live


def pick_greedy(logits: Tensor) -> tuple[Tensor, Tensor]:
    return greedy_token(logits[:, 0]), logits[:, 1:]


@torch.no_grad()
def greedy_tree_decode(model: MTPModel, prompts: list[list[int]], max_new_tokens: int, tree: DraftTree, *,
                       stop_tokens: Collection[int] = (), on_tokens: TokenCallback | None = None,
                       batch_size: int | None = None, drafter: str = "heads",
                       compile: bool = False) -> SpeculativeResult:
    """Greedy self-speculative decoding with any draft tree (a chain is the 1-wide tree).
    `batch_size`: continuous batching as in `generate`; `drafter`: see DRAFTERS (chains only
    for prompt lookup); `compile`: as in `generate`."""
    with compiled_decoding(model, compile):
        return _greedy_tree_decode(model, prompts, max_new_tokens, tree, stop_tokens, on_tokens, batch_size, drafter)


def _greedy_tree_decode(model: MTPModel, prompts: list[list[int]], max_new_tokens: int, tree: DraftTree,
                        stop_tokens: Collection[int], on_tokens: TokenCallback | None, batch_size: int | None,
                        drafter: str) -> SpeculativeResult:
    dec, logits = start_decoder(model, prompts, max_new_tokens, tree, stop_tokens, on_tokens, batch_size, drafter)
    if logits is None:
        return dec.stats.finish(dec.state)
    pending, draft_logits = first_tokens(dec, logits, pick_greedy)
    while dec.state.active_rows():
        pending, draft_logits = refill_rows(dec, pick_greedy, *greedy_step(dec, pending, draft_logits))
    return dec.stats.finish(dec.state)


def speculative_generate(model: MTPModel, prompts: list[list[int]], max_new_tokens: int, *,
                         k: int | None = None, temperature: float = 0.0, top_k: int | None = None,
                         top_p: float | None = None, seed: int | None = None,
                         stop_tokens: Collection[int] = (), on_tokens: TokenCallback | None = None,
                         batch_size: int | None = None, drafter: str = "heads",
                         compile: bool = False) -> SpeculativeResult:
    """Self-speculative decoding with k drafts from heads 2..k+1 (default n_future - 1).

    temperature == 0: greedy blockwise parallel decoding, the same tokens as greedy `generate` in
    fewer forwards. temperature > 0: `speculative_sample`, distributed exactly as `generate` with
    the same temperature / top_k / top_p. `batch_size`: continuous batching as in `generate`.
    `drafter` (greedy only): "heads", "lookup" (prompt lookup, `mtp.lookup`: works for any model,
    k defaults to 3) or "both" (lookup where the text's suffix occurred before, else the heads).
    `compile`: the decoding passes run through torch.compile (`mtp.compiled`)."""
    if temperature != 0 and drafter != "heads":
        raise GenerationError("prompt lookup drafts are verified greedily; use temperature 0")
    if drafter == "lookup":
        k = 3 if k is None else k
        if k < 1:
            raise GenerationError(f"k must be >= 1 drafts, got k={k}")
        return greedy_tree_decode(model, prompts, max_new_tokens, DraftTree.chain(k), stop_tokens=stop_tokens,
                                  on_tokens=on_tokens, batch_size=batch_size, drafter=drafter, compile=compile)
    if temperature != 0:
        return speculative_sample(model, prompts, max_new_tokens, k=k, temperature=temperature, top_k=top_k,
                                  top_p=top_p, seed=seed, stop_tokens=stop_tokens, on_tokens=on_tokens,
                                  batch_size=batch_size, compile=compile)
    return greedy_tree_decode(model, prompts, max_new_tokens, chain_for(model, k), stop_tokens=stop_tokens,
                              on_tokens=on_tokens, batch_size=batch_size, drafter=drafter, compile=compile)


def tree_generate(model: MTPModel, prompts: list[list[int]], max_new_tokens: int, *,
                  tree: DraftTree | Sequence[int] | None = None, stop_tokens: Collection[int] = (),
                  on_tokens: TokenCallback | None = None, batch_size: int | None = None,
                  compile: bool = False) -> SpeculativeResult:
    """Greedy Medusa-style tree decoding; `tree` is a DraftTree or per-depth widths such as
    (3, 2, 1) (default: DEFAULT_TREE fitted to the model). Same tokens as greedy `generate`."""
    tree = default_tree(model.cfg.n_future) if tree is None else as_tree(tree)
    return greedy_tree_decode(model, prompts, max_new_tokens, tree, stop_tokens=stop_tokens, on_tokens=on_tokens,
                              batch_size=batch_size, compile=compile)


# ----- speculative sampling (chain) -------------------------------------------------------------
@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_k: int | None
    top_p: float | None

    def probs(self, logits: Tensor) -> Tensor:
        return sampling_probs(logits, self.temperature, self.top_k, self.top_p)


def draw(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One sample per distribution over the last dim of probs (..., V) -> (...)."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def rejection_step(p: Tensor, q: Tensor, drafts: Tensor, useful: Tensor, max_depth: Tensor,
                   generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """The speculative sampling rule, per row. p: target (B, k+1, V) from head 1 at each block
    position; q: draft distributions (B, k, V); drafts (B, k) ~ q; useful (B, k) drafts a row may
    accept. Returns (drafts accepted a (B,), final token (B,)): the token after the accepted
    prefix, from norm(max(0, p - q)) when draft a+1 was rejected, else from p (bonus)."""
    B, k = drafts.shape
    p_d = p[:, :k].gather(-1, drafts[..., None])[..., 0]
    q_d = q.gather(-1, drafts[..., None])[..., 0]
    u = torch.rand(B, k, generator=generator, device=p.device, dtype=p.dtype)
    ok = (u * q_d <= p_d) & useful  # accept with probability min(1, p/q)
    accepted = ok.long().cumprod(-1).sum(-1)
    rows = torch.arange(B, device=p.device)
    p_a = p[rows, accepted]
    residual = (p_a - q[rows, accepted.clamp(max=k - 1)]).clamp(min=0)
    mass = residual.sum(-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p_a)  # p == q: never rejected
    rejected = accepted < max_depth
    final = draw(torch.where(rejected[:, None], residual, p_a), generator)
    return accepted, final


def sampling_step(dec: Decoder, sampling: Sampling, pending: Tensor, q: Tensor,
                  generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """One verify pass; returns the next pending tokens (B,) and draft distributions (B, k, V)."""
    block = block_layout(dec.state, dec.tables, dec.cache_len)
    drafts = draw(q, generator)
    nodes = torch.cat([pending[:, None], drafts], dim=1)
    z, hidden = verify_forward(dec.model, dec.tree, dec.tables, block, nodes)
    p = sampling.probs(dec.model.unembed(hidden[:, :, 0]))
    max_depth = block.host.max_depth(dec.tables)
    accepted, final = rejection_step(p, q, drafts, block.useful[:, 1:],
                                     torch.tensor(max_depth, device=p.device), generator)
    accepted_h = accepted.tolist()
    dec.stats.update(accepted_h, max_depth, block.host.active)
    dec.state.count_forward()
    commit_block(dec, nodes.tolist(), accepted_h, final.tolist())  # in a chain, node index == depth
    if dec.sequential is not None:
        # Each sequential head drafts after the previous head's greedy token, not its sample:
        # q_j is still fixed before draft j is drawn, which is all the rejection rule needs.
        return final, sampling.probs(dec.sequential.after_verify(block, accepted, hidden, accepted_h, final))
    drafts = draft_hidden(dec, block, z, hidden, accepted, accepted, block.host.path_length(accepted_h))
    return final, sampling.probs(dec.model.draft_unembed(drafts))


@torch.no_grad()
def speculative_sample(model: MTPModel, prompts: list[list[int]], max_new_tokens: int, *,
                       k: int | None = None, temperature: float = 1.0, top_k: int | None = None,
                       top_p: float | None = None, seed: int | None = None,
                       stop_tokens: Collection[int] = (), on_tokens: TokenCallback | None = None,
                       batch_size: int | None = None, compile: bool = False) -> SpeculativeResult:
    """Speculative sampling with k drafts from heads 2..k+1: the output is distributed exactly as
    `generate` with the same temperature / top_k / top_p (temperature 0 gives greedy tokens)."""
    check_sampling(temperature, top_k, top_p)
    with compiled_decoding(model, compile):
        return _speculative_sample(model, prompts, max_new_tokens, k, Sampling(temperature, top_k, top_p), seed,
                                   stop_tokens, on_tokens, batch_size)


def _speculative_sample(model: MTPModel, prompts: list[list[int]], max_new_tokens: int, k: int | None,
                        sampling: Sampling, seed: int | None, stop_tokens: Collection[int],
                        on_tokens: TokenCallback | None, batch_size: int | None) -> SpeculativeResult:
    dec, logits = start_decoder(model, prompts, max_new_tokens, chain_for(model, k), stop_tokens, on_tokens,
                                batch_size)
    if logits is None:
        return dec.stats.finish(dec.state)
    generator = make_generator(seed, logits.device)

    def pick(logits: Tensor) -> tuple[Tensor, Tensor]:
        return draw(sampling.probs(logits[:, 0]), generator), sampling.probs(logits[:, 1:])

    pending, q = first_tokens(dec, logits, pick)
    while dec.state.active_rows():
        pending, q = refill_rows(dec, pick, *sampling_step(dec, sampling, pending, q, generator))
    return dec.stats.finish(dec.state)
