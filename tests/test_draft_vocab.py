"""A reduced draft vocabulary: heads 2..n score only the K most frequent tokens through a slice of
the unembedding (`MTPModel.draft_logits` / `draft_unembed`); head 1 keeps the full vocabulary."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from mtp import IGNORE, align_targets, load_model, mtp_backward, save_checkpoint
from mtp.data import TokenData, validation_batches
from mtp.loss import self_distill_targets
from mtp.model import ConfigError
from mtp.train import evaluate, train

from conftest import tiny_model, tiny_train_config

DRAFT = [0, 2, 3, 5, 7, 8, 11, 13, 17, 19, 23, 29, 31]


def test_draft_logits_are_a_slice_and_draft_unembed_masks_the_rest(tmp_path):
    model = tiny_model(0, n_future=3, init_std=0.2)
    h = torch.randn(2, 5, model.cfg.dim)
    with torch.no_grad():
        full = model.unembed(h)
        assert torch.equal(model.draft_unembed(h), full) and torch.equal(model.draft_logits(h), full)
        model.set_draft_vocab(torch.tensor(DRAFT[::-1]))  # stored sorted
        assert model.draft_ids.tolist() == DRAFT and model.cfg.draft_vocab == len(DRAFT)
        small, masked = model.draft_logits(h), model.draft_unembed(h)
    assert small.shape == (2, 5, len(DRAFT))
    torch.testing.assert_close(small, full[..., DRAFT])
    torch.testing.assert_close(masked[..., DRAFT], full[..., DRAFT])
    outside = torch.ones(model.cfg.vocab_size, dtype=torch.bool)
    outside[DRAFT] = False
    assert torch.isneginf(masked[..., outside]).all()
    assert set(masked.argmax(-1).flatten().tolist()) <= set(DRAFT)
    with torch.no_grad():  # the cached rows follow the weights
        model.output.weight.mul_(2)
        torch.testing.assert_close(model.draft_logits(h), 2 * small)
    # Saved with the weights and the config.
    save_checkpoint(tmp_path / "run", 0, model)
    loaded, _ = load_model(tmp_path / "run")
    assert loaded.draft_ids.tolist() == DRAFT and loaded.cfg.draft_vocab == len(DRAFT)
    with pytest.raises(ConfigError):
        model.set_draft_vocab([1, 1, 2])
    model.set_draft_vocab(None)
    assert model.draft_ids is None and "draft_ids" not in model.state_dict()


def _grads(model):
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def reference(model, tokens, T, targets, k):
    """Full logits; draft heads' logits cut to the draft columns; targets and teacher mapped."""
    n, V = model.cfg.n_future, model.cfg.vocab_size
    logits = model(tokens[:, :T])
    tg = align_targets(tokens, n, T, model.cfg.head_type == "sequential")
    with torch.no_grad():
        p1 = logits[:, :, 0].softmax(-1)
    if targets == "self":
        tg = self_distill_targets(tg, p1.argmax(-1))
    pos = torch.full((V,), -1, dtype=torch.long)
    pos[DRAFT] = torch.arange(len(DRAFT))
    loss = F.cross_entropy(logits[:, :, 0].reshape(-1, V), tg[:, :, 0].reshape(-1), ignore_index=IGNORE)
    for i in range(1, n):
        small = logits[:, :, i][..., DRAFT]
        if targets == "distill":
            top, ids = p1.topk(k, dim=-1)
            dense = torch.zeros_like(p1).scatter(-1, ids, top)[..., DRAFT][:, i:]  # teacher inside the draft vocab
            mass = dense.sum(-1, keepdim=True)
            rows = mass[..., 0] > 0
            q = dense[rows] / mass[rows]
            logq = small[:, : T - i][rows].log_softmax(-1)
            loss = loss + (torch.xlogy(q, q) - q * logq).sum(-1).mean()
        else:
            t = tg[:, :, i]
            mapped = torch.where(t == IGNORE, IGNORE, pos[t.clamp(min=0)])
            mapped = mapped.masked_fill(mapped < 0, IGNORE)
            if (mapped != IGNORE).any():
                loss = loss + F.cross_entropy(small.reshape(-1, len(DRAFT)), mapped.reshape(-1), ignore_index=IGNORE)
    return loss


