import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtp.checkpoint import CheckpointError, load_model, resolve_checkpoint
from mtp.cli import main
from mtp.data import prepare
from mtp.model import ConfigError
from mtp.train import OptimizerConfig, lr_at, train

from conftest import tiny_train_config


cfg = tiny_train_config  # shared with the other test files (tests/conftest.py)


def test_lr_schedule_warmup_then_cosine_to_floor():
    c = OptimizerConfig(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.03)
    assert lr_at(0, c) == pytest.approx(0.1)
    assert lr_at(9, c) == pytest.approx(1.0)
    assert lr_at(10, c) == pytest.approx(1.0)
    assert lr_at(100, c) == pytest.approx(0.03)
    assert all(lr_at(s, c) >= lr_at(s + 1, c) for s in range(10, 99))


def test_training_reduces_loss_and_writes_checkpoint(corpus, tmp_path):
    res = train(cfg(corpus, tmp_path / "run", steps=30, eval_every=30))
    train_recs = [r for r in res["records"] if r["kind"] == "train"]
    assert len(train_recs[0]["head_loss"]) == 2
    assert train_recs[-1]["loss"] < train_recs[0]["loss"] - 1.0
    ck = resolve_checkpoint(tmp_path / "run")
    assert ck.name == "ckpt-00000030"
    for f in ["config.json", "model.safetensors", "tokenizer.json", "trainer_state.pt", "train_config.json"]:
        assert (ck / f).exists(), f
    assert (tmp_path / "run" / "loss_curves.png").stat().st_size > 1000
    assert len(list((tmp_path / "run").glob("ckpt-*"))) == 2  # keep=2
    model, tok = load_model(tmp_path / "run")
    assert model.cfg.n_future == 2 and tok.vocab_size <= model.cfg.vocab_size
    assert len(res["val"]["loss"]) == 2 and 0 <= res["val"]["acc"][0] <= 1


def test_resume_reproduces_uninterrupted_loss_curve(corpus, tmp_path):
    full = train(cfg(corpus, tmp_path / "a", grad_accum=2))
    train(cfg(corpus, tmp_path / "b", grad_accum=2), stop_after=5)  # "crash" after step 5 (saved at 4)
    # Steps 5 was done but not saved; the resumed run redoes it from the step-4 checkpoint.
    resumed = train(cfg(corpus, tmp_path / "b", grad_accum=2, resume=True))
    a = [(r["kind"], r["step"], r["loss"]) for r in full["records"]]
    b = [(r["kind"], r["step"], r["loss"]) for r in resumed["records"]]
    assert a == b
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [r["step"] for r in full["records"]]


def test_refuses_to_overwrite_run_without_resume(corpus, tmp_path):
    train(cfg(corpus, tmp_path / "r", steps=4))
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(cfg(corpus, tmp_path / "r", steps=4))


def test_corrupt_checkpoint_gives_clear_error(corpus, tmp_path):
    train(cfg(corpus, tmp_path / "r", steps=4))
    ck = resolve_checkpoint(tmp_path / "r")
    weights = ck / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(ck)
    (ck / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is corrupt"):  # caught by the manifest
        load_model(ck)
    (ck / "manifest.json").unlink()  # as a checkpoint from before manifests: the parse fails instead
    with pytest.raises(CheckpointError, match="not a valid model config"):
        load_model(ck)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_tokenizer_vocab_mismatch_is_an_error(corpus, tmp_path):
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        train(cfg(corpus, tmp_path / "r", model={"vocab_size": 100}))


def test_cli_train_with_yaml_and_flags(corpus, tmp_path, capsys):
    yml = tmp_path / "c.yaml"
    yml.write_text(f"data: {corpus}\nout: {tmp_path / 'y'}\npreset: tiny\nsteps: 3\nbatch_size: 2\n"
                   "seq_len: 16\nmodel:\n  dim: 32\n")
    rc = main(["train", "--config", str(yml), "--n-future", "3", "--no-progress", "--dtype", "fp32",
               "--model", "n_layers=4", "--eval-batches", "1"])
    assert rc == 0
    model, _ = load_model(tmp_path / "y")
    assert (model.cfg.dim, model.cfg.n_layers, model.cfg.n_future) == (32, 4, 3)
    assert "final validation" in capsys.readouterr().out


@pytest.mark.parametrize("argv, msg", [
    (["train", "--data", "/nonexistent/corpus", "--no-progress"], "/nonexistent/corpus"),
    (["train", "--n-future", "0", "--no-progress"], "n_future must be >= 1"),
    (["train", "--model", "dim=65", "--no-progress"], "not divisible by n_heads"),
    (["train", "--n-future", "9", "--no-progress"], "heads need at least"),
    (["prepare", "/nonexistent/dir", "--out", "/tmp/x"], "/nonexistent/dir"),
    (["eval", "--checkpoint", "/nonexistent/ck", "--data", "/tmp"], "does not exist"),
])
def test_cli_bad_input_one_line_error(argv, msg, corpus, tmp_path, capsys):
    argv = [a if a != "/tmp/x" else str(tmp_path / "x") for a in argv]
    if argv[0] == "train" and "--data" not in argv:
        argv += ["--data", str(corpus), "--out", str(tmp_path / "o")]
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and msg in err and "Traceback" not in err


def test_console_script_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "mtp.cli", "presets"], capture_output=True, text=True, check=True)
    assert "7B" in out.stdout and "1M" in out.stdout


