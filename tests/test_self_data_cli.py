"""`mtp self-data`, then `mtp finetune` on what it wrote."""

from __future__ import annotations

from mtp.cli import main


def test_cli_self_data_then_finetune_on_it(corpus, tiny_run, tmp_path, capsys):
    out = tmp_path / "self"
    args = ["self-data", str(tiny_run), "--data", str(corpus), "--out", str(out), "--prompts", "6",
            "--prompt-len", "16", "--new-tokens", "40", "--batch-size", "3", "--dtype", "fp32", "--no-progress"]
    assert main(args) == 0
    assert "6 prompts continued" in capsys.readouterr().out
    assert main(["finetune", str(tiny_run), "--data", str(out), "--out", str(tmp_path / "ft"), "--steps", "2",
                 "--batch-size", "2", "--seq-len", "16", "--dtype", "fp32", "--eval-batches", "1",
                 "--targets", "distill", "--distill-topk", "4", "--no-progress"]) == 0
    assert (tmp_path / "ft" / "latest").is_file()
    # The corpus itself, or a directory holding a run, is never overwritten.
    assert main(args[:4] + ["--out", str(corpus)] + args[6:]) == 2
    assert "the corpus itself" in capsys.readouterr().err
    assert main(args[:4] + ["--out", str(tmp_path / "ft")] + args[6:]) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert (tmp_path / "ft" / "latest").is_file()
