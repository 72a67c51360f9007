"""`mtp export --format hf-mtp | vllm-eagle` on the command line (the formats themselves are
tested in test_export_serving.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtp import save_checkpoint
from mtp.cli import main
from mtp.interop.serving import EAGLE_DRAFT

from conftest import tiny_model
from test_export_serving import serving_model

pytest.importorskip("transformers")


def test_cli_export_serving_formats(tmp_path, capsys):
    save_checkpoint(tmp_path / "seq", 0, serving_model())
    save_checkpoint(tmp_path / "par", 0, tiny_model(0, n_future=2))
    assert main(["export", str(tmp_path / "seq"), "--out", str(tmp_path / "a"), "--format", "hf-mtp"]) == 0
    assert "head 2 as its MTP layer" in capsys.readouterr().out
    assert json.loads((tmp_path / "a" / "config.json").read_text())["model_type"] == "glm4_moe"
    assert main(["export", str(tmp_path / "seq"), "--out", str(tmp_path / "b"), "--format", "vllm-eagle"]) == 0
    assert f"-> {tmp_path / 'b' / EAGLE_DRAFT}; head 3 not exported" in capsys.readouterr().out
    assert (tmp_path / "b" / EAGLE_DRAFT / "model.safetensors").is_file()
    for argv, message in [
        (["export", str(tmp_path / "par"), "--out", str(tmp_path / "c"), "--format", "vllm-eagle"],
         "mtp export: error: --format vllm-eagle exports sequential heads"),
        (["export", str(tmp_path / "seq"), "--out", str(tmp_path / "d"), "--format", "hf-mtp", "--all-heads"],
         "mtp export: error: --all-heads applies to --format hf only, not --format hf-mtp"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and len(err.strip().splitlines()) == 1
        assert not Path(argv[3]).exists()