def test_finetune_extra_heads_keeps_next_token_predictions(corpus, tmp_path):
    train(cfg(corpus, tmp_path / "base", steps=6))
    base, _ = load_model(tmp_path / "base")
    res = train(cfg(corpus, tmp_path / "ft", steps=6, init_from=str(tmp_path / "base"), n_future=3,
                    trainable="extra_heads", lr=1e-2))
    ft, _ = load_model(tmp_path / "ft")
    assert ft.cfg.n_future == 3 and ft.cfg.n_trunk == base.cfg.n_trunk
    x = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ft(x)[:, :, 0], base(x)[:, :, 0])  # head 1 + trunk untouched
        assert not torch.allclose(ft(x)[:, :, 1], base(x)[:, :, 1])  # head 2 was trained
    sd_ft, sd_base = ft.state_dict(), base.state_dict()
    assert torch.equal(sd_ft["tok_embeddings.weight"], sd_base["tok_embeddings.weight"])
    assert len(res["val"]["loss"]) == 3


def test_finetune_rewires_parallel_heads_as_causal(corpus, tmp_path):
    train(cfg(corpus, tmp_path / "base", steps=2, n_future=3))
    base, _ = load_model(tmp_path / "base")
    train(cfg(corpus, tmp_path / "ft", steps=2, init_from=str(tmp_path / "base"), n_future=3,
              trainable="extra_heads", model={"head_type": "causal"}))
    ft, _ = load_model(tmp_path / "ft")
    assert ft.cfg.head_type == "causal" and ft.head_parent(2) == 1
    x = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ft(x)[:, :, 0], base(x)[:, :, 0])  # head 1 still reads the trunk
    with pytest.raises(ConfigError, match="parallel and causal heads may swap"):
        train(cfg(corpus, tmp_path / "lin", steps=2, init_from=str(tmp_path / "base"), n_future=3,
                  model={"head_type": "linear"}))


def test_finetune_n_prime_one_from_multi_token_model(corpus, tmp_path):
    train(cfg(corpus, tmp_path / "base", steps=4, n_future=2))
    train(cfg(corpus, tmp_path / "ft", steps=4, init_from=str(tmp_path / "base"), n_future=1))
    base, _ = load_model(tmp_path / "base")
    ft, _ = load_model(tmp_path / "ft")
    assert ft.cfg.n_future == 1 and ft.cfg.n_trunk == base.cfg.n_trunk
    assert ft.num_params() < base.num_params()


def test_cli_finetune_defaults_to_self_distilled_extra_heads(corpus, tmp_path, capsys):
    train(cfg(corpus, tmp_path / "base", steps=4, n_future=3))
    base, _ = load_model(tmp_path / "base")
    assert main(["finetune", str(tmp_path / "base"), "--data", str(corpus), "--out", str(tmp_path / "ft"),
                 "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--dtype", "fp32", "--no-progress",
                 "--eval-every", "2", "--eval-batches", "1", "--lr", "1e-2"]) == 0
    saved = json.loads((resolve_checkpoint(tmp_path / "ft") / "train_config.json").read_text())
    assert saved["finetuning"]["trainable"] == "extra_heads" and saved["finetuning"]["targets"] == "self"
    assert saved["model"]["n_future"] == 3
    ft, _ = load_model(tmp_path / "ft")
    x = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(ft(x)[:, :, 0], base(x)[:, :, 0])
    vals = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    agree = [r["head_agree"] for r in vals if r["kind"] == "val"][-1]
    assert agree[0] == 1.0 and len(agree) == 3 and all(0.0 <= a <= 1.0 for a in agree)


