"""The decode benchmark harness (`mtp.decode_bench`): the model timer, benchmark rows and their
table, and the forward-time ratio, on the briefly trained model of test_speculative."""

from __future__ import annotations

import time

import pytest
import torch

from mtp.decode_bench import ModelTimer, decode_benchmark, default_modes, format_table, forward_time_ratio
from mtp.generate import GenerationError
from mtp.modes import parse_mode

from conftest import tiny_model
from test_speculative import trained, trained_prompts  # noqa: F401 (trained: a fixture)


def test_model_timer_counts_model_calls_and_unwraps(trained):
    tokens = torch.randint(trained.cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    with ModelTimer(trained) as timer:
        start = time.perf_counter()
        trained(tokens)
        wall = time.perf_counter() - start
        assert "unembed" in vars(trained)
    assert 0 < timer.seconds <= wall
    assert not set(ModelTimer.METHODS) & set(vars(trained))  # the class methods again
    before = timer.seconds
    trained(tokens)
    assert timer.seconds == before


def test_decode_benchmark_rows_and_table(trained):
    prompts = trained_prompts(4, seed=11)
    rows = decode_benchmark(trained, prompts, 12, ["spec1", "spec3", "tree", "tree:2,2"], batch_size=2)
    assert [r["mode"] for r in rows] == ["greedy", "spec1", "spec3", "tree", "tree:2,2"]
    assert all(r["matches_greedy"] and r["batch"] == 2 and r["tokens"] == 48 for r in rows)
    assert rows[0]["tokens_per_forward"] == 1.0 and rows[0]["speedup"] == 1.0
    assert rows[2]["tokens_per_forward"] > 1.5 and len(rows[2]["acceptance"]) == 3
    assert rows[0]["fewer_steps"] == rows[0]["step_cost"] == rows[0]["step_flops"] == 1.0
    for r in rows[1:]:  # the speedup taken apart: fewer passes, each costing more
        assert r["speedup"] == pytest.approx(r["fewer_steps"] / r["step_cost"])
        assert r["fewer_steps"] > 1.0 and r["step_flops"] > 1.0
    assert rows[2]["step_flops"] > rows[1]["step_flops"]  # 4 tokens verified per pass vs 2
    assert rows[0]["step_model"] == 1.0
    assert all(0 < r["outside_model"] < 1 and r["step_model"] > 0 for r in rows)
    table = format_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows) and len({len(line) for line in lines}) == 1
    assert "tree:2,2" in table and "NO" not in table
    with pytest.raises(GenerationError, match="unknown decoding mode"):
        decode_benchmark(trained, prompts, 4, ["beam"])


def test_forward_time_ratio_reports_all_timings(trained):
    out = forward_time_ratio(trained, batch_size=2, context=16, n_tokens=5, repeats=3)
    assert set(out) == {"t1", "t1_all", "tn", "ratio", "step_ratio"}
    assert all(out[key] > 0 for key in ("t1", "t1_all", "tn"))
    assert out["ratio"] == pytest.approx(out["tn"] / out["t1_all"])


def test_decode_benchmark_takes_mode_objects_and_runs_each_mode_once(trained):
    rows = decode_benchmark(trained, trained_prompts(2, seed=5), 4, [parse_mode("spec2"), "spec2", "greedy"])
    assert [r["mode"] for r in rows] == ["greedy", "spec2"]
    with pytest.raises(GenerationError, match="need 5 heads"):  # checked before anything is timed
        decode_benchmark(trained, trained_prompts(2, seed=5), 4, ["spec4"])


def test_default_modes_fit_the_model():
    assert default_modes(tiny_model(n_future=3)) == ["greedy", "spec1", "spec2", "tree", "spec2+lookup", "lookup3"]
    assert default_modes(tiny_model(n_future=1)) == ["greedy", "lookup3"]
    assert default_modes(tiny_model(n_future=2, head_type="sequential")) == ["greedy", "spec1", "tree", "spec1+lookup",
                                                                            "lookup3"]
