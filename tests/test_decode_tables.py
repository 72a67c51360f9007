"""The lookup tables of cached decoding (RoPE, causal masks) and the one-call RMSNorm give the
same values as the formulas they replace, and a position's values never depend on the pass."""

import pytest
import torch
import torch.nn.functional as F

from mtp import ModelConfig, MTPModel
from mtp.model import ROPE_CHUNK, causal_cache_mask, rms_norm, rope_tables


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rms_norm_gives_the_bits_of_the_spelled_out_formula(dtype):
    g = torch.Generator().manual_seed(0)
    for dim in (64, 128, 576):
        x = (torch.randn(33, dim, generator=g) * torch.exp(2 * torch.randn(33, 1, generator=g))).to(dtype)
        for w in (torch.randn(dim, generator=g).to(dtype), torch.randn(3, 1, dim, generator=g).to(dtype)):
            xf = x.float()
            want = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).type_as(x) * w
            assert torch.equal(rms_norm(x, w, 1e-5), want), (dim, tuple(w.shape))


@pytest.mark.parametrize("head_dim", [8, 32, 64])
def test_rope_lookup_depends_on_the_position_only(head_dim):
    cfg = ModelConfig(dim=4 * head_dim, n_layers=2, n_heads=4, vocab_size=32, n_future=1, max_seq_len=4096)
    model = MTPModel(cfg)
    g = torch.Generator().manual_seed(1)
    # Uncached passes use positions 0..T-1, cached ones stay within the cache: one chunk here.
    sets = [torch.arange(700)[None], torch.randint(0, ROPE_CHUNK, (3, 5), generator=g), torch.tensor([[1000]])]
    first = [model.rope(p) for p in sets]
    assert model.rope_table(1, "cpu").shape[0] == ROPE_CHUNK
    table = model.rope_table(3000, "cpu")  # grown to three chunks: the first one's rows are unchanged
    assert table.shape[0] == 3 * ROPE_CHUNK
    for p, (cos, sin) in zip(sets, first):
        again_cos, again_sin = model.rope(p)
        assert torch.equal(cos, again_cos) and torch.equal(sin, again_sin)  # a longer table, the same rows
        for b in range(p.shape[0]):  # each position alone gets its values from the same row
            for s in range(p.shape[1]):
                assert torch.equal(cos[b, s], table[p[b, s], :head_dim])
        want_cos, want_sin = rope_tables(head_dim, p, cfg.rope_theta)  # the formula, up to vector/scalar rounding
        torch.testing.assert_close(cos, want_cos, rtol=0, atol=1e-6)
        torch.testing.assert_close(sin, want_sin, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_mask_lookup_equals_the_computed_mask(dtype):
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, vocab_size=32, n_future=1)
    model = MTPModel(cfg).to(dtype)
    model.setup_cache(3, 40)
    assert model.causal_bias is not None
    L = model.cache_len
    positions = torch.tensor([[0, 1, 2], [L - 2, L - 1, L + 5], [7, 7, 30]])  # past the cache: every slot
    ctx = model.cache_context(positions, positions, None, None, dense=True)
    want = torch.zeros(3, 3, L, dtype=dtype).masked_fill_(~causal_cache_mask(positions, L), float("-inf"))
    assert torch.equal(ctx.bias[:, 0], want)
    model.clear_cache()
    assert model.causal_bias is None
