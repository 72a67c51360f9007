"""Cached batched decoding (`mtp.generate`) against the uncached reference, sampling filters, errors.

Exactness tests run in float64: the cached and uncached paths multiply matrices of different
shapes, so fp32 may round differently and flip an argmax on a near tie; in float64 the logits agree
to ~1e-15 and equality of the token streams is a fair requirement.
"""

from __future__ import annotations

import importlib
from functools import partial

import pytest
import torch

from mtp.generate import (
    GenerationError, generate, generate_reference, pad_prompts, prefill, sample_next, sampling_probs,
)

from conftest import tiny_model

V = 53

# This file's models: float64 (see above), 2 heads, sharp logits (init_std 0.2); fields overridable.
make_model = partial(tiny_model, dtype=torch.float64, n_future=2, vocab_size=V, max_seq_len=64, init_std=0.2)


def random_prompts(lengths: list[int], seed: int = 0, vocab: int = V) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(vocab, (n,), generator=g).tolist() for n in lengths]


# ----- sampling ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax_and_first_on_ties(dtype):
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [5.0, -1.0, 0.0, 5.0]], dtype=dtype)
    assert sample_next(logits, 0.0).tolist() == [1, 0]
    wide = torch.randn(6, 3000, generator=torch.Generator().manual_seed(0)).to(dtype)  # many bf16 ties
    wide[:, 2000] = wide.max()  # a late tie with the row maximum
    assert torch.equal(sample_next(wide, 0.0), torch.tensor([int(torch.nonzero(r == r.max())[0]) for r in wide]))


def test_temperature_top_k_top_p_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    assert torch.allclose(sampling_probs(logits, 1.0), torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    assert torch.allclose(sampling_probs(logits, 0.5), torch.softmax(logits * 2, -1))
    top2 = sampling_probs(logits, 1.0, top_k=2)
    assert torch.allclose(top2, torch.tensor([[5 / 7, 2 / 7, 0, 0, 0]]))
    # Nucleus 0.8: 0.5 + 0.2 = 0.7 < 0.8, so the 0.15 token is needed too; 0.1 and 0.05 are cut.
    nucleus = sampling_probs(logits, 1.0, top_p=0.8)
    assert torch.allclose(nucleus, torch.tensor([[0.5, 0.2, 0.15, 0, 0]]) / 0.85)
    # A tiny top_p still keeps the most likely token.
    assert sampling_probs(logits, 1.0, top_p=1e-6).tolist() == [[1.0, 0.0, 0.0, 0.0, 0.0]]
    assert sampling_probs(logits, 0.0).tolist() == [[1.0, 0.0, 0.0, 0.0, 0.0]]


def test_sample_next_seeded_and_follows_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1, 0.0])
    logits = torch.log(probs).expand(20000, 4)
    a = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(1))
    b = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    freq = torch.bincount(a, minlength=4) / a.numel()
    assert (freq - probs).abs().max() < 0.015  # ~4 standard errors at n = 20000
    assert freq[3] == 0


# ----- cached generate == uncached reference ----------------------------------------------------
@pytest.mark.parametrize("head_type", ["parallel", "causal", "linear", "anticausal"])
def test_cached_greedy_equals_reference(head_type):
    model = make_model(1, head_type=head_type, n_future=3)
    prompts = random_prompts([5, 1, 11, 3], seed=2)
    cached = generate(model, prompts, 12)
    ref = generate_reference(model, prompts, 12)
    assert cached.tokens == ref.tokens
    assert all(len(t) == 12 for t in cached.tokens)
    assert cached.forwards == 12 and cached.tokens_per_forward == 1.0


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.8, top_k=5),
                                dict(temperature=1.3, top_p=0.9)])
def test_cached_sampling_equals_reference_with_seed(kw):
    model = make_model(3)
    prompts = random_prompts([4, 9, 2], seed=3)
    cached = generate(model, prompts, 10, seed=7, **kw)
    ref = generate_reference(model, prompts, 10, seed=7, **kw)
    assert cached.tokens == ref.tokens
    assert generate(model, prompts, 10, seed=8, **kw).tokens != cached.tokens  # the seed matters


def test_batch_equals_each_row_alone():
    model = make_model(4)
    prompts = random_prompts([7, 2, 13, 1, 5], seed=4)
    batch = generate(model, prompts, 9).tokens
    assert batch == [generate(model, [p], 9).tokens[0] for p in prompts]


def test_fp32_cached_close_to_uncached_logits():
    # The fp32 path is what users run: the prefill logits match an uncached forward.
    model = make_model(5, dtype=torch.float32)
    prompts = random_prompts([6, 3], seed=5)
    tokens, lengths = pad_prompts(prompts)
    model.setup_cache(2, 16)
    cached = prefill(model, tokens, lengths, heads=2)
    full = model(tokens)
    for r, n in enumerate(lengths.tolist()):
        assert torch.allclose(cached[r], full[r, n - 1], atol=1e-5)


def test_chunked_prefill_equals_one_chunk():
    model = make_model(6, n_future=3)
    tokens, lengths = pad_prompts(random_prompts([10, 4, 7], seed=6))
    model.setup_cache(3, 16)
    whole = prefill(model, tokens, lengths, heads=3)
    chunked = prefill(model, tokens, lengths, heads=3, chunk_size=3)
    assert torch.allclose(whole, chunked, atol=1e-12)


