"""mtp.experiments: the task generators are right (checked against sympy and by construction), and
every experiment runs end to end on tiny settings, writing results.json / results.md / a PNG."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch

from mtp.cli import main
from mtp.experiments import EXPERIMENTS, run_experiment
from mtp.experiments import bytes as byte_exp
from mtp.experiments import common, heads, induction, polynomial
from mtp.experiments.polynomial import D, P, evaluate_expr, make_problem, p_comp, p_mul, random_expr


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models; the machine is shared
    yield
    torch.set_num_threads(n)


# ----- polynomial arithmetic -------------------------------------------------------------------------
def sympy_truncated(expr) -> tuple[int, ...]:
    """Coefficients of a sympy polynomial in X over F7, truncated to X^0..X^4."""
    import sympy

    X = sympy.Symbol("X")
    poly = sympy.Poly(sympy.expand(expr), X, modulus=P)
    coeffs = {m[0]: int(c) % P for m, c in zip(poly.monoms(), poly.coeffs())}
    return tuple(coeffs.get(i, 0) for i in range(D))


def test_mul_and_comp_match_sympy():
    import sympy

    X = sympy.Symbol("X")
    rng = random.Random(0)
    for _ in range(12):
        a = tuple(rng.randrange(P) for _ in range(D))
        b = tuple(rng.randrange(P) for _ in range(D))
        sa = sum(c * X**i for i, c in enumerate(a))
        sb = sum(c * X**i for i, c in enumerate(b))
        assert p_mul(a, b) == sympy_truncated(sa * sb)
        assert p_comp(a, b) == sympy_truncated(sa.subs(X, sb))


def test_expressions_have_k_operations_and_consistent_text():
    rng = random.Random(1)
    for k in range(0, 8):
        for _ in range(20):
            e = random_expr(rng, k, 2)
            words = polynomial.to_words(e)
            assert sum(w in polynomial.OPS for w in words) == k
            assert words.count("P") == sum(1 for w in words if w == "P")
            assert len(evaluate_expr(e)) == D
    q, a = make_problem(random.Random(2), 3, 2)
    assert q.endswith("=") and len(a.split()) == D
    tok = common.word_tokenizer(polynomial.vocabulary())
    assert len(tok.encode(q + " " + a)) == len((q + " " + a).split())


# ----- induction stories --------------------------------------------------------------------------------
def test_story_names_are_two_tokens_and_targets_are_repeats():
    tok = common.word_tokenizer(induction.vocabulary())
    rng = random.Random(0)
    for _ in range(50):
        text, targets = induction.make_story(rng)
        words = text.split()
        assert tok.encode(text) == [tok.hf.token_to_id(w) for w in words]  # one token per word
        assert targets
        names = {(words[i - 1], words[i]) for i in range(1, len(words)) if words[i].startswith("##")}
        firsts = [f for f, _ in names]
        assert len(firsts) == len(set(firsts))  # the first syllable identifies the character
        for t in targets:
            assert words[t].startswith("##") and words[t - 1] in induction.FIRST
            earlier = [i for i in range(1, t) if words[i - 1] == words[t - 1] and words[i] == words[t]]
            assert earlier  # the name was mentioned before
    assert tok.decode(tok.encode("Ko ##rin")) == "Korin"


def test_name_accuracy_counts_only_targets():
    class Oracle(torch.nn.Module):
        """Predicts the true next token everywhere: accuracy must be exactly 1."""

        def __init__(self, seqs):
            super().__init__()
            self.seqs = seqs

        def forward(self, tokens, heads=1):
            B, T = tokens.shape
            out = torch.zeros(B, T, 1, 300)
            for b in range(B):
                for t in range(T - 1):
                    out[b, t, 0, tokens[b, t + 1]] = 1.0
            return out

    stories = [([0, 5, 6, 7, 5, 6], [5]), ([0, 8, 9, 8, 9], [4])]
    assert induction.name_accuracy(Oracle(stories), stories) == 1.0


# ----- results helpers ------------------------------------------------------------------------------
def test_markdown_table_and_mean_std(tmp_path):
    md = common.markdown_table([{"a": 1, "b": 0.123456}, {"a": 2}], [("a", "A"), ("b", "B")])
    assert md.splitlines()[0] == "| A | B |" and "0.1235" in md
    assert common.mean_std([1.0, 3.0]) == pytest.approx((2.0, 2 ** 0.5))
    common.write_results(tmp_path, {"x": Path("p"), "s": induction.Settings()}, "# t")
    assert json.loads((tmp_path / "results.json").read_text())["x"] == "p"


# ----- end to end (tiny settings; the --quick scale is only a little larger) ---------------------------------
def tiny_settings(module, **kw):
    base = module.settings("quick")
    return lambda scale, *a, **k: dataclasses.replace(base, **kw)


def check_outputs(out: Path, png: str) -> dict:
    res = json.loads((out / "results.json").read_text())
    assert (out / "results.md").read_text().startswith("# ")
    assert (out / png).stat().st_size > 1000
    assert res["seeds"]
    return res


def test_polynomial_via_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(polynomial, "settings", tiny_settings(polynomial, model="tiny", steps=6, train_problems=300, test_per_k=4,
                                                     n_values=(1, 2)))
    out = tmp_path / "poly"
    assert main(["experiment", "polynomial", "--quick", "--out", str(out), "--seeds", "3", "--threads", "1"]) == 0
    res = check_outputs(out, "polynomial.png")
    assert res["seeds"] == [3] and {r["n"] for r in res["runs"]} == {1, 2}
    assert set(res["runs"][0]["acc"]) == {"1", "3", "6"}
    assert "| n |" in capsys.readouterr().out
    # A second run into the same directory reuses the finished runs (no retraining).
    again = run_experiment("polynomial", quick=True, out_dir=out, seeds=[3])
    assert [r["acc"] for r in again["runs"]] == [r["acc"] for r in res["runs"]]
    assert again["runs"][0]["train_seconds"] == res["runs"][0]["train_seconds"]


def test_induction_tiny(tmp_path, monkeypatch):
    monkeypatch.setattr(induction, "settings", tiny_settings(induction, steps=4, train_stories=100, eval_stories=8))
    res = run_experiment("induction", quick=True, out_dir=tmp_path / "ind")
    check_outputs(tmp_path / "ind", "induction.png")
    assert {r["n"] for r in res["runs"]} == {1, 2}
    assert [h["step"] for h in res["runs"][0]["history"]] == [2, 4]  # measured along training
    assert 0.0 <= res["summary"][0]["acc_n1"] <= 1.0


@pytest.mark.parametrize("name", ["bytes", "choose-n"])
def test_code_experiments_tiny(tmp_path, monkeypatch, name):
    monkeypatch.setattr(byte_exp, "settings", lambda scale, tokenizer="byte": dataclasses.replace(
        byte_exp.Settings(tokenizer=tokenizer), max_bytes=60_000, vocab_size=400, n_values=(1, 3),
        model=dict(dim=32, n_layers=4, n_heads=2), steps=3, batch_size=2, seq_len=32, warmup=1, eval_batches=1,
        prompts=1, prompt_len=8, max_new_tokens=8))
    res = run_experiment(name, quick=True, out_dir=tmp_path / name)
    check_outputs(tmp_path / name, ("bytes" if name == "bytes" else "choose_n") + ".png")
    spec = next(r for r in res["runs"] if r["n"] == 3)
    assert spec["matches_greedy"] and spec["tokens_per_forward"] >= 1.0
    assert len(spec["head_acc"]) == 3


def test_heads_via_cli(tmp_path, monkeypatch, capsys):
    # n=1 reference plus the three head types at equal layer counts, all trained on the same data,
    # evaluated per head and decoded by every chain (and the tree, where the heads can draft one).
    monkeypatch.setattr(heads, "settings", lambda scale: dataclasses.replace(
        heads.Settings(), max_bytes=60_000, vocab_size=400, n_future=3, model=dict(dim=32, n_layers=5, n_heads=2),
        steps=3, batch_size=2, seq_len=32, warmup=1, eval_batches=1, prompts=1, prompt_len=8, max_new_tokens=8,
        repeats=1))
    out = tmp_path / "heads"
    assert main(["experiment", "heads", "--quick", "--out", str(out), "--threads", "1"]) == 0
    assert "| sequential |" in capsys.readouterr().out
    res = check_outputs(out, "heads.png")
    runs = {r["heads"]: r for r in res["runs"]}
    assert list(runs) == ["n=1", "parallel", "causal", "sequential"]
    assert runs["n=1"]["n"] == 1 and [d["mode"] for d in runs["n=1"]["decoding"]] == ["greedy"]
    d = 32
    assert runs["parallel"]["params"] == runs["causal"]["params"] == runs["n=1"]["params"]
    assert runs["sequential"]["params"] - runs["parallel"]["params"] == 2 * (2 * d * d + 2 * d)  # eh_proj + 2 norms
    for name in ("parallel", "causal", "sequential"):
        r = runs[name]
        assert len(r["val_loss"]) == len(r["head_acc"]) == len(r["agree"]) == 3
        modes = [x["mode"] for x in r["decoding"]]
        assert modes == ["greedy", "spec1", "spec2", "tree"] and r["skipped_modes"] == {}
        assert all(x["matches_greedy"] and x["tokens_per_forward"] >= 1.0 for x in r["decoding"])
    md = (out / "results.md").read_text()
    assert "| causal | spec2 |" in md and "| sequential | tree |" in md


def test_heads_decoding_reports_modes_the_model_cannot_run():
    from mtp.experiments.heads import Settings, decoding
    from conftest import tiny_model

    model = tiny_model(0, n_future=3, head_type="sequential")
    rows, skipped = decoding(model, [[1, 2, 3], [4, 5]], Settings(modes=("spec1", "spec3"), max_new_tokens=6,
                                                                  repeats=1))
    assert [r["mode"] for r in rows] == ["greedy", "spec1"] and rows[1]["matches_greedy"]
    assert list(skipped) == ["spec3"] and "n_future=3" in skipped["spec3"]


def test_registry_errors():
    assert set(EXPERIMENTS) == {"induction", "polynomial", "bytes", "choose-n", "heads"}
    with pytest.raises(ValueError):
        run_experiment("nope", quick=True)
    with pytest.raises(ValueError):
        run_experiment("induction", scale="huge")


def test_cli_set_overrides_settings(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(polynomial, "settings", tiny_settings(polynomial, model="tiny", steps=6, train_problems=300, test_per_k=4,
                                                     n_values=(1, 2)))
    out = tmp_path / "poly"
    assert main(["experiment", "polynomial", "--quick", "--out", str(out), "--seeds", "0", "--threads", "1",
                 "--set", "n_values=[2]", "--set", "lr=0.01"]) == 0
    res = check_outputs(out, "polynomial.png")
    assert {r["n"] for r in res["runs"]} == {2}
    assert res["settings"]["lr"] == 0.01 and "--set 'lr=0.01'" in (out / "results.md").read_text()
    assert main(["experiment", "polynomial", "--quick", "--out", str(out), "--set", "lr_typo=1"]) == 2
    assert "unknown experiment setting(s) lr_typo" in capsys.readouterr().err


def test_default_out_dir_differs_for_different_overrides(tmp_path, monkeypatch):
    seen = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(polynomial, "run", lambda out, *a, **k: seen.append(out) or {})
    for ops in ([1, 2], [3]):  # a structured (list) setting; polynomial has no `sizes`
        run_experiment("polynomial", scale="medium", overrides={"lr": 0.01, "test_ops": ops})
    assert len(set(seen)) == 2 and all(p.name.startswith("polynomial-medium-lr0.01-test_ops") for p in seen)
