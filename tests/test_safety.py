"""Nothing lost, nothing silent (issue 15): each reproduction of the issue, one test each.

Commands that fail must leave what was there; corrupt checkpoints are named, never loaded;
bad input is one line on stderr with exit code 2 and writes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from mtp.checkpoint import CheckpointError, checkpoints, load_model, resolve_checkpoint, save_checkpoint
from mtp.cli import build_parser, main
from mtp.data import byte_tokenizer
from mtp.train import train

from conftest import tiny_model


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err.strip()


def one_line_error(rc: int, err: str, *words: str) -> None:
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def copy_run(tiny_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    return run


def flip_bytes(path: Path, n: int = 256) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(255 - b for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


# ----- 1. a failed prepare loses nothing ---------------------------------------------------------

def test_failed_prepare_leaves_existing_dataset_untouched(corpus, tmp_path, capsys):
    target = tmp_path / "x"
    shutil.copytree(corpus, target)
    before = snapshot(target)
    empty = tmp_path / "z.txt"
    empty.write_text("")
    rc, _, err = run_cli(["prepare", empty, "--out", target, "--tokenizer", "byte"], capsys)
    one_line_error(rc, err, "is empty")
    assert snapshot(target) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_failed_prepare_into_new_dir_leaves_nothing(tmp_path, capsys):
    empty = tmp_path / "z.txt"
    empty.write_text("")
    rc, _, err = run_cli(["prepare", empty, "--out", tmp_path / "new", "--tokenizer", "byte"], capsys)
    one_line_error(rc, err, "is empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["z.txt"]


def test_prepare_replaces_a_dataset_and_refuses_a_run(corpus, tiny_run, tmp_path, capsys):
    src = tmp_path / "a.txt"
    src.write_text("print('hello')\n" * 200)
    target = tmp_path / "x"
    shutil.copytree(corpus, target)
    rc, _, _ = run_cli(["prepare", src, "--out", target, "--tokenizer", "byte"], capsys)
    assert rc == 0 and json.loads((target / "meta.json").read_text())["n_files"] == 1
    run = copy_run(tiny_run, tmp_path)
    before = snapshot(run)
    rc, _, err = run_cli(["prepare", src, "--out", run, "--tokenizer", "byte"], capsys)
    one_line_error(rc, err, "already holds a training run", "--force")
    assert snapshot(run) == before


# ----- 3. import into an existing run ------------------------------------------------------------

def test_import_refuses_existing_run_and_keeps_latest(tiny_run, tmp_path, capsys):
    from mtp.interop import save_meta

    run = copy_run(tiny_run, tmp_path)
    latest = (run / "latest").read_text()
    model, tok = load_model(run)
    save_meta(model, tmp_path / "meta", tok)
    rc, _, err = run_cli(["import", tmp_path / "meta", "--out", run], capsys)
    one_line_error(rc, err, "already holds a training run", "latest: ckpt-00000004")
    assert (run / "latest").read_text() == latest
    rc, out, _ = run_cli(["import", tmp_path / "meta", "--out", tmp_path / "imported"], capsys)
    assert rc == 0 and resolve_checkpoint(tmp_path / "imported").name == "ckpt-00000000"


def test_export_refuses_a_dataset_and_writes_nothing_on_failure(corpus, tiny_run, tmp_path, capsys):
    target = tmp_path / "x"
    shutil.copytree(corpus, target)
    before = snapshot(target)
    rc, _, err = run_cli(["export", tiny_run, "--out", target, "--format", "meta"], capsys)
    one_line_error(rc, err, "already holds a prepared dataset")
    assert snapshot(target) == before
    rc, _, _ = run_cli(["export", tiny_run, "--out", tmp_path / "m", "--format", "meta"], capsys)
    assert rc == 0 and (tmp_path / "m" / "params.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


# ----- 2. verified checkpoints -------------------------------------------------------------------

def test_corrupt_weights_are_an_error_naming_the_file(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path)
    weights = resolve_checkpoint(run) / "model.safetensors"
    flip_bytes(weights)
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_model(run)
    rc, _, err = run_cli(["generate", "--checkpoint", run, "--prompt", "def", "--max-new-tokens", "2"], capsys)
    one_line_error(rc, err, str(weights), "corrupt")
    rc, _, err = run_cli(["eval", "--checkpoint", run, "--data", run, "--batches", "1"], capsys)
    one_line_error(rc, err, str(weights), "corrupt")


def test_train_refuses_an_out_holding_a_dataset(corpus, tmp_path, capsys):
    target = tmp_path / "x"
    shutil.copytree(corpus, target)
    before = snapshot(target)
    rc, _, err = run_cli(["train", "--data", corpus, "--out", target, "--steps", "2", "--no-progress"], capsys)
    one_line_error(rc, err, "already holds a prepared dataset")
    assert snapshot(target) == before


def test_checkpoint_without_manifest_still_loads(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    (resolve_checkpoint(run) / "manifest.json").unlink()
    model, tok = load_model(run)
    assert model.cfg.n_future == 2 and tok is not None


def test_resume_falls_back_to_newest_verified_checkpoint(make_config, tmp_path, capsys):
    out = tmp_path / "r"
    train(make_config(out, steps=8, save_every=2, eval_every=8, keep=2), stop_after=6)  # ckpt 4 and 6
    flip_bytes(out / "ckpt-00000006" / "model.safetensors")
    capsys.readouterr()
    res = train(make_config(out, steps=8, save_every=2, eval_every=8, keep=2, resume=True))
    err = capsys.readouterr().err
    assert "skipping ckpt-00000006" in err and "resuming from ckpt-00000004" in err
    assert res["step"] == 8
    assert [p.name for p in checkpoints(out)] == ["ckpt-00000006", "ckpt-00000008"]
    for p in checkpoints(out):
        load_model(p)  # both rewritten, both verify


def test_resume_with_every_checkpoint_corrupt_is_an_error(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path)
    for ck in checkpoints(run):
        flip_bytes(ck / "model.safetensors")
    saved = json.loads((resolve_checkpoint(run) / "train_config.json").read_text())
    saved["checkpointing"].update(out=str(run), resume=True)
    yml = tmp_path / "c.yaml"
    yml.write_text(json.dumps(saved))  # JSON is YAML
    rc, _, err = run_cli(["train", "--config", yml], capsys)
    assert rc == 2 and err.splitlines()[-1].startswith("mtp train: error: no checkpoint in")


def test_rotation_keeps_the_checkpoint_just_written():
    # After a fallback resume, a newer (corrupt) checkpoint may sort after the one being written.
    import tempfile

    model = tiny_model()
    with tempfile.TemporaryDirectory() as d:
        run = Path(d)
        for step in (2, 6):
            save_checkpoint(run, step, model, keep=5)
        save_checkpoint(run, 4, model, keep=1)
        assert [p.name for p in checkpoints(run)] == ["ckpt-00000004", "ckpt-00000006"]
        assert resolve_checkpoint(run).name == "ckpt-00000004"


def test_stale_temporary_checkpoints_are_removed_when_a_run_starts(make_config, tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path)
    stale = run / ".tmp-ckpt-00000006-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    train(make_config(run, steps=6, save_every=2, eval_every=6, eval_batches=1, resume=True))
    assert not stale.exists() and "half-written" in capsys.readouterr().err


def test_resume_with_nothing_to_resume_says_it_starts_fresh(make_config, tmp_path, capsys):
    res = train(make_config(tmp_path / "new", steps=2, eval_every=2, eval_batches=1, resume=True))
    assert res["step"] == 2 and "starting fresh" in capsys.readouterr().err


# ----- 6. one-line errors that write nothing -----------------------------------------------------

BAD_YAML = [
    ('steps: "abc"', "steps must be an integer, got 'abc'"),
    ('lr: "abc"', "lr must be a number, got 'abc'"),
    ('n_future: "4"', "n_future must be an integer, got '4'"),
    ('model: {dim: "x"}', "model.dim must be an integer, got 'x'"),
    ("steps: 2.5", "steps must be an integer, got 2.5"),
    ("steps: [1,\n", "not valid YAML at line"),
    ("model: 5", "model must be a mapping"),
    ("parallel: x", "parallel must be one of auto, none, ddp, fsdp, got 'x'"),
    # the sectioned form (mtp.train_config): errors name the dotted key as written
    ('optimizer: {steps: "abc"}', "optimizer.steps must be an integer, got 'abc' (a string)"),
    ("optimizer: {steps: 2.5}", "optimizer.steps must be an integer, got 2.5"),
    ("optimizer: {lr: 0}", "optimizer.lr must be positive, got 0.0"),
    ("checkpointing: {save_every: -1}", "checkpointing.save_every must be >= 0, got -1"),
    ("runtime: {parallel: x}", "runtime.parallel must be one of auto, none, ddp, fsdp, got 'x'"),
    ('model: {overrides: {dim: "x"}}', "model.overrides.dim must be an integer, got 'x'"),
    ('model: {n_future: "4"}', "model.n_future must be an integer, got '4'"),
    ("model: {nope: 1}", "model.nope is neither a model option"),
    ("optimizer: {lrr: 1}", "optimizer.lrr is not an option of optimizer; expected one of head_weights, steps, lr"),
    ("data: {lr: 1}", "data.lr is not an option of data; lr is optimizer.lr"),
    ("optimizer: 5", "optimizer must be a mapping of optimizer options"),
    ("lr: 1.0e-3\noptimizer: {lr: 2.0e-3}", "lr and optimizer.lr set the same option; keep one"),
    ("model: {overrides: {n_future: 3}}", "model.overrides.n_future: set model.n_future"),
    ("stesp: 3", "unknown training option(s): stesp (did you mean steps?)"),
]


@pytest.mark.parametrize("text, msg", BAD_YAML)
def test_bad_yaml_is_one_line_and_writes_nothing(text, msg, corpus, tmp_path, capsys):
    yml = tmp_path / "c.yaml"
    data = "" if text.startswith("data:") else f"data: {corpus}\n"  # a case that sets data: itself
    yml.write_text(f"{data}out: {tmp_path / 'run'}\n{text}")
    rc, _, err = run_cli(["train", "--config", yml, "--no-progress"], capsys)
    one_line_error(rc, err, msg)
    assert err.startswith("mtp train: error: "), err
    assert not (tmp_path / "run").exists()


BAD_FLAGS: list[tuple[list[str], str]] = [
    (["--model", "dim=abc"], "model.dim must be an integer, got 'abc'"),
    (["--lr", "nan"], "lr must be a finite number, got nan"),
    (["--n-future", "4", "--head-weights", "1", "1"], "head_weights has 2 numbers but the model has 4 heads"),
    (["--device", "nonsense"], "device must be auto, cpu, cuda or cuda:N"),
    (["--steps", "0"], "steps must be >= 1, got 0"),
]
if not torch.cuda.is_available():
    BAD_FLAGS.append((["--device", "cuda"], "no CUDA GPU is available"))


@pytest.mark.parametrize("flags, msg", BAD_FLAGS)
def test_bad_flags_are_one_line_and_write_nothing(flags, msg, corpus, tmp_path, capsys):
    rc, _, err = run_cli(["train", "--data", corpus, "--out", tmp_path / "run", "--no-progress", "--steps", "2",
                          *flags], capsys)
    one_line_error(rc, err, msg)
    assert not (tmp_path / "run").exists()


def test_a_new_run_that_fails_before_its_first_checkpoint_leaves_nothing(make_config, tmp_path, monkeypatch):
    import importlib

    train_mod = importlib.import_module("mtp.train")  # the package exports a `train` function too

    def boom(*a: Any, **k: Any) -> None:
        raise FloatingPointError("loss became nan at step 1")

    monkeypatch.setattr(train_mod, "mtp_backward", boom)
    with pytest.raises(FloatingPointError):
        train(make_config(tmp_path / "run", steps=2))
    assert not (tmp_path / "run").exists()  # no metrics.jsonl, no tb/


def test_generate_batch_line_without_prompt(tiny_run, tmp_path, capsys):
    f = tmp_path / "f.jsonl"
    f.write_text('{"prompt": "def f"}\n{"text": "no prompt"}\n')
    rc, _, err = run_cli(["generate", "--checkpoint", tiny_run, "--batch", f], capsys)
    one_line_error(rc, err, f"{f} line 2", '"prompt"', "'text'")


# ----- 7. silent surprises -----------------------------------------------------------------------

def test_tree_drafts_with_temperature_are_refused(tiny_run, capsys):
    rc, _, err = run_cli(["generate", "--checkpoint", tiny_run, "--prompt", "x", "--speculative", "tree",
                          "--temperature", "0.8", "--seed", "1"], capsys)
    one_line_error(rc, err, "--speculative tree decodes greedily", "--temperature 0.8")


def test_generation_stopped_by_the_context_warns(tiny_run, capsys):
    context = load_model(tiny_run)[0].cfg.max_seq_len
    prompt = "a" * (context - 5)  # byte tokenizer: one token per character
    rc, out, err = run_cli(["generate", "--checkpoint", tiny_run, "--prompt", prompt, "--max-new-tokens", "20",
                            "--no-stop"], capsys)
    assert rc == 0
    assert "stopped after 5 of 20 new tokens" in err and "context" in err and f"max_seq_len is {context}" in err


def test_finetune_refuses_init_from(tiny_run, corpus, tmp_path, capsys):
    rc, _, err = run_cli(["finetune", tiny_run, "--init-from", tmp_path / "other", "--data", corpus,
                          "--out", tmp_path / "ft"], capsys)
    one_line_error(rc, err, "--init-from", "finetune starts from BASE")
    yml = tmp_path / "c.yaml"
    yml.write_text(f"init_from: {tmp_path / 'other'}\n")
    rc, _, err = run_cli(["finetune", tiny_run, "--config", yml, "--data", corpus, "--out", tmp_path / "ft"], capsys)
    one_line_error(rc, err, "init_from:", "finetune starts from BASE")
    assert not (tmp_path / "ft").exists()


def _help_lines(command: str) -> dict[str, str]:
    """{--flag: its help text} of a subcommand, from argparse's own actions."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]  # type: ignore[union-attr]
    return {a.option_strings[-1]: a.help or "" for a in sub._actions
            if a.option_strings and a.help != "==SUPPRESS==" and a.dest != "help"}


