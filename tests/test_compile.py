"""`--compile`: decoding passes run through torch.compile give the same tokens as eager decoding
(fp32; bf16 compiles frozen and is compared with compiled greedy), and every speculative mode
still equals greedy, bit for bit, in fp32 and bf16 (mtp.compiled)."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch

from mtp import generate, speculative_generate
from mtp import DecodeMode
from mtp.speculative import tree_generate

from conftest import tiny_model
from test_invariance import DTYPES, prompts

# Small enough to compile in seconds (3 trunk blocks + 3 head blocks); sharp logits that vary.
small_model = partial(tiny_model, n_future=3, n_layers=5, dim=32, n_heads=2, n_kv_heads=1, init_std=0.2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_type", [pytest.param("parallel", marks=pytest.mark.slow), "sequential"])
def test_compiled_modes_equal_eager_greedy(dtype, head_type):
    # Compiling takes most of the time: ~10-35 s per case on 2 busy cores with a cold inductor
    # cache (parallel heads and trees add graphs: slow), a few seconds once cached.
    # bf16 compiles frozen (mtp.compiled.freeze_weights): its graphs round some logits unlike
    # eager (greedy tokens differed on 2 of these 4 prompts), so there every mode is compared
    # with compiled greedy; fp32's compiled greedy equals eager greedy.
    model, n = small_model(dtype=DTYPES[dtype], head_type=head_type), 24
    ps = prompts(seed=5, count=4)
    greedy = generate(model, ps, n).tokens
    assert min(len(set(t)) for t in greedy) > 5  # varied output, not one repeated token
    if dtype == "bf16":
        greedy = generate(model, ps, n, batch_size=4, compile=True).tokens
    # bf16 at batch 3 only, against its batch-4 greedy (batch 1 compiles another set of frozen
    # graphs: about 40 s of the suite's 8-10 min); fp32 covers batch 1.
    for batch in (1, 3) if dtype == "fp32" else (3,):
        assert generate(model, ps, n, batch_size=batch, compile=True).tokens == greedy, batch
        assert speculative_generate(model, ps, n, k=2, batch_size=batch, compile=True).tokens == greedy, batch
        lookup = speculative_generate(model, ps, n, k=2, drafter="lookup", batch_size=batch, compile=True)
        assert lookup.tokens == greedy, batch
    if head_type == "parallel":
        assert tree_generate(model, ps, n, tree=(2, 1), batch_size=3, compile=True).tokens == greedy


def test_compiled_sampling_and_modes_api():
    # Speculative sampling compiled: the same seeded run twice gives the same tokens, and a
    # temperature of 0 gives greedy; DecodeMode.run takes the switch.
    model, ps, n = small_model(), prompts(seed=6, count=3), 16
    greedy = generate(model, ps, n).tokens
    mode = DecodeMode("chain", k=2)
    assert mode.run(model, ps, n, batch_size=3, compile=True).tokens == greedy
    sampled = [speculative_generate(model, ps, n, k=2, temperature=0.8, seed=3, batch_size=3, compile=True).tokens
               for _ in range(2)]
    assert sampled[0] == sampled[1]
    assert model.compiled is None  # the switch is off again after the run


def test_compiled_graphs_do_not_depend_on_the_cache_length():
    # Prompts of other lengths (another cache length, other key lengths) reuse the graphs.
    from torch._dynamo.utils import counters

    model = small_model(seed=1)
    generate(model, prompts(seed=7, count=2), 8, compile=True)
    before = counters["stats"]["unique_graphs"]
    for seed in (8, 9):
        ps = prompts(seed=seed, count=2)
        assert generate(model, ps, 40, compile=True).tokens == generate(model, ps, 40).tokens
    assert counters["stats"]["unique_graphs"] == before


def test_frozen_bf16_graphs_are_reused_and_follow_weight_changes(monkeypatch):
    # bf16 on CPU compiles with the weights as constants (inductor freezing): a second decode of
    # the same shapes compiles nothing new (the fused weights and caches are kept, not rebuilt),
    # and weights changed in place after a decode are not served stale. Freezing is used only
    # where frozen kernels round like eager ones (`frozen_rows_hold`, which depends on the CPU and
    # the shapes: for this tiny model on an AMD EPYC with AVX512-BF16 they do not); this test is
    # about the graphs' lifetime, so it freezes whatever the CPU.
    from torch._dynamo.utils import counters

    import mtp.compiled
    from mtp.compiled import freeze_weights

    monkeypatch.setattr(mtp.compiled, "frozen_rows_hold", lambda model: True)
    model, ps, n = small_model(dtype=torch.bfloat16, seed=2), prompts(seed=10, count=2), 16
    assert freeze_weights(model) and not freeze_weights(small_model(seed=2))  # fp32 stays unfrozen
    first = generate(model, ps, n, compile=True).tokens
    before = counters["stats"]["unique_graphs"]
    assert generate(model, ps, n, compile=True).tokens == first
    other = prompts(seed=11, count=2)  # other lengths: the kept cache is long enough, no new graphs
    other_tokens = generate(model, other, n, compile=True).tokens
    assert counters["stats"]["unique_graphs"] == before
    assert other_tokens == generate(copy.deepcopy(model), other, n, compile=True).tokens  # cache of its own length
    with torch.no_grad():
        model.output.weight.mul_(-1)  # another argmax everywhere: stale graphs would give `first`
    changed = generate(model, ps, n, compile=True).tokens
    fresh = generate(copy.deepcopy(model), ps, n, compile=True).tokens  # graphs compiled anew from the changed weights
    assert changed == fresh != first


def test_compiled_tree_node_off_the_chain_equals_a_compiled_greedy_step():
    # The compiled attention op finds the queries off the top-1 chain itself (from the masks), so
    # compiled trees are exact too (see test_invariance's eager test).
    from test_invariance import _tree_and_step_logits

    for base in (21, 40):
        tree_a, step_a, tree_b, step_b = _tree_and_step_logits(torch.float32, base, compile=True)
        assert torch.equal(tree_a, step_a) and torch.equal(tree_b, step_b), base
