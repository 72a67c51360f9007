import pytest
import torch
import torch.nn.functional as F

from mtp import IGNORE, MTPModel, align_targets, mtp_backward, mtp_loss
from mtp.loss import self_distill_targets

from conftest import tiny_model


def test_align_targets_table():
    x = torch.tensor([[10, 11, 12, 13]])
    t = align_targets(x, 2)
    assert t[0, :, 0].tolist() == [11, 12, 13, IGNORE]
    assert t[0, :, 1].tolist() == [12, 13, IGNORE, IGNORE]


def test_align_targets_with_extra_tokens_fills_every_head():
    x = torch.arange(7)[None]  # T=4 inputs + 3 extra
    t = align_targets(x, 3, seq_len=4)
    assert t.shape == (1, 4, 3)
    assert t[0].tolist() == [[1, 2, 3], [2, 3, 4], [3, 4, 5], [4, 5, 6]]


def test_align_targets_sequential_needs_the_token_before_the_target_among_inputs():
    x = torch.arange(7)[None]  # T=4 inputs + 3 extra
    t = align_targets(x, 3, seq_len=4, sequential=True)
    # head i at t reads x_{t+i-1}: an input only while t+i-1 < 4
    assert t[0].tolist() == [[1, 2, 3], [2, 3, 4], [3, 4, IGNORE], [4, IGNORE, IGNORE]]
    assert torch.equal(align_targets(x, 3, sequential=True), align_targets(x, 3))  # no extra tokens: the same


def test_sequential_head_reads_the_token_ahead():
    # Head 2 at position t sees x_{t+1}: changing the token at position 3 changes head 2 at t=2
    # (and later), never earlier; head 1 at t=2 is unchanged (it sees x_0..x_2 only).
    model = tiny_model(0, dtype=torch.float64, training=True, n_future=3, head_type="sequential", vocab_size=37)
    a = torch.randint(0, 37, (1, 8))
    b = a.clone()
    b[0, 3] = (a[0, 3] + 1) % 37
    la, lb = model(a), model(b)
    torch.testing.assert_close(la[:, :3, 0], lb[:, :3, 0])
    torch.testing.assert_close(la[:, :2, 1], lb[:, :2, 1])
    assert not torch.allclose(la[:, 2, 1], lb[:, 2, 1])
    torch.testing.assert_close(la[:, :1, 2], lb[:, :1, 2])  # head 3 at t reads x_{t+2}
    assert not torch.allclose(la[:, 1, 2], lb[:, 1, 2])


def test_align_targets_never_wraps():
    x = torch.tensor([[5, 6, 7]])
    t = align_targets(x, 4)
    assert (t[0, :, 3] == IGNORE).all()  # head 4 has no target inside a 3-token window
    assert 5 not in t.tolist()  # the first token is never a target (no wrap-around)
    with pytest.raises(ValueError):
        align_targets(x, 2, seq_len=4)


def test_mtp_loss_is_sum_of_head_cross_entropies():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 3, 11)
    tokens = torch.randint(0, 11, (2, 8))
    loss, per_head = mtp_loss(logits, tokens)
    for i in range(3):
        ref = F.cross_entropy(logits[:, :, i].reshape(-1, 11), tokens[:, i + 1:i + 6].reshape(-1))
        torch.testing.assert_close(per_head[i], ref)
    torch.testing.assert_close(loss, per_head.sum())
    wloss, _ = mtp_loss(logits, tokens, weights=[1.0, 0.5, 0.0])
    torch.testing.assert_close(wloss, per_head[0] + 0.5 * per_head[1])


def _grads(model):
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def check_backward_equals_reference(model: MTPModel, chunk: int | None) -> dict[str, torch.Tensor]:
    """mtp_backward (3 or 4 heads, weights, loss scale, 11 of 14 tokens as inputs) against backward
    of the reference loss, in float64; returns the gradients."""
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 14))
    weights = [1.0, 0.7, 0.3, 0.5][: model.cfg.n_future]
    model.zero_grad()
    ref_loss, ref_heads = mtp_loss(model(tokens[:, :11]), tokens, weights,
                                   sequential=model.cfg.head_type == "sequential")
    (0.5 * ref_loss).backward()
    ref = _grads(model)
    model.zero_grad()
    loss, heads = mtp_backward(model, tokens, weights, seq_len=11, chunk_size=chunk, loss_scale=0.5)
    got = _grads(model)
    assert set(got) == set(ref) == {k for k, _ in model.named_parameters()}
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-12, msg=k)
    torch.testing.assert_close(heads.double(), ref_heads.detach().double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss.double(), ref_loss.detach().double(), rtol=1e-6, atol=1e-6)
    return got


