import pytest
import torch

from mtp import ConfigError, ModelConfig, MTPModel, PRESETS

from conftest import tiny_config, tiny_model

V = 61  # the vocabulary of this file's models


@pytest.mark.parametrize("preset", ["tiny", "1M", "3M", "10M"])
def test_parameter_matching_keeps_total_params(preset):
    base = MTPModel(ModelConfig.from_preset(preset, n_future=1, vocab_size=256)).num_params()
    for n in (2, 3, 4):
        cfg = ModelConfig.from_preset(preset, n_future=n, vocab_size=256)
        assert cfg.n_trunk == cfg.n_layers - n
        assert MTPModel(cfg).num_params() == base


def test_seven_b_preset_shape_without_building():
    cfg = ModelConfig.from_preset("7B", n_future=4)
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_trunk) == (4096, 32, 32, 28)
    assert cfg.ffn_dim == 11008  # Llama-7B's FFN width from Meta's multiple_of rule


def test_paper_small_sizes():
    for name, (d, layers, heads) in {"1M": (128, 5, 4), "3M": (256, 4, 8), "10M": (384, 6, 8),
                                     "30M": (512, 10, 8), "100M": (768, 14, 12)}.items():
        cfg = ModelConfig.from_preset(name)
        assert (cfg.dim, cfg.n_layers, cfg.n_heads) == (d, layers, heads)


@pytest.mark.parametrize("kw, msg", [
    (dict(n_future=0), "n_future must be >= 1"),
    (dict(n_future=7), "n_future=7 heads need at least"),
    (dict(dim=66), "not divisible by n_heads"),
    (dict(n_kv_heads=3), "not divisible by n_kv_heads"),
    (dict(head_type="medusa"), "head_type must be one of"),
])
def test_bad_configs_raise_clear_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        tiny_config(vocab_size=V, **kw)


def test_unknown_preset_and_field():
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelConfig.from_preset("huge")
    with pytest.raises(ConfigError, match="unknown config field"):
        ModelConfig.from_preset("tiny", depth=3)


@pytest.mark.parametrize("head_type", ["parallel", "linear", "causal", "anticausal"])
def test_forward_shape_and_heads_differ(head_type):
    m = tiny_model(0, training=True, vocab_size=V, n_future=3, head_type=head_type)
    x = torch.randint(0, 61, (2, 9))
    out = m(x)
    assert out.shape == (2, 9, 3, 61)
    assert not torch.allclose(out[:, :, 0], out[:, :, 1])


def test_head_structure():
    par = tiny_model(vocab_size=V, n_future=3)
    assert [par.head_parent(i) for i in range(3)] == [-1, -1, -1]
    cau = tiny_model(vocab_size=V, n_future=3, head_type="causal")
    assert [cau.head_parent(i) for i in range(3)] == [-1, 0, 1]
    anti = tiny_model(vocab_size=V, n_future=3, head_type="anticausal")
    assert [anti.head_parent(i) for i in range(3)] == [1, 2, -1]
    assert anti.head_order() == [2, 1, 0]


def test_causality_future_tokens_do_not_change_past_logits():
    m = tiny_model(0, training=True, vocab_size=V, n_future=2)
    x = torch.randint(0, 61, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 61
    assert torch.allclose(m(x)[:, :8], m(y)[:, :8], atol=1e-6)
    assert not torch.allclose(m(x)[:, 8:], m(y)[:, 8:])


@pytest.mark.parametrize("head_type", ["parallel", "linear", "causal", "anticausal"])
def test_kv_cache_matches_uncached_over_many_steps(head_type):
    m = tiny_model(1, vocab_size=V, n_future=3, head_type=head_type)
    x = torch.randint(0, 61, (3, 40))
    with torch.no_grad():
        full = m(x)
        m.setup_cache(4, 64)
        pieces, p = [m(x[:, :5], torch.arange(5))], 5
        for s in [1, 3, 1, 1, 4, 2, 5, 1, 1, 7, 3, 1, 5]:
            pieces.append(m(x[:, p:p + s], torch.arange(p, p + s).expand(3, s)))
            p += s
        assert p == 40
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=0, atol=2e-5)


def test_kv_cache_rows_at_different_positions_and_stale_slots_masked():
    m = tiny_model(2, vocab_size=V, n_future=2)
    a, b = torch.randint(0, 61, (1, 10)), torch.randint(0, 61, (1, 10))
    with torch.no_grad():
        ref_a, ref_b = m(a), m(b)
        m.setup_cache(2, 32)
        # Row 0 has 6 tokens cached, row 1 has 3; both also hold junk in later slots.
        junk = torch.randint(0, 61, (2, 8))
        m(junk, torch.arange(8))
        m(torch.cat([a[:, :6], b[:, :6]]), torch.arange(6))
        # Now feed row 0 position 6 and row 1 position 3 (its slots 3..7 are stale).
        out = m(torch.cat([a[:, 6:7], b[:, 3:4]]), torch.tensor([[6], [3]]))
    torch.testing.assert_close(out[0, 0], ref_a[0, 6], rtol=0, atol=2e-5)
    torch.testing.assert_close(out[1, 0], ref_b[0, 3], rtol=0, atol=2e-5)


def test_cache_errors():
    m = tiny_model(training=True, vocab_size=V)
    with pytest.raises(ConfigError, match="setup_cache"):
        m(torch.zeros(1, 1, dtype=torch.long), torch.tensor([0]))
    m.setup_cache(1, 8)
    with pytest.raises(ConfigError, match="exceeds the cache's max_batch"):
        m(torch.zeros(2, 1, dtype=torch.long), torch.tensor([0]))
    assert m.cache_len == 64  # key_length(7): slot 7 + QUERY_SLACK, rounded up to KEY_BUCKET; slots unchecked
    with pytest.raises(IndexError):
        m(torch.zeros(1, 1, dtype=torch.long), torch.tensor([m.cache_len]))
    with pytest.raises(ConfigError, match="exceeds max_seq_len"):
        m(torch.zeros(1, 513, dtype=torch.long))


def test_presets_listed():
    assert {"tiny", "1M", "3M", "10M", "30M", "100M", "300M", "1B", "7B"} <= set(PRESETS)


def test_stacked_draft_heads_equal_the_uncached_heads():
    # Parallel heads 2..n run as one batched pass while decoding (DraftStack); same hidden states.
    m = tiny_model(0, dtype=torch.float64, n_future=4)
    tokens = torch.randint(0, 512, (3, 20))
    ref = m.hidden(tokens)
    m.setup_cache(3, 40)
    assert m.draft_stack is not None
    with torch.no_grad():
        m.trunk_and_heads(tokens[:, :12], torch.arange(12).expand(3, -1), heads=4)
        z, h = m.trunk_and_heads(tokens[:, 12:], torch.arange(12, 20).expand(3, -1), heads=1)
        later = m.later_heads(z, [h[:, :, 0]], torch.arange(12, 20).expand(3, -1), 4)
    torch.testing.assert_close(later, ref[:, 12:, 1:], rtol=0, atol=1e-12)
    m.clear_cache()
    assert m.draft_stack is None