@pytest.mark.parametrize("head_type", ["parallel", "sequential"])
@pytest.mark.parametrize("targets", ["data", "self", "distill"])
def test_draft_vocab_gradients_equal_reference(head_type, targets):
    model = tiny_model(0, dtype=torch.float64, training=True, n_future=3, head_type=head_type, vocab_size=37,
                       init_std=0.3)
    model.set_draft_vocab(DRAFT)
    g = torch.Generator().manual_seed(1)
    tokens = torch.tensor(DRAFT)[torch.randint(0, len(DRAFT), (2, 13), generator=g)]
    tokens[:, ::4] = 36  # some targets outside the draft vocabulary
    model.zero_grad()
    reference(model, tokens, 10, targets, 6).backward()
    ref = _grads(model)
    model.zero_grad()
    mtp_backward(model, tokens, seq_len=10, chunk_size=7, targets=targets, distill_topk=6)
    got = _grads(model)
    assert set(got) == set(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-12, msg=k)


def test_most_frequent_tokens(corpus):
    data = TokenData(corpus, "train")
    counts = Counter(data.tokens.tolist())
    top = data.most_frequent(20)
    assert list(top) == sorted(top) and len(top) == 20
    assert min(counts[t] for t in top) >= max(c for t, c in counts.items() if t not in set(top.tolist()))


def test_finetune_with_a_draft_vocabulary(corpus, tiny_run, tmp_path):
    res = train(tiny_train_config(corpus, tmp_path / "ft", init_from=str(tiny_run), n_future=3,
                                  trainable="extra_heads", targets="distill", distill_topk=8, draft_vocab=40,
                                  steps=3, eval_every=0, save_every=3))
    model, _ = load_model(tmp_path / "ft")
    data = TokenData(corpus, "train")
    assert model.cfg.draft_vocab == 40 and model.draft_ids.tolist() == data.most_frequent(40).tolist()
    ckpt = tmp_path / "ft" / (tmp_path / "ft" / "latest").read_text().strip()
    assert json.loads((ckpt / "config.json").read_text())["draft_vocab"] == 40
    assert all(torch.isfinite(torch.tensor(res["val"]["loss"])))
    # Validation takes draft heads' argmax inside the draft vocabulary, as drafting does.
    val = TokenData(corpus, "val")
    ev = evaluate(model, val, 2, 32, 1, torch.device("cpu"))
    tokens = next(iter(validation_batches(val, 2, 32, 3, 1)))
    with torch.no_grad():
        logits = model(tokens[:, :32])
    outside = torch.ones(model.cfg.vocab_size, dtype=torch.bool)
    outside[model.draft_ids] = False
    draft = logits[:, :, 1].masked_fill(outside, float("-inf")).argmax(-1)
    assert set(draft.flatten().tolist()) <= set(model.draft_ids.tolist())
    assert ev["agree"][1] == pytest.approx(float((draft[:, :31] == logits[:, 1:, 0].argmax(-1)).double().mean()))
    model.set_draft_vocab(None)  # head 1 is unaffected by the draft vocabulary
    assert evaluate(model, val, 2, 32, 1, torch.device("cpu"))["loss"][0] == pytest.approx(ev["loss"][0])


@pytest.mark.parametrize("head_type", ["parallel", "sequential"])
def test_decoding_drafts_only_draft_tokens_and_equals_greedy(head_type, monkeypatch):
    # Drafts come from the draft vocabulary (every draft a verify pass sees is in it), and the
    # output is greedy's: head 1 verifies over the full vocabulary.
    from mtp import generate, speculative_generate
    from mtp import speculative as spec

    model = tiny_model(0, n_future=4, head_type=head_type, init_std=0.2)
    model.set_draft_vocab(list(range(0, 512, 3)))
    seen = []
    verify = spec.verify_forward

    def recording(model, tree, tables, block, nodes, rows=None):
        seen.append((nodes if rows is None else nodes[rows])[:, 1:].flatten())  # the rows verified
        return verify(model, tree, tables, block, nodes, rows)

    monkeypatch.setattr(spec, "verify_forward", recording)
    g = torch.Generator().manual_seed(4)
    ps = [torch.randint(0, 512, (int(n),), generator=g).tolist() for n in (5, 17, 30)]
    assert speculative_generate(model, ps, 24, k=3, batch_size=2).tokens == generate(model, ps, 24).tokens
    drafts = torch.cat(seen)
    assert len(drafts) > 30 and bool((drafts % 3 == 0).all())
