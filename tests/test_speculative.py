"""Self-speculative decoding (`mtp.speculative`): the accept/reject rules on stub models whose
logits are fixed, exact equality with greedy `generate` on random and briefly trained models, and
distribution preservation of speculative sampling.

Exactness tests run in float64 (model.double(), so the cache is float64 too): a verify pass
multiplies a block of queries where greedy multiplies one, fp32 may round the two differently and
flip an argmax on a near tie; in float64 the logits agree to ~1e-15.
"""

from __future__ import annotations

import math
from collections import Counter
from functools import partial
from typing import Callable

import pytest
import torch
from torch import Tensor, nn

from mtp import ModelConfig, MTPModel
from mtp.generate import GenerationError, generate, sampling_probs
from mtp import speculative as spec_mod
from mtp.loss import mtp_backward
from mtp.speculative import (
    DraftTree, speculative_generate, speculative_sample, tree_generate, tree_mask, Block, HostBlock, accepted_nodes,
)

from conftest import tiny_model


# ----- stub models: logits that depend on the position only -------------------------------------
class StubModel(nn.Module):
    """Head i at position t returns table[i, t]; ignores tokens and the cache, so every accept /
    reject decision is known in advance. Records cache_move calls."""

    def __init__(self, table: Tensor, max_seq_len: int = 64) -> None:
        super().__init__()
        n_future, _, vocab = table.shape
        self.cfg = ModelConfig.from_preset("tiny", n_future=n_future, vocab_size=vocab, max_seq_len=max_seq_len)
        self.table = table
        self.dummy = nn.Parameter(torch.zeros(1))
        self.moves: list[tuple[Tensor, Tensor]] = []

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None, *, slots=None, mask=None,
                heads: int | None = None, rows=None) -> Tensor:
        pos = torch.arange(tokens.shape[1]).expand(tokens.shape) if input_pos is None else input_pos
        heads = self.cfg.n_future if heads is None else heads
        return self.table[:heads, pos].permute(1, 2, 0, 3)  # (B, S, heads, V)

    # The decoders unembed hidden states themselves; the stub's "hidden states" are its logits.
    hidden = forward

    def trunk_and_heads(self, tokens: Tensor, input_pos: Tensor | None = None, *, slots=None, mask=None,
                        heads: int | None = None, rows=None) -> tuple[Tensor, Tensor]:
        return tokens[..., None].float(), self.forward(tokens, input_pos, heads=heads)

    def later_heads(self, z: Tensor, done, input_pos: Tensor, heads: int, slots=None, rows=None) -> Tensor:
        return self.table[len(done):heads, input_pos].permute(1, 2, 0, 3)

    def unembed(self, h: Tensor) -> Tensor:
        return h

    draft_ids = None  # no reduced draft vocabulary
    draft_unembed = unembed

    def setup_cache(self, max_batch: int, max_len: int, dtype=None) -> None:
        self.cache_batch, self.cache_len = max_batch, max_len

    def clear_cache(self) -> None:
        pass

    def cache_move(self, rows: Tensor, src: Tensor, dst: Tensor) -> None:
        self.moves.append((src.clone(), dst.clone()))


def truth(t: int, vocab: int) -> int:
    """The stub's greedy continuation: the token at position t."""
    return (7 * t + 3) % vocab


def greedy_stub(n_future: int, vocab: int, draft_right: Callable[[int, int], bool], rank: int = 0,
                length: int = 80) -> StubModel:
    """Head 1 at position t predicts truth(t+1). Draft head i+1 at position t puts truth(t+1+i) at
    `rank` among its candidates when draft_right(t, i), else a wrong token on top."""
    table = torch.zeros(n_future, length, vocab)
    for t in range(length):
        table[0, t, truth(t + 1, vocab)] = 10.0
        for i in range(1, n_future):
            right, wrong = truth(t + 1 + i, vocab), (truth(t + 1 + i, vocab) + 1) % vocab
            if draft_right(t, i):
                table[i, t, right] = 10.0 - rank
                for r in range(rank):  # `rank` wrong tokens ahead of the right one
                    table[i, t, (right + 1 + r) % vocab] = 10.0 - r
            else:
                table[i, t, wrong] = 10.0
    return StubModel(table)


