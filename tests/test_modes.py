"""Decoding modes (`mtp.modes`): both spellings parse to the same DecodeMode, bad ones fail with one
line, and running a mode is exactly calling its decoder."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from mtp.cli import main
from mtp.generate import GenerationError, generate
from mtp.modes import DecodeMode, mode_from_flags, parse_mode
from mtp.speculative import speculative_generate, tree_generate

from conftest import tiny_model

VOCAB = 53


@contextmanager
def one_line_error(match: str) -> Iterator[None]:
    """Expect a GenerationError whose message is one line containing `match` (a regex)."""
    with pytest.raises(GenerationError, match=match) as excinfo:
        yield
    assert "\n" not in str(excinfo.value)


# ----- the two grammars -------------------------------------------------------------------------
@pytest.mark.parametrize("text, mode", [
    ("greedy", DecodeMode()),
    ("spec1", DecodeMode("chain", k=1)),
    ("spec3", DecodeMode("chain", k=3, drafter="heads")),
    ("spec2+lookup", DecodeMode("chain", k=2, drafter="both")),
    ("lookup4", DecodeMode("chain", k=4, drafter="lookup")),
    ("tree", DecodeMode("tree")),
    ("tree:3,2,1", DecodeMode("tree", widths=(3, 2, 1))),
    ("tree:4", DecodeMode("tree", widths=(4,))),
])
def test_bench_grammar_parses_and_round_trips(text, mode):
    assert parse_mode(text) == mode
    assert str(mode) == text


@pytest.mark.parametrize("speculative, drafter, text", [
    (None, "heads", "greedy"),
    ("3", "heads", "spec3"),
    (3, "heads", "spec3"),  # Python callers (CodegenConfig) may give k as a number
    ("2", "both", "spec2+lookup"),
    ("4", "lookup", "lookup4"),
    ("tree", "heads", "tree"),
])
def test_flags_build_the_same_modes(speculative, drafter, text):
    assert mode_from_flags(speculative, drafter) == parse_mode(text)


def test_flags_spell_the_mode_for_messages():
    assert mode_from_flags("tree").flags == "--speculative tree"
    assert mode_from_flags("3", "lookup").flags == "--speculative 3 --drafter lookup"
    assert parse_mode("tree:2,1").flags == "tree:2,1"  # no command-line spelling


@pytest.mark.parametrize("text, match", [
    ("beam", "unknown decoding mode 'beam'; use greedy, spec<k>"),
    ("spec", "unknown decoding mode"),
    ("spec\u00b3", "unknown decoding mode"),  # a digit to str.isdigit, not to int()
    ("lookup2+lookup", "unknown decoding mode"),
    ("Greedy", "unknown decoding mode"),
    ("spec0", "k must be >= 1 drafts, got k=0"),
    ("lookup0", "k must be >= 1 drafts, got k=0"),
    ("tree:3,x", "tree widths must look like 3,2,1, got '3,x'"),
    ("tree:", "tree widths must look like 3,2,1"),
    ("tree:-1", "tree widths must look like 3,2,1"),
    ("tree:2,0", "tree widths must be positive integers"),
])
def test_bad_bench_modes_fail_in_one_line(text, match):
    with one_line_error(match):
        parse_mode(text)


@pytest.mark.parametrize("speculative, drafter, match", [
    ("fast", "heads", "--speculative takes a number of drafts k or 'tree', got 'fast'"),
    ("-1", "heads", "--speculative takes a number of drafts k or 'tree'"),
    ("0", "heads", "k must be >= 1 drafts, got k=0"),
    (None, "lookup", "--drafter lookup drafts a chain: give it with --speculative k"),
    ("tree", "both", "--drafter both drafts a chain"),
    ("3", "ngram", "drafter must be one of heads, lookup, both, got 'ngram'"),
])
def test_bad_flags_fail_in_one_line(speculative, drafter, match):
    with one_line_error(match):
        mode_from_flags(speculative, drafter)


@pytest.mark.parametrize("fields, match", [
    (dict(kind="beam"), "decoding kind must be one of plain, chain, tree"),
    (dict(kind="chain"), "k must be >= 1 drafts, got k=None"),
    (dict(kind="tree", k=2), "k \\(drafts\\) goes with kind 'chain'"),
    (dict(kind="chain", k=2, widths=(2,)), "tree widths go with kind 'tree'"),
])
def test_inconsistent_fields_fail_in_one_line(fields, match):
    with one_line_error(match):
        DecodeMode(**fields)


def test_widths_become_a_hashable_tuple():
    assert DecodeMode("tree", widths=[2, 1]) == parse_mode("tree:2,1")
    assert len({DecodeMode("tree", widths=[2, 1]), parse_mode("tree:2,1")}) == 1


# ----- checks against a temperature and a model --------------------------------------------------
@pytest.mark.parametrize("mode, match", [
    (mode_from_flags("tree"), "--speculative tree decodes greedily, so --temperature 0.8 would be ignored"),
    (parse_mode("tree:2,1"), "tree:2,1 decodes greedily"),
    (mode_from_flags("3", "lookup"), "--speculative 3 --drafter lookup: prompt lookup drafts are verified greedily"),
    (parse_mode("spec2+lookup"), "--drafter both: prompt lookup drafts are verified greedily"),
])
def test_greedy_only_modes_refuse_a_temperature(mode, match):
    with one_line_error(match):
        mode.check_temperature(0.8)
    mode.check_temperature(0.0)


def test_sampling_modes_take_a_temperature():
    for text in ("greedy", "spec1", "spec3"):
        parse_mode(text).check_temperature(0.8)


def test_modes_are_checked_against_the_model():
    two_heads = tiny_model(n_future=2, vocab_size=VOCAB, max_seq_len=64)
    parse_mode("spec1").check(two_heads)
    parse_mode("tree").check(two_heads)  # the default tree, cut to one draft head
    with one_line_error("need 3 heads, but the model has n_future=2"):
        parse_mode("spec2").check(two_heads)
    with one_line_error("need 3 heads"):
        parse_mode("tree:2,2").check(two_heads)
    with one_line_error("more than the vocabulary"):
        parse_mode(f"tree:{VOCAB + 1}").check(two_heads)
    one_head = tiny_model(n_future=1, vocab_size=VOCAB, max_seq_len=64)
    parse_mode("lookup3").check(one_head)  # prompt lookup needs no draft heads
    with one_line_error("n_future >= 2"):
        parse_mode("tree").check(one_head)
    with one_line_error("decodes greedily"):
        parse_mode("tree").check(two_heads, temperature=0.5)


# ----- running a mode is calling its decoder ------------------------------------------------------
def prompts(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(VOCAB, (n,), generator=g).tolist() for n in (3, 7, 5)]


def direct(model: Any, text: str, ps: list[list[int]], n: int, **kw: Any) -> Any:
    """The decoder call each bench spelling stands for, written out by hand."""
    calls = {
        "greedy": lambda: generate(model, ps, n, **kw),
        "spec2": lambda: speculative_generate(model, ps, n, k=2, **kw),
        "spec1+lookup": lambda: speculative_generate(model, ps, n, k=1, drafter="both", **kw),
        "lookup3": lambda: speculative_generate(model, ps, n, k=3, drafter="lookup", **kw),
        "tree": lambda: tree_generate(model, ps, n, **kw),
        "tree:2,1": lambda: tree_generate(model, ps, n, tree=(2, 1), **kw),
    }
    return calls[text]()


def streamed(run: Any) -> tuple[Any, list[list[list[int]]]]:
    """Run `run(on_tokens)` and return its result and everything the callback saw."""
    seen: list[list[list[int]]] = []
    result = run(lambda new: seen.append([list(t) for t in new]))
    return result, seen


@pytest.mark.parametrize("text", ["greedy", "spec2", "spec1+lookup", "lookup3", "tree", "tree:2,1"])
def test_mode_run_equals_the_decoder_called_directly(text):
    model = tiny_model(n_future=3, vocab_size=VOCAB, max_seq_len=64)
    ps, stop = prompts(1), (7,)
    kw = dict(batch_size=2, stop_tokens=stop)
    got, got_seen = streamed(lambda cb: parse_mode(text).run(model, ps, 10, on_tokens=cb, **kw))
    want, want_seen = streamed(lambda cb: direct(model, text, ps, 10, on_tokens=cb, **kw))
    assert type(got) is type(want)
    assert (got.tokens, got.forwards, got.stop_reasons) == (want.tokens, want.forwards, want.stop_reasons)
    assert got_seen == want_seen


@pytest.mark.parametrize("text", ["greedy", "spec2"])
def test_sampled_mode_run_equals_the_decoder_called_directly(text):
    model = tiny_model(n_future=3, vocab_size=VOCAB, max_seq_len=64)
    ps = prompts(2)
    kw = dict(temperature=0.9, top_k=20, top_p=0.95, seed=3)
    got = parse_mode(text).run(model, ps, 10, **kw)
    want = direct(model, text, ps, 10, **kw)
    assert got.tokens == want.tokens and got.forwards == want.forwards


def test_generate_refuses_bad_flags_before_loading_a_model(tmp_path: Path, capsys):
    missing = tmp_path / "no-such-run"  # never opened: the mode fails first
    for flags, words in [(["--speculative", "tree", "--temperature", "0.8"], "--speculative tree decodes greedily"),
                         (["--speculative", "fast"], "--speculative takes a number of drafts k or 'tree'"),
                         (["--drafter", "lookup"], "--drafter lookup drafts a chain"),
                         (["--speculative", "2", "--drafter", "both", "--temperature", "1"],
                          "prompt lookup drafts are verified greedily")]:
        assert main(["generate", "--checkpoint", str(missing), "--prompt", "x", *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