# ----- stopping, callbacks, context -------------------------------------------------------------
def test_stop_tokens_end_rows_early_and_others_continue():
    model = make_model(7)
    prompts = random_prompts([3, 6, 4], seed=7)
    free = generate(model, prompts, 15).tokens
    stop = free[0][4]
    stopped = generate(model, prompts, 15, stop_tokens=[stop])
    for row, out in zip(free, stopped.tokens):
        expect = row[: row.index(stop) + 1] if stop in row else row
        assert out == expect
    assert stopped.stop_reasons[0] == "stop" and len(stopped.tokens[0]) == free[0].index(stop) + 1
    assert stopped.tokens == generate_reference(model, prompts, 15, stop_tokens=[stop]).tokens
    # A row that stopped early did not take part in later passes.
    assert stopped.row_forwards[0] == len(stopped.tokens[0])


def test_on_tokens_streams_every_pass():
    model = make_model(8)
    prompts = random_prompts([2, 5], seed=8)
    seen: list[list[list[int]]] = []
    result = generate(model, prompts, 6, on_tokens=seen.append)
    assert len(seen) == result.forwards
    assert [sum((step[r] for step in seen), []) for r in range(2)] == result.tokens


def test_generation_stops_when_context_is_full():
    model = make_model(9, max_seq_len=24)
    prompts = random_prompts([24, 20, 3, 23], seed=9)
    out = generate(model, prompts, 10)
    assert [len(t) for t in out.tokens] == [0, 4, 10, 1]
    assert out.stop_reasons == ["length"] * 4
    assert out.tokens == generate_reference(model, prompts, 10).tokens


def test_continuous_batching_equals_one_batch():
    model = make_model(11, max_seq_len=24)
    prompts = random_prompts([5, 24, 2, 13, 23, 7, 1, 9], seed=11)  # 24: nothing to generate, 23: one token
    stop = generate(model, prompts, 10).tokens[0][3]
    whole = generate(model, prompts, 10, stop_tokens=[stop])
    assert whole.stop_reasons[0] == "stop"
    for batch_size in (1, 3, 5):
        seen: list[list[list[int]]] = []
        out = generate(model, prompts, 10, stop_tokens=[stop], batch_size=batch_size, on_tokens=seen.append)
        assert out.tokens == whole.tokens and out.stop_reasons == whole.stop_reasons, batch_size
        assert out.row_forwards == whole.row_forwards  # each prompt took part in as many passes
        assert [sum((step[i] for step in seen), []) for i in range(len(prompts))] == out.tokens
        assert len(seen) == out.forwards > whole.forwards
        assert model.cache_batch == batch_size  # the cache holds only the rows decoded at once
    with pytest.raises(GenerationError, match="batch_size must be >= 1, got 0"):
        generate(model, prompts, 10, batch_size=0)


def test_zero_new_tokens():
    model = make_model(10)
    out = generate(model, random_prompts([3]), 0)
    assert out.tokens == [[]] and out.forwards == 0


# ----- errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("prompts, kw, msg", [
    ([[1, 2], []], {}, "prompt 1 is empty"),
    ([[1] * 65], {}, "longer than the model's context of 64"),
    ([[1, V]], {}, f"token id {V} outside the vocabulary"),
    ([[-1, 2]], {}, "token id -1 outside"),
    ([], {}, "no prompts"),
    ([[1]], dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
    ([[1]], dict(temperature=-0.5), "temperature must be >= 0"),
    ([[1]], dict(temperature=1.0, top_k=0), "top_k must be >= 1"),
    ([[1]], dict(temperature=1.0, top_p=1.5), r"top_p must be in \(0, 1\]"),
])
def test_bad_requests_raise_one_line_errors(prompts, kw, msg):
    model = make_model(11)
    kw = {"max_new_tokens": 4, **kw}
    for fn in (generate, generate_reference):
        with pytest.raises(GenerationError, match=msg) as err:
            fn(model, prompts, **kw)
        assert "\n" not in str(err.value)
    assert issubclass(GenerationError, ValueError)


def test_batch_too_large_for_memory(monkeypatch):
    model = make_model(12)
    # mtp.generate (the function) shadows the submodule's name on the package, so look it up.
    gen_mod = importlib.import_module("mtp.generate")
    monkeypatch.setattr(gen_mod, "available_memory_bytes", lambda: 1 << 20)
    with pytest.raises(GenerationError, match="batch of 64 .* GiB of KV cache"):
        generate(model, [[1, 2, 3]] * 64, 40)
    assert len(generate(model, [[1, 2, 3]], 4).tokens[0]) == 4  # a small batch still fits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_bytes_is_what_setup_allocates(dtype):
    # The memory check before decoding must count the buffers decoding really allocates.
    from mtp.generate import kv_cache_bytes, setup_decode_cache
    from mtp.model import Attention

    model = tiny_model(dtype=dtype, n_future=3, head_type="sequential", vocab_size=V, max_seq_len=64)
    setup_decode_cache(model, 3, 40)
    caches = [t for m in model.modules() if isinstance(m, Attention) for t in (m.cache_k, m.cache_v)]
    assert kv_cache_bytes(model, 3, model.cache_len, dtype) == sum(t.numel() * t.element_size() for t in caches)