def test_finetune_help_shows_its_real_defaults():
    helps = _help_lines("finetune")
    assert helps["--trainable"].endswith("(default: extra_heads)")
    assert helps["--targets"].endswith("(default: self)")
    assert "base checkpoint" in helps["--n-future"]
    assert "--init-from" not in helps


@pytest.mark.parametrize("command", ["train", "finetune"])
def test_every_training_flag_says_what_it_does_and_its_default(command):
    for flag, text in _help_lines(command).items():
        if flag == "--config":
            continue
        assert "(default: " in text and not text.startswith("(default"), flag
    helps = _help_lines(command)
    assert "ddp" in helps["--parallel"] and "fsdp" in helps["--parallel"]
    for flag in ["--dtype", "--head-type", "--trainable", "--targets", "--init-heads", "--preset"]:
        assert " | " in helps[flag], flag
    assert "cuda:N" in helps["--device"]


def test_training_flags_are_listed_by_concern():
    # Each TrainConfig section is a `train --help` section listing its fields' flags, in order.
    from mtp.options import flat_name
    from mtp.train_config import SECTIONS

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["train"]  # type: ignore[union-attr]
    listed = {g.title: [a.dest for a in g._group_actions] for g in sub._action_groups}
    for name, cls in SECTIONS.items():
        assert listed[f"{name} options"] == [flat_name(f) for f in dataclasses.fields(cls)], name
    text = sub.format_help()
    positions = [text.index(f"\n{name} options:\n") for name in SECTIONS]
    assert positions == sorted(positions)
    lr = text.index("\n  --lr ")  # the option's own line, not the usage
    assert text.index("\noptimizer options:") < lr < text.index("\ndata options:")


@pytest.mark.parametrize("command", ["eval", "generate", "eval-code", "prepare", "self-data", "import", "export"])
def test_every_option_of_the_other_commands_has_help(command):
    for flag, text in _help_lines(command).items():
        assert text.strip(), f"{command} {flag}"


def test_byte_tokenizer_fixture_is_byte_level(tiny_run):
    # The context test above relies on it: one token per ASCII character.
    tok = load_model(tiny_run)[1]
    assert tok.encode("abc") == byte_tokenizer().encode("abc") and len(tok.encode("abc")) == 3
