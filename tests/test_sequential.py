"""Sequential (DeepSeek-V3-style) heads: drafts made one after another, each head reading the
previous head's output and the token before its target. The drafter's caches and per-position
states are checked against an uncached forward; its output against greedy, in every dtype."""

from __future__ import annotations

import copy
from collections import Counter
from functools import partial

import pytest
import torch

from mtp import ModelConfig, MTPModel, generate, speculative_generate
from mtp.generate import GenerationError
from mtp.model import ConfigError
from mtp.speculative import SequentialDrafter, speculative_sample, tree_generate

from conftest import tiny_model
from test_speculative import exact_sequence_probs, passes_chi_square

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
seq_model = partial(tiny_model, n_future=4, head_type="sequential", init_std=0.2)


def prompts(seed: int = 1, count: int = 5, low: int = 1, high: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=g)
    return [torch.randint(0, 512, (int(n),), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("k, batch_size, tree", [(3, None, None), (2, 2, None), (3, 1, None), (3, 2, (3, 2, 1))])
def test_drafts_equal_an_uncached_forward(monkeypatch, k, batch_size, tree):
    # Every draft the decoder makes equals head j's logits at the row's last position in a plain
    # forward over the committed text followed by the earlier drafts: the draft heads' KV caches
    # and kept per-position states hold exactly what an uncached forward computes.
    model = seq_model(0, dtype=torch.float64)
    reference = copy.deepcopy(model)
    draft = SequentialDrafter.draft
    checked = []

    def checking(self, rows, start, last, pending):
        out = draft(self, rows, start, last, pending)
        for i, r in enumerate(rows):
            if not self.state.is_active(r):
                continue  # a finished row drafts on, unused
            d = out[i].argmax(-1).tolist()
            text = self.tokens(r, 0, int(last[i]) + 1) + [int(pending[i])] + d[:-1]
            with torch.no_grad():
                ref = reference(torch.tensor([text]))[0, int(last[i]), 1 : k + 1]
            torch.testing.assert_close(out[i], ref, rtol=1e-9, atol=1e-9)
            checked.append(int(last[i]) - int(start[i]))
        return out

    monkeypatch.setattr(SequentialDrafter, "draft", checking)
    ps = prompts()
    if tree is None:
        res = speculative_generate(model, ps, 30, k=k, batch_size=batch_size)
    else:  # the accepted path may leave the top-1 chain: its head-1 states are moved into place
        import mtp.speculative as spec
        moves = []
        compact = spec.compact_path
        monkeypatch.setattr(spec, "compact_path", lambda *a: moves.append(1) or compact(*a))
        res = tree_generate(model, ps, 30, tree=tree, batch_size=batch_size)
        assert moves  # passes that accepted a path off the top-1 chain
    assert res.tokens == generate(model, ps, 30).tokens
    assert len(checked) > 20 and max(checked) >= 1  # prefills and passes that accepted drafts


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_sequential_mode_batched_and_alone_equals_greedy_alone(dtype):
    model, ps, n = seq_model(dtype=DTYPES[dtype]), prompts(2, 8, 3, 60), 40
    alone = [generate(model, [p], n).tokens[0] for p in ps]
    assert min(len(set(t)) for t in alone) > 10  # varied output, not one repeated token
    for k in (1, 2, 3):
        assert speculative_generate(model, ps, n, k=k).tokens == alone, k
        assert speculative_generate(model, ps, n, k=k, batch_size=3).tokens == alone, k
    assert [speculative_generate(model, [p], n, k=3).tokens[0] for p in ps] == alone
    assert speculative_generate(model, ps, n, k=3, drafter="both", batch_size=3).tokens == alone
    # Trees: head j's top candidates after the top-1 chain's drafts, below every node of depth j-1.
    for tree in ((3, 2, 1), (2, 1)):
        assert tree_generate(model, ps, n, tree=tree).tokens == alone, tree
        assert tree_generate(model, ps, n, tree=tree, batch_size=3).tokens == alone, tree
    # Temperature 0 through the sampling path is greedy too.
    assert speculative_sample(model, ps, n, k=2, temperature=0.0).tokens == alone


@pytest.mark.parametrize("dtype", DTYPES)
def test_finished_rows_sit_out_of_later_passes(monkeypatch, dtype):
    # Once some rows of a batch have finished, a verify pass runs only the others (in their own
    # cache rows): every prompt still gets the tokens it gets decoded alone, chains, trees and
    # prompt lookup alike, and the passes really do shrink.
    import mtp.speculative as spec
    model, ps, n = seq_model(dtype=DTYPES[dtype]), prompts(3, 7, 3, 50), 30
    alone = [generate(model, [p], n).tokens[0] for p in ps]
    verify, sizes = spec.verify_forward, []

    def counting(model_, tree, tables, block, nodes, rows=None):
        sizes.append(nodes.shape[0] if rows is None else rows.numel())
        return verify(model_, tree, tables, block, nodes, rows)

    monkeypatch.setattr(spec, "verify_forward", counting)
    for run in (partial(speculative_generate, k=3), partial(speculative_generate, k=2, drafter="both"),
                partial(speculative_generate, k=3, drafter="lookup"), partial(tree_generate, tree=(3, 2, 1))):
        sizes.clear()
        assert run(model, ps, n, batch_size=3).tokens == alone
        assert max(sizes) == 3 and min(sizes) < 3


def test_sequential_sampling_preserves_the_distribution():
    # As for parallel heads (test_speculative): the joint distribution of the first 5 tokens on a
    # 4-token vocabulary, enumerated exactly, against 1500 speculative samples with 3 drafts.
    torch.manual_seed(2)
    cfg = ModelConfig(dim=32, n_layers=5, n_heads=2, n_kv_heads=1, hidden_dim=64, vocab_size=4, n_future=4,
                      max_seq_len=32, init_std=0.5, head_type="sequential")
    model, prompt, samples, n = MTPModel(cfg).double().eval(), [1], 1500, 5
    exact = exact_sequence_probs(model, prompt, n, temperature=1.0)
    spec = speculative_sample(model, [prompt] * samples, n, k=3, seed=123, temperature=1.0)
    assert passes_chi_square(Counter(tuple(t) for t in spec.tokens), exact, samples)
    # drafts accepted and rejected at depths 1 and 2; depth 3 tried
    assert all(0 < a < n for a, n in zip(spec.draft_accepts[:2], spec.draft_attempts[:2]))
    assert spec.draft_attempts[2] > 0


def test_forward_shape_and_head_structure():
    m = seq_model(0)
    assert [m.head_parent(i) for i in range(4)] == [-1, 0, 1, 2]
    out = m(torch.randint(0, 512, (2, 9)))
    assert out.shape == (2, 9, 4, 512) and not torch.allclose(out[:, :, 1], out[:, :, 2])


def test_finetune_adds_sequential_heads_to_a_parallel_model(corpus, tmp_path):
    # The route for a model you already have: its head 1 (and trunk) kept, heads 2..n become
    # sequential heads whose blocks start as copies of head 1's, trained alone; decoding is exact.
    from mtp.checkpoint import load_model
    from mtp.train import train
    from conftest import tiny_train_config

    train(tiny_train_config(corpus, tmp_path / "base", steps=2, n_future=2))
    train(tiny_train_config(corpus, tmp_path / "ft", steps=3, init_from=str(tmp_path / "base"), n_future=3,
                            trainable="extra_heads", targets="self", model={"head_type": "sequential"}))
    base, _ = load_model(tmp_path / "base")
    ft, _ = load_model(tmp_path / "ft")
    assert ft.cfg.head_type == "sequential" and ft.cfg.n_trunk == base.cfg.n_trunk
    x = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ft(x)[:, :, 0], base(x)[:, :, 0])
    ps = [[int(t) for t in x[0, :7]], [int(t) for t in x[1, :3]]]
    assert speculative_generate(ft, ps, 16, k=2).tokens == generate(ft, ps, 16).tokens


# ----- one module shared across depths (shared_head) ---------------------------------------------
shared_model = partial(seq_model, shared_head=True)


def test_shared_head_config_and_weights():
    with pytest.raises(ConfigError, match="shared_head.*sequential"):
        ModelConfig(n_layers=6, n_future=4, head_type="parallel", shared_head=True)
    m = shared_model(0)
    # Parameter matching: head 1 and the shared module are two blocks; the trunk keeps the rest.
    assert m.cfg.n_trunk == m.cfg.n_layers - 2 and len(m.heads) == 4
    assert m.num_params() == seq_model(0, n_future=2).num_params()
    assert all(p is q for h in m.heads[2:] for p, q in zip(h.parameters(), m.heads[1].parameters()))
    out = m(torch.randint(0, 512, (2, 9)))
    assert out.shape == (2, 9, 4, 512) and not torch.allclose(out[:, :, 2], out[:, :, 3])


def test_shared_head_saves_once_and_loads_tied(tmp_path):
    from mtp.checkpoint import load_model, save_checkpoint

    m = shared_model(0)
    assert not any(k.startswith(("heads.2.", "heads.3.")) for k in m.state_dict())
    ckpt = save_checkpoint(tmp_path, 1, m)
    loaded, _ = load_model(ckpt)
    x = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=0)
    assert loaded.heads[3].eh_proj.weight is loaded.heads[1].eh_proj.weight
    # Decoding deeper than trained adds depths (tied, with their own caches), saved as before.
    speculative_generate(loaded, [[1, 2, 3]], 8, k=5)
    assert len(loaded.heads) == 6 and set(loaded.state_dict()) == set(m.state_dict())