def expected_truth(prompt_len: int, n: int, vocab: int) -> list[int]:
    return [truth(prompt_len + j, vocab) for j in range(n)]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_stub_drafts_always_accepted(k):
    vocab, n = 11, 20
    model = greedy_stub(4, vocab, lambda t, i: True)
    out = speculative_generate(model, [[0, 1, 2]], n, k=k)
    assert out.tokens == [expected_truth(3, n, vocab)]
    assert out.forwards == 1 + math.ceil((n - 1) / (k + 1))  # prefill, then k+1 tokens a pass
    assert out.acceptance_rates == [1.0] * k


@pytest.mark.parametrize("k", [1, 3])
def test_stub_drafts_never_accepted(k):
    vocab, n = 11, 12
    model = greedy_stub(4, vocab, lambda t, i: False)
    out = speculative_generate(model, [[0, 1]], n, k=k)
    assert out.tokens == [expected_truth(2, n, vocab)]
    assert out.forwards == n and out.tokens_per_forward == 1.0
    # n - 1 verify passes; the last has room for one token only, so it drafts nothing.
    assert out.draft_accepts == [0] * k and out.draft_attempts[0] == n - 2
    assert out.draft_attempts[1:] == [0] * (k - 1)  # deeper drafts never got a chance
    assert out.acceptance_rates[0] == 0.0


def test_stub_drafts_sometimes_accepted_matches_oracle():
    vocab, n, prompt_len = 13, 25, 4
    right = lambda t, i: t % 3 == 0  # noqa: E731
    model = greedy_stub(2, vocab, right)
    out = speculative_generate(model, [list(range(prompt_len))], n, k=1)
    # Oracle for k=1: the pending token sits at p; head 2 at p-1 drafted the token at p+1.
    p, made, forwards, attempts, accepts = prompt_len, 1, 1, 0, 0
    while made < n:
        forwards += 1
        if n - made >= 2:
            attempts += 1
            if right(p - 1, 1):
                accepts, made, p = accepts + 1, made + 2, p + 2
                continue
        made, p = made + 1, p + 1
    assert out.tokens == [expected_truth(prompt_len, n, vocab)]
    assert (out.forwards, out.draft_attempts, out.draft_accepts) == (forwards, [attempts], [accepts])
    assert 0 < accepts < attempts


def test_stub_rows_accept_different_counts_in_one_batch():
    vocab = 11
    model = greedy_stub(4, vocab, lambda t, i: t < 20)  # drafts good early, bad later
    prompts = [[1] * 2, [1] * 30, [1] * 9]
    out = speculative_generate(model, prompts, 10, k=3)
    assert out.tokens == [expected_truth(len(p), 10, vocab) for p in prompts]
    assert out.row_forwards[0] < out.row_forwards[1]  # the row past position 20 needs more passes
    assert out.row_forwards[1] == 10


def test_stub_tree_finds_second_ranked_candidates():
    vocab, n = 11, 17
    model = greedy_stub(4, vocab, lambda t, i: True, rank=1)  # the right draft is always 2nd best
    chain = speculative_generate(model, [[3, 4]], n, k=3)
    tree = tree_generate(model, [[3, 4]], n, tree=(2, 2, 2))
    assert chain.tokens == tree.tokens == [expected_truth(2, n, vocab)]
    assert chain.draft_accepts == [0, 0, 0]
    assert tree.acceptance_rates == [1.0, 1.0, 1.0]
    assert tree.forwards == 1 + math.ceil((n - 1) / 4)
    # Node order: top-1 chain 1..3, then breadth first: (1,) is node 4, (1, 1) node 7, (1, 1, 1)
    # node 14; their keys/values move from slots p+4, p+7, p+14 to p+1..p+3.
    assert [DraftTree.from_branching((2, 2, 2)).paths.index(p) + 1 for p in [(1,), (1, 1), (1, 1, 1)]] == [4, 7, 14]
    src, dst = model.moves[0]
    assert (dst - dst[:, :1]).tolist() == [[0, 1, 2]]
    assert (src - dst[:, :1] + 1).tolist() == [[4, 7, 14]]
    assert len(model.moves) == tree.forwards - 1  # every pass left the top-1 chain


def test_stub_tree_top1_path_needs_no_copy():
    model = greedy_stub(4, 11, lambda t, i: True)  # top-1 drafts always right
    out = tree_generate(model, [[3, 4]], 17, tree=(3, 2, 1))
    assert out.tokens == [expected_truth(2, 17, 11)] and out.acceptance_rates == [1.0, 1.0, 1.0]
    assert model.moves == []  # the top-1 chain already sits in slots p+1..p+3


