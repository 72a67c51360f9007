"""Distilled draft heads (targets="distill"): heads 2..n learn head 1's top-k distribution at their
offset; the memory-efficient step against a naive full-logits reference in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtp import IGNORE, align_targets, mtp_backward
from mtp.loss import head1_outputs, shifted_teacher

from conftest import tiny_model


def _grads(model):
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def reference_distill_loss(model, tokens, T, k, weights):
    """Head 1: cross-entropy on the data; head i >= 2 at t: KL(teacher || head) where the teacher is
    head 1's softmax at t+i-1 cut to its k likeliest tokens and renormalised. Full (B, T, n, V)
    logits, a dense teacher: nothing clever."""
    n = model.cfg.n_future
    logits = model(tokens[:, :T])
    V = logits.shape[-1]
    targets = align_targets(tokens, n, T, model.cfg.head_type == "sequential")
    with torch.no_grad():
        top, ids = logits[:, :, 0].softmax(-1).topk(k, dim=-1)
        dense = torch.zeros_like(logits[:, :, 0]).scatter(-1, ids, top / top.sum(-1, keepdim=True))
    heads = [F.cross_entropy(logits[:, :, 0].reshape(-1, V), targets[:, :, 0].reshape(-1), ignore_index=IGNORE)]
    for i in range(1, n):
        q = dense[:, i:]  # head 1 at t+i predicts x_{t+i+1}: what head i+1 at t predicts
        logp = logits[:, : T - i, i].log_softmax(-1)
        heads.append((torch.xlogy(q, q) - q * logp).sum(-1).mean())
    per_head = torch.stack(heads)
    return (torch.tensor(weights, dtype=per_head.dtype) * per_head).sum(), per_head


@pytest.mark.parametrize("head_type", ["parallel", "linear", "causal", "sequential"])
@pytest.mark.parametrize("chunk", [None, 7])
def test_distill_gradients_equal_reference(head_type, chunk):
    model = tiny_model(0, dtype=torch.float64, training=True, n_future=3, head_type=head_type, vocab_size=37,
                       init_std=0.2)
    tokens = torch.randint(0, 37, (2, 13))
    weights, k = [1.0, 0.7, 0.3], 5
    model.zero_grad()
    ref_loss, ref_heads = reference_distill_loss(model, tokens, 10, k, weights)
    (0.5 * ref_loss).backward()
    ref = _grads(model)
    model.zero_grad()
    loss, heads = mtp_backward(model, tokens, weights, seq_len=10, chunk_size=chunk, loss_scale=0.5,
                               targets="distill", distill_topk=k)
    got = _grads(model)
    assert set(got) == set(ref) == {name for name, _ in model.named_parameters()}
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-9, atol=1e-12, msg=name)
    torch.testing.assert_close(heads.double(), ref_heads.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-6, atol=1e-7)
    assert (heads[1:] > 0).all()  # a KL: positive until the head matches its teacher


def test_head1_outputs_are_the_sorted_distribution_and_the_next_token_nll():
    # k = V: every token, likeliest first; the NLL of the next token, 0 where there is none.
    model = tiny_model(0, dtype=torch.float64, n_future=2, vocab_size=23, init_std=0.2)
    tokens = torch.randint(0, 23, (2, 9))
    with torch.no_grad():
        h = model.hidden(tokens)[:, :, 0]
        ids, probs, nll = head1_outputs(model, h, 23, chunk_size=4, next_tokens=align_targets(tokens, 1)[..., 0])
        logp = model.unembed(h).log_softmax(-1)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 9, dtype=torch.float64))
    torch.testing.assert_close(probs, logp.exp().sort(-1, descending=True).values)
    assert (ids[..., 0] == logp.argmax(-1)).all()
    torch.testing.assert_close(nll[:, :-1], -logp[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0])
    assert (nll[:, -1] == 0).all()  # no next token: IGNORE gives 0


def test_shifted_teacher_table():
    ids = torch.arange(2 * 4 * 2).view(2, 4, 2)
    probs = torch.tensor([[0.3, 0.1]]).expand(2, 4, 2)
    sid, sp = shifted_teacher(ids, probs, 2)
    assert sid[0, :2].tolist() == ids[0, 2:].tolist()
    torch.testing.assert_close(sp[:, :2], torch.tensor([0.75, 0.25]).expand(2, 2, 2))
    assert (sp[:, 2:] == 0).all()  # t >= T - i: no target


def test_distill_refused_for_anticausal_heads_and_bad_k():
    model = tiny_model(0, training=True, n_future=2, head_type="anticausal", vocab_size=31)
    with pytest.raises(ValueError, match="anticausal"):
        mtp_backward(model, torch.randint(0, 31, (1, 8)), targets="distill")
    with pytest.raises(ValueError, match="distill_topk"):
        mtp_backward(tiny_model(0, n_future=2, vocab_size=31), torch.randint(0, 31, (1, 8)), targets="distill",
                     distill_topk=0)