@pytest.mark.parametrize("head_type", ["parallel", "linear", "causal", "anticausal", "sequential"])
@pytest.mark.parametrize("chunk", [None, 5, 1000])
def test_memory_efficient_gradients_equal_reference(head_type, chunk):
    model = tiny_model(0, dtype=torch.float64, training=True, n_future=3, head_type=head_type, vocab_size=37)
    check_backward_equals_reference(model, chunk)


@pytest.mark.parametrize("chunk", [None, 5])
def test_memory_efficient_gradients_with_a_shared_sequential_head(chunk):
    # One module at depths 2..4: its gradient is the sum over the depths, as in the naive loss.
    model = tiny_model(0, dtype=torch.float64, training=True, n_future=4, head_type="sequential", shared_head=True,
                       vocab_size=37)
    check_backward_equals_reference(model, chunk)


def test_memory_efficient_with_ignored_tail_positions():
    # No extra tokens: the last positions of later heads have no target and must be ignored.
    model = tiny_model(0, dtype=torch.float64, training=True, n_future=4, vocab_size=29)
    tokens = torch.randint(0, 29, (3, 6))
    model.zero_grad()
    mtp_loss(model(tokens), tokens)[0].backward()
    ref = _grads(model)
    model.zero_grad()
    mtp_backward(model, tokens, chunk_size=4)
    for k, g in _grads(model).items():
        torch.testing.assert_close(g, ref[k], rtol=1e-9, atol=1e-12)


def test_memory_efficient_under_bf16_autocast_close_to_fp32():
    model = tiny_model(0, training=True, n_future=2, vocab_size=64)
    tokens = torch.randint(0, 64, (2, 34))
    loss32, _ = mtp_backward(model, tokens, seq_len=32)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, _ = mtp_backward(model, tokens, seq_len=32, chunk_size=16)
    assert abs(float(loss16) - float(loss32)) < 0.05
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.slow
def test_compiled_blocks_give_the_same_gradients():
    # What `mtp train --compile` does; slow (about a minute of compilation on 2 cores).
    model = tiny_model(0, training=True, n_future=2, vocab_size=64)
    tokens = torch.randint(0, 64, (2, 34))
    mtp_backward(model, tokens, seq_len=32)
    ref = _grads(model)
    model.zero_grad()
    for block in [*model.trunk_layers, *model.heads]:
        block.compile()
    mtp_backward(model, tokens, seq_len=32)
    for k, g in _grads(model).items():
        torch.testing.assert_close(g, ref[k], rtol=1e-4, atol=1e-6)


def test_self_distill_targets_table():
    targets = align_targets(torch.tensor([[10, 11, 12, 13, 14]]), 3, seq_len=4)
    greedy = torch.tensor([[21, 22, 23, 24]])  # head 1's argmax at t predicts x_{t+1}
    t = self_distill_targets(targets, greedy)
    assert t[0, :, 0].tolist() == [11, 12, 13, 14]  # head 1 keeps the data
    assert t[0, :, 1].tolist() == [22, 23, 24, IGNORE]  # head 2 at t: head 1's guess at t+1
    assert t[0, :, 2].tolist() == [23, 24, IGNORE, IGNORE]


@pytest.mark.parametrize("head_type", ["parallel", "causal", "sequential"])
def test_self_distill_gradients_equal_reference(head_type):
    model = tiny_model(0, dtype=torch.float64, training=True, n_future=3, head_type=head_type, vocab_size=31)
    tokens = torch.randint(0, 31, (2, 12))
    with torch.no_grad():
        greedy = model(tokens[:, :10])[:, :, 0].argmax(-1)
    targets = self_distill_targets(align_targets(tokens, 3, 10), greedy)
    model.zero_grad()
    logits = model(tokens[:, :10])
    sum(F.cross_entropy(logits[:, :, i].reshape(-1, 31), targets[:, :, i].reshape(-1), ignore_index=IGNORE)
        for i in range(3)).backward()
    ref = _grads(model)
    model.zero_grad()
    mtp_backward(model, tokens, seq_len=10, chunk_size=7, self_distill=True)
    got = _grads(model)
    assert set(got) == set(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-12, msg=k)