# ----- draft trees ------------------------------------------------------------------------------
def test_draft_tree_shapes_and_tables():
    tree = DraftTree.from_branching((3, 2, 1))
    assert tree.size == 1 + 3 + 6 + 6 and tree.depth == 3 and tree.widths() == [3, 2, 1]
    assert not tree.is_chain and DraftTree.chain(3).is_chain
    tables = tree.tables("cpu")
    node = tree.paths.index((2, 1, 0)) + 1
    on_path = [0, tree.paths.index((2,)) + 1, tree.paths.index((2, 1)) + 1, node]
    assert tables.path[node].tolist() == on_path
    assert tables.ancestors[node].nonzero().squeeze(-1).tolist() == on_path
    assert tables.depth[node] == 3 and tables.rank[node] == 0
    sparse = DraftTree.from_paths([(0,), (1,), (0, 0), (0, 1), (0, 0, 0)])
    assert sparse.widths() == [2, 2, 1] and sparse.size == 6
    with pytest.raises(GenerationError, match="has no parent"):
        DraftTree.from_paths([(0,), (1, 0)])
    with pytest.raises(GenerationError, match="widths must be positive"):
        DraftTree.from_branching((2, 0))


def test_tree_mask_sees_prefix_ancestors_and_self():
    tree = DraftTree.from_branching((2, 1))  # nodes: 0 root, 1 (0,), 2 (0,0), 3 (1,), 4 (1,0)
    assert tree.paths == ((0,), (0, 0), (1,), (1, 0))
    tables = tree.tables("cpu")
    base = torch.tensor([3])
    slots = base[:, None] + torch.arange(5)
    block = Block(base, base[:, None] + tables.depth, slots, torch.ones(1, 5, dtype=torch.bool),
                  torch.ones(1, dtype=torch.bool), HostBlock([3], [[True] * 5], [True]))
    mask = tree_mask(block, tables.ancestors, 10)[0].int()
    assert mask[4].tolist() == [1, 1, 1, 1, 0, 0, 1, 1, 0, 0]  # prefix 0..2, root 3, node 3 (slot 6), itself
    assert mask[2].tolist() == [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
    assert mask[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]


def test_accepted_nodes_follow_the_agreeing_path_within_the_budget():
    tree = DraftTree.from_branching((2, 1))  # nodes: 0 root, 1 (0,), 2 (0,0), 3 (1,), 4 (1,0)
    tables = tree.tables("cpu")
    nodes = [[5, 7, 8, 6, 9]] * 3
    # head 1 after the root says 6 (rank-2 candidate, node 3), after node 3 says 9 (node 4)
    verdict = [[6, 1, 1, 9, 2]] * 3
    useful = [[True] * 5, [True, True, False, True, False], [False] * 5]  # depth budget 2, 1; finished row
    host = HostBlock([0, 0, 0], useful, [True, True, False])
    assert accepted_nodes(nodes, verdict, host, tables) == [4, 3, 0]
    assert host.max_depth(tables) == [2, 1, 0]
    # the top-1 chain agreeing: node 2, depth 2
    assert accepted_nodes([[5, 7, 8, 6, 9]], [[7, 8, 3, 0, 0]], HostBlock([0], [[True] * 5], [True]), tables) == [2]


# ----- real models: exact equality with greedy --------------------------------------------------
# Random float64 4-head models with sharp logits (init_std 0.3); fields overridable.
random_model = partial(tiny_model, dtype=torch.float64, n_future=4, vocab_size=37, max_seq_len=64, init_std=0.3)


def random_prompts(lengths: list[int], seed: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(vocab, (n,), generator=g).tolist() for n in lengths]


SONG_LEN = 23


def song_windows(n: int, length: int, seed: int, vocab: int, noise: float = 0.0) -> Tensor:
    """Windows of a fixed random 23-token loop, optionally with random tokens mixed in."""
    song = torch.randint(vocab, (SONG_LEN,), generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(SONG_LEN, (n,), generator=g)
    x = song[(start[:, None] + torch.arange(length)) % SONG_LEN]
    flip = torch.rand(n, length, generator=g) < noise
    return torch.where(flip, torch.randint(vocab, (n, length), generator=g), x)


@pytest.fixture(scope="module")
def trained() -> MTPModel:
    """A tiny 4-head model trained for 100 steps on a noisy loop: drafts are often accepted."""
    model = tiny_model(0, training=True, n_future=4, vocab_size=32, max_seq_len=64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(100):
        opt.zero_grad()
        mtp_backward(model, song_windows(8, 32, step, 32, noise=0.1))
        opt.step()
    return model.double().eval()


def trained_prompts(n: int, seed: int) -> list[list[int]]:
    """Loop windows (drafts mostly right) mixed with random prompts (drafts often wrong)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 14, (n,), generator=g).tolist()
    loops = [song_windows(1, m, seed + i, 32)[0].tolist() for i, m in enumerate(lengths[: n // 2])]
    return loops + random_prompts(lengths[n // 2 :], seed, 32)


@pytest.mark.parametrize("seed", [0, 1])
def test_random_model_chain_and_tree_equal_greedy(seed):
    model = random_model(seed)
    prompts = random_prompts([1, 6, 3, 12, 8], seed, 37)
    greedy = generate(model, prompts, 14).tokens
    for k in (1, 2, 3):
        assert speculative_generate(model, prompts, 14, k=k).tokens == greedy, f"k={k}"
    for shape in ((3, 2, 1), (2, 2), (4,)):
        assert tree_generate(model, prompts, 14, tree=shape).tokens == greedy, f"tree={shape}"
    assert speculative_sample(model, prompts, 14, temperature=0.0).tokens == greedy


@pytest.mark.parametrize("head_type", ["causal", "linear", "anticausal"])
def test_other_head_types_equal_greedy(head_type):
    model = random_model(3, head_type=head_type)
    prompts = random_prompts([4, 9], 3, 37)
    greedy = generate(model, prompts, 10).tokens
    assert speculative_generate(model, prompts, 10, k=3).tokens == greedy
    assert tree_generate(model, prompts, 10).tokens == greedy


def test_trained_model_every_k_and_trees_equal_greedy_batched_and_alone(trained, monkeypatch):
    prompts = trained_prompts(12, seed=5)
    greedy = generate(trained, prompts, 30).tokens
    results = {f"spec{k}": speculative_generate(trained, prompts, 30, k=k) for k in (1, 2, 3)}
    moved: list[int] = []
    real_move = trained.cache_move
    monkeypatch.setattr(trained, "cache_move", lambda rows, src, dst: (
        moved.append(int((src != dst).sum())), real_move(rows, src, dst)))
    results["tree"] = tree_generate(trained, prompts, 30, tree=(3, 2, 1))
    assert sum(moved) > 0  # some accepted paths left the top-1 chain and were compacted
    results["sparse"] = tree_generate(trained, prompts, 30, tree=DraftTree.from_paths(
        [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]))
    for name, res in results.items():
        assert res.tokens == greedy, name
    # Drafts were useful, and rows accepted different amounts.
    assert results["spec3"].tokens_per_forward > 2.0
    assert results["tree"].tokens_per_forward > 2.0
    assert len(set(results["spec3"].row_forwards)) > 1
    assert all(0.3 < r <= 1.0 for r in results["spec3"].acceptance_rates)
    for i in (0, 6, 11):  # rows decoded alone equal their batched output
        assert speculative_generate(trained, [prompts[i]], 30, k=3).tokens[0] == greedy[i]
        assert tree_generate(trained, [prompts[i]], 30).tokens[0] == greedy[i]


def test_trained_model_at_the_context_end(trained):
    # max_seq_len = 64: drafts and tree nodes past the cache must be cut, output unchanged.
    prompts = [song_windows(1, n, n, 32)[0].tolist() for n in (50, 58, 62, 63, 64)] + [[5, 6]]
    greedy = generate(trained, prompts, 20)
    assert [len(t) for t in greedy.tokens] == [14, 6, 2, 1, 0, 20]
    for res in (speculative_generate(trained, prompts, 20, k=3), tree_generate(trained, prompts, 20)):
        assert res.tokens == greedy.tokens and res.stop_reasons == greedy.stop_reasons


def test_trained_model_stop_tokens_and_streaming(trained):
    prompts = trained_prompts(6, seed=9)
    free = generate(trained, prompts, 25).tokens
    stop = free[0][7]
    expect = [row[: row.index(stop) + 1] if stop in row else row for row in free]
    for decode in (lambda **kw: speculative_generate(trained, prompts, 25, k=3, **kw),
                   lambda **kw: tree_generate(trained, prompts, 25, **kw)):
        seen: list[list[list[int]]] = []
        res = decode(stop_tokens=[stop], on_tokens=seen.append)
        assert res.tokens == expect
        assert [sum((s[r] for s in seen), []) for r in range(len(prompts))] == res.tokens
        assert len(seen) == res.forwards
        assert res.stop_reasons[0] == "stop"


def test_continuous_batching_equals_greedy(trained):
    prompts = trained_prompts(10, seed=13) + [song_windows(1, 62, 3, 32)[0].tolist(), [5, 6]]
    free = generate(trained, prompts, 24).tokens
    stop = free[1][5]
    expect = generate(trained, prompts, 24, stop_tokens=[stop])
    assert expect.stop_reasons[1] == "stop" and len(expect.tokens[10]) == 2  # at the context end
    decoders = {
        "spec1": lambda **kw: speculative_generate(trained, prompts, 24, k=1, **kw),
        "spec3": lambda **kw: speculative_generate(trained, prompts, 24, k=3, **kw),
        "tree": lambda **kw: tree_generate(trained, prompts, 24, tree=(3, 2, 1), **kw),
        "sample t=0": lambda **kw: speculative_sample(trained, prompts, 24, k=2, temperature=0.0, seed=1, **kw),
    }
    for batch_size in (1, 4):
        for name, decode in decoders.items():
            seen: list[list[list[int]]] = []
            res = decode(stop_tokens=[stop], batch_size=batch_size, on_tokens=seen.append)
            assert res.tokens == expect.tokens and res.stop_reasons == expect.stop_reasons, (name, batch_size)
            assert [sum((s[i] for s in seen), []) for i in range(len(prompts))] == res.tokens
            assert len(seen) == res.forwards and trained.cache_batch == batch_size
            assert res.tokens_per_forward > 1.5, name


def test_speculative_errors():
    model = random_model(0, n_future=3)
    with pytest.raises(GenerationError, match="need 4 heads, but the model has n_future=3"):
        speculative_generate(model, [[1]], 4, k=3)
    with pytest.raises(GenerationError, match="k must be >= 1"):
        speculative_generate(model, [[1]], 4, k=0)
    with pytest.raises(GenerationError, match="need 4 heads"):
        tree_generate(model, [[1]], 4, tree=(2, 2, 2))
    with pytest.raises(GenerationError, match="n_future >= 2"):
        speculative_sample(random_model(0, n_future=1), [[1]], 4)
    with pytest.raises(GenerationError, match="prompt 0 is empty"):
        speculative_generate(model, [[]], 4)
    with pytest.raises(GenerationError, match="temperature must be >= 0"):
        speculative_sample(model, [[1]], 4, temperature=-1.0)


# ----- speculative sampling: the rejection rule and the output distribution ---------------------
def sampling_stub(p: list[float], q: list[float], length: int = 40) -> StubModel:
    """Head 1 has distribution p at every position, head 2 has q."""
    table = torch.log(torch.tensor([p, q]))[:, None, :].expand(2, length, len(p)).contiguous()
    return StubModel(table)


def test_stub_sampling_acceptance_rule():
    p = [0.5, 0.3, 0.2, 0.0]
    same = speculative_sample(sampling_stub(p, p), [[0]] * 200, 8, k=1, seed=0)
    assert same.acceptance_rates == [1.0]  # q == p: min(1, p/q) = 1
    disjoint = speculative_sample(sampling_stub(p, [0.0, 0.0, 0.0, 1.0]), [[0]] * 200, 8, k=1, seed=0)
    assert disjoint.acceptance_rates == [0.0]  # p(d) = 0 for every draft
    assert all(3 not in row for row in disjoint.tokens)  # and the rejected drafts never leak out
    q = [0.1, 0.2, 0.3, 0.4]
    some = speculative_sample(sampling_stub(p, q), [[0]] * 3000, 9, k=1, seed=1)
    overlap = sum(min(a, b) for a, b in zip(p, q))  # P(accept) = sum_x min(p(x), q(x)) = 0.6
    n = some.draft_attempts[0]
    assert abs(some.acceptance_rates[0] - overlap) < 4 * math.sqrt(overlap * (1 - overlap) / n)
    counts = Counter(t for row in some.tokens for t in row)
    assert passes_chi_square(counts, {i: pi for i, pi in enumerate(p) if pi > 0}, sum(counts.values()))


def chi_square(counts: Counter, probs: dict, total: int) -> tuple[float, int]:
    """Pearson statistic and its degrees of freedom; cells expecting fewer than 5 are pooled."""
    unexpected = sum(c for x, c in counts.items() if x not in probs)
    if unexpected:
        return math.inf, 1  # sampled something of probability zero
    stat, cells, pooled_obs, pooled_exp = 0.0, 0, 0, 0.0
    for x, px in probs.items():
        if px * total < 5:
            pooled_obs, pooled_exp = pooled_obs + counts.get(x, 0), pooled_exp + px * total
        else:
            stat, cells = stat + (counts.get(x, 0) - px * total) ** 2 / (px * total), cells + 1
    if pooled_exp > 0:
        stat, cells = stat + (pooled_obs - pooled_exp) ** 2 / pooled_exp, cells + 1
    return stat, cells - 1


def passes_chi_square(counts: Counter, probs: dict, total: int) -> bool:
    """True unless the counts reject `probs` at p = 1e-4."""
    stat, df = chi_square(counts, probs, total)
    return stat < chi2_critical(df)


def chi2_critical(df: int, z: float = 3.719) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile; z = 3.719 is p = 1e-4."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def exact_sequence_probs(model: MTPModel, prompt: list[int], n: int, **sampling) -> dict:
    """P(first n tokens) under plain sampling, by enumerating every sequence (tiny vocab)."""
    probs = {(): 1.0}
    for _ in range(n):
        seqs = list(probs)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + list(s) for s in seqs]), heads=1)[:, -1, 0]
        step = sampling_probs(logits, **sampling).double()
        probs = {s + (x,): probs[s] * float(step[i, x]) for i, s in enumerate(seqs)
                 for x in range(step.shape[-1]) if step[i, x] > 0}
    return probs


# A small float64 4-head model with peaky, disagreeing heads, so drafts are often but not always kept.
small_model = partial(tiny_model, dtype=torch.float64, dim=32, n_layers=5, n_heads=2, n_kv_heads=1, hidden_dim=64,
                      n_future=4, max_seq_len=32, init_std=0.5)


def resample_from_target(p, q, drafts, useful, max_depth, generator):
    """A classic bug: on rejection, redraw from p instead of norm(max(0, p - q))."""
    B, k = drafts.shape
    p_d, q_d = p[:, :k].gather(-1, drafts[..., None])[..., 0], q.gather(-1, drafts[..., None])[..., 0]
    ok = (torch.rand(B, k, generator=generator, dtype=p.dtype) * q_d <= p_d) & useful
    accepted = ok.long().cumprod(-1).sum(-1)
    return accepted, torch.multinomial(p[torch.arange(B), accepted], 1, generator=generator)[:, 0]


@pytest.mark.parametrize("sampling, k, n", [(dict(temperature=1.0), 2, 4),
                                            (dict(temperature=0.8, top_k=3, top_p=0.95), 3, 5)])
def test_speculative_sampling_preserves_the_distribution(sampling, k, n, monkeypatch):
    # Joint distribution of the first n tokens on a 4-token vocabulary; n = k + 2, so one verify
    # pass can use every draft depth, and rejections at every depth feed the later tokens.
    model, prompt, samples = small_model(2, vocab_size=4), [1], 4000
    exact = exact_sequence_probs(model, prompt, n, **sampling)
    plain = generate(model, [prompt] * samples, n, seed=321, **sampling)
    assert passes_chi_square(Counter(tuple(t) for t in plain.tokens), exact, samples)  # enumeration ok
    spec = speculative_sample(model, [prompt] * samples, n, k=k, seed=123, **sampling)
    assert passes_chi_square(Counter(tuple(t) for t in spec.tokens), exact, samples)
    assert all(0.1 < r < 0.9 for r in spec.acceptance_rates)  # both branches ran at every depth
    # The test has power: the same run with a subtly wrong rule fails it.
    monkeypatch.setattr(spec_mod, "rejection_step", resample_from_target)
    broken = speculative_sample(model, [prompt] * samples, n, k=k, seed=123, **sampling)
    assert not passes_chi_square(Counter(tuple(t) for t in broken.tokens), exact, samples)