@pytest.mark.parametrize("k", [3, 5])
def test_shared_head_drafts_equal_an_uncached_forward(monkeypatch, k):
    # As above, also past the trained depth (k=5 drafts with n_future=4): each depth's own cache
    # holds what an uncached forward of the shared module at that depth computes.
    model = shared_model(0, dtype=torch.float64)
    reference = copy.deepcopy(model)
    reference.extend_shared_head(k)
    draft = SequentialDrafter.draft
    checked = []

    def checking(self, rows, start, last, pending):
        out = draft(self, rows, start, last, pending)
        for i, r in enumerate(rows):
            if self.state.is_active(r):
                d = out[i].argmax(-1).tolist()
                text = self.tokens(r, 0, int(last[i]) + 1) + [int(pending[i])] + d[:-1]
                with torch.no_grad():
                    ref = reference(torch.tensor([text]), heads=k + 1)[0, int(last[i]), 1:]
                torch.testing.assert_close(out[i], ref, rtol=1e-9, atol=1e-9)
                checked.append(int(last[i]) - int(start[i]))
        return out

    monkeypatch.setattr(SequentialDrafter, "draft", checking)
    ps = prompts()
    res = speculative_generate(model, ps, 30, k=k, batch_size=2)
    assert res.tokens == generate(model, ps, 30).tokens
    assert len(checked) > 20 and max(checked) >= 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_shared_head_modes_equal_greedy(dtype):
    model, ps, n = shared_model(dtype=DTYPES[dtype]), prompts(2, 8, 3, 60), 40
    alone = [generate(model, [p], n).tokens[0] for p in ps]
    assert min(len(set(t)) for t in alone) > 10
    for k in (1, 3, 6):
        assert speculative_generate(model, ps, n, k=k, batch_size=3).tokens == alone, k
    assert [speculative_generate(model, [p], n, k=6).tokens[0] for p in ps] == alone
    assert tree_generate(model, ps, n, tree=(2, 2, 1, 1), batch_size=3).tokens == alone
    with pytest.raises(GenerationError, match="at most 32 deep"):
        speculative_generate(model, ps, n, k=33)


def test_shared_head_trains_and_resumes(corpus, tmp_path):
    from mtp.checkpoint import load_model
    from mtp.train import train
    from conftest import tiny_train_config

    out = tmp_path / "run"
    train(tiny_train_config(corpus, out, steps=4, n_future=3, head_type="sequential", shared_head=True))
    m, _ = load_model(out)
    assert m.cfg.shared_head and m.cfg.n_trunk == m.cfg.n_layers - 2
    assert m.heads[2].block.feed_forward.w2.weight is m.heads[1].block.feed_forward.w2.weight
    ps = [[1, 2, 3, 4], [5, 6]]
    assert speculative_generate(m, ps, 16, k=4).tokens == generate(m, ps, 16).tokens
