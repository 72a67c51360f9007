"""CUDA checks, skipped without a GPU (run by bench/cuda_check.sh on a machine that has one):
cached == uncached forward, and speculative == greedy, batched == alone, in bf16 and fp32."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from mtp import generate, speculative_generate
from mtp.speculative import tree_generate

from conftest import tiny_model

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


model_on_cuda = partial(tiny_model, device="cuda", n_future=4, init_std=0.2)


def prompts(count: int = 8) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 512, (int(n),), generator=g).tolist() for n in torch.randint(3, 60, (count,), generator=g)]


def test_cached_forward_close_to_uncached_on_cuda():
    model = model_on_cuda(dtype=torch.float32)
    tokens = torch.randint(0, 512, (2, 24), device="cuda")
    ref = model(tokens)
    model.setup_cache(2, 32)
    with torch.no_grad():
        out = torch.cat([model(tokens[:, i : i + 1], torch.full((2, 1), i, device="cuda")) for i in range(24)], 1)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_speculative_equals_greedy_on_cuda(dtype):
    model, ps, n = model_on_cuda(dtype=dtype), prompts(), 40
    alone = [generate(model, [p], n).tokens[0] for p in ps]
    assert generate(model, ps, n).tokens == alone
    for k in (1, 3):
        assert speculative_generate(model, ps, n, k=k).tokens == alone
    assert speculative_generate(model, ps, n, k=3, drafter="both", batch_size=3).tokens == alone
    assert tree_generate(model, ps, n).tokens == alone