def test_evaluate_agreement_matches_manual_count(corpus, tmp_path):
    from mtp.data import TokenData, validation_batches
    from mtp.train import evaluate

    train(cfg(corpus, tmp_path / "run", steps=2, n_future=3))
    model, _ = load_model(tmp_path / "run")
    data = TokenData(corpus, "val")
    res = evaluate(model, data, 2, 16, 1, torch.device("cpu"))
    batch = next(iter(validation_batches(data, 2, 16, 3, 1)))
    with torch.no_grad():
        g = model(batch[:, :16]).argmax(-1)
    for i in range(3):
        manual = (g[:, : 16 - i, i] == g[:, i:, 0]).float().mean().item()
        assert res["agree"][i] == pytest.approx(manual)


def test_cli_generate_streams_and_speculation_matches(corpus, tmp_path, capsys):
    train(cfg(corpus, tmp_path / "run", steps=4, n_future=3))
    model, tok = load_model(tmp_path / "run")
    prompt = "def f(x):\n    return "
    from mtp.generate import generate

    want = prompt + tok.decode(generate(model, [tok.encode(prompt)], 12).tokens[0]) + "\n"
    capsys.readouterr()  # the training log
    for extra in ([], ["--speculative", "2"], ["--speculative", "tree"]):
        assert main(["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", prompt, "--no-stop",
                     "--max-new-tokens", "12", *extra]) == 0
        assert capsys.readouterr().out == want, extra
    two = ["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", prompt, "--prompt", "class A:", "--no-stop",
           "--max-new-tokens", "12"]
    assert main(two) == 0
    whole = capsys.readouterr().out
    assert main(two + ["--batch-size", "1", "--speculative", "2"]) == 0  # one row at a time, the same text
    assert capsys.readouterr().out == whole and whole.startswith(want)
    assert main(["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", prompt, "--speculative", "x"]) == 2
    assert "--speculative takes" in capsys.readouterr().err
    assert main(["bench", "decode", "--checkpoint", str(tmp_path / "run"), "--prompt", prompt, "--max-new-tokens", "6",
                 "--modes", "spec1", "--dtype", "bf16", "--batch-size", "1", "3", "--repeats", "1"]) == 0
    greedy_rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("greedy")]
    assert [row[1] for row in greedy_rows] == ["1", "3"]  # one prompt, repeated to fill the batch of 3


def test_cli_file_system_error_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "out"
    blocker.write_text("a file where a directory should go")
    src = tmp_path / "src.txt"
    src.write_text("print('hello')\n" * 50)
    assert main(["prepare", str(src), "--out", str(blocker), "--tokenizer", "byte"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mtp prepare: error:") and str(blocker) in err[0]


def test_cli_eval_code_end_to_end(corpus, tmp_path, capsys):
    train(cfg(corpus, tmp_path / "run", steps=2, n_future=2))
    out = tmp_path / "he.json"
    assert main(["eval-code", "--checkpoint", str(tmp_path / "run"), "--limit", "3", "--max-new-tokens", "8",
                 "--speculative", "1", "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    report = json.loads(out.read_text())
    assert report["problems"] == 3 and list(report["completions"]) == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert set(report["pass_at_k"]) == {"pass@1"}  # k=10 and 100 need more samples
    # A 2-step model writes no working code: every program ran in the sandbox and failed.
    statuses = {r["status"] for rs in report["results"].values() for r in rs}
    assert statuses <= {"failed", "error", "timeout"} and report["pass_at_k"]["pass@1"] == 0.0
    assert line.startswith("pass@1=0.00%") and "0/3 problems" in line
    assert main(["eval-code", "--checkpoint", str(tmp_path / "run"), "--samples", "2"]) == 2
    assert "one completion per problem" in capsys.readouterr().err
