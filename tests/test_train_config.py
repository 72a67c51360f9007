"""TrainConfig by sections: flat and nested YAML, flags, saved configs old and new, one-line errors."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from mtp.checkpoint import checkpoints, load_model, resolve_checkpoint, write_manifest
from mtp.cli import build_parser, build_train_config, main
from mtp.model import ConfigError
from mtp.train import (CheckpointConfig, DataConfig, FinetuneConfig, ModelSpec, OptimizerConfig, RuntimeConfig,
                       TrainConfig, train)
from mtp.train_config import FLAT_KEYS, SECTIONS

from conftest import tiny_train_config

FLAT_YAML = """\
preset: tiny
n_future: 2
head_type: causal
model: {dim: 32, n_layers: 4}
lr: 2.0e-3
steps: 7
head_weights: [1, 0.5]
data: some/corpus
batch_size: 3
out: runs/x
save_every: 0
dtype: fp32
chunk_size: null
trainable: heads
"""

NESTED_YAML = """\
model:
  preset: tiny
  n_future: 2
  head_type: causal
  overrides: {dim: 32, n_layers: 4}
optimizer: {lr: 2.0e-3, steps: 7, head_weights: [1, 0.5]}
data: {dir: some/corpus, batch_size: 3}
checkpointing: {out: runs/x, save_every: 0}
runtime: {dtype: fp32, chunk_size: null}
finetuning: {trainable: heads}
"""

FLAGS = ["--preset", "tiny", "--n-future", "2", "--head-type", "causal", "--model", "dim=32", "--model", "n_layers=4",
         "--lr", "2e-3", "--steps", "7", "--head-weights", "1", "0.5", "--data", "some/corpus", "--batch-size", "3",
         "--out", "runs/x", "--save-every", "0", "--dtype", "fp32", "--chunk-size", "none", "--trainable", "heads"]

EXPECTED = TrainConfig(
    model=ModelSpec(preset="tiny", n_future=2, head_type="causal", overrides={"dim": 32, "n_layers": 4}),
    optimizer=OptimizerConfig(lr=2e-3, steps=7, head_weights=[1.0, 0.5]),
    data=DataConfig(dir="some/corpus", batch_size=3),
    checkpointing=CheckpointConfig(out="runs/x", save_every=0),
    runtime=RuntimeConfig(dtype="fp32", chunk_size=None),
    finetuning=FinetuneConfig(trainable="heads"))

# A run's train_config.json as written before the sections (flat; every field, head_type "parallel").
OLD_FLAT_SAVED = {
    "preset": "tiny", "n_future": 2, "head_type": "parallel", "model": {}, "draft_vocab": 0, "head_weights": None,
    "steps": 4, "lr": 0.003, "warmup": 3, "min_lr_ratio": 0.03, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95,
    "grad_clip": 1.0, "data": "CORPUS", "batch_size": 4, "seq_len": 32, "grad_accum": 1, "seed": 0, "out": "OUT",
    "resume": False, "save_every": 2, "keep": 3, "eval_every": 4, "eval_batches": 1, "log_every": 1,
    "progress": False, "device": "auto", "dtype": "fp32", "chunk_size": 50, "compile": False,
    "activation_checkpointing": False, "parallel": "auto", "threads": 0, "init_from": None, "init_heads": "copy",
    "trainable": "all", "targets": "data", "distill_topk": 32, "base_cache": None, "base_cache_dtype": "bf16",
}


def parse(argv: list[str]) -> TrainConfig:
    return build_train_config(build_parser().parse_args(["train", *argv]))


def test_flat_yaml_nested_yaml_and_flags_give_the_same_config(tmp_path):
    flat, nested = tmp_path / "flat.yaml", tmp_path / "nested.yaml"
    flat.write_text(FLAT_YAML)
    nested.write_text(NESTED_YAML)
    assert parse(["--config", str(flat)]) == EXPECTED
    assert parse(["--config", str(nested)]) == EXPECTED
    assert parse(FLAGS) == EXPECTED
    # ModelConfig fields may also sit directly in a nested model: section (as in the flat model:).
    assert TrainConfig.from_dict({"model": {"preset": "tiny", "dim": 32}}).model.overrides == {"dim": 32}


def test_flags_override_nested_yaml_and_refine_its_model(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text(NESTED_YAML)
    cfg = parse(["--config", str(yml), "--lr", "5e-4", "--model", "dim=64", "--no-progress"])
    assert cfg.optimizer.lr == 5e-4 and cfg.checkpointing.progress is False
    assert cfg.model.overrides == {"dim": 64, "n_layers": 4}
    assert (cfg.data, cfg.runtime, cfg.finetuning) == (EXPECTED.data, EXPECTED.runtime, EXPECTED.finetuning)


def test_every_field_has_a_unique_flat_key_and_a_flag():
    fields = [(s, f.name) for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    assert sorted(FLAT_KEYS.values()) == sorted(fields)
    assert FLAT_KEYS["data"] == ("data", "dir") and FLAT_KEYS["model"] == ("model", "overrides")
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["train"]  # type: ignore[union-attr]
    assert set(FLAT_KEYS) <= {a.dest for a in sub._actions}


def test_saved_config_round_trips_and_old_flat_saved_config_loads(corpus, tmp_path):
    cfg = tiny_train_config(corpus, tmp_path / "r", steps=4, save_every=2, eval_every=4, eval_batches=1, keep=3)
    saved = json.loads(json.dumps(dataclasses.asdict(cfg)))  # what train_config.json holds now
    assert set(saved) == set(SECTIONS) and TrainConfig.from_dict(saved) == cfg
    old = {**OLD_FLAT_SAVED, "data": str(corpus), "out": str(tmp_path / "r")}
    # The old default head_type "parallel" is saved explicitly; otherwise the same run.
    assert TrainConfig.from_dict(old) == dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                                                           head_type="parallel"))


def test_old_model_overrides_win_over_their_flat_keys_as_before():
    # Before the sections, `model:` held ModelConfig overrides, which won over the flat fields; a
    # saved flat config of a run made with `--model head_type=causal` holds both.
    old = {**OLD_FLAT_SAVED, "model": {"head_type": "causal", "n_future": 3, "dim": 32}}
    spec = TrainConfig.from_dict(old).model
    assert (spec.head_type, spec.n_future, spec.overrides) == ("causal", 3, {"dim": 32})


def test_run_directory_of_the_flat_format_resumes_from_its_saved_config(corpus, tmp_path, capsys):
    # A run stopped at step 2 whose checkpoint holds a flat (pre-sections) train_config.json is
    # resumed with that file as --config; the new checkpoints are written in the nested format.
    run = tmp_path / "run"
    train(tiny_train_config(corpus, run, steps=4, save_every=2, eval_every=4, eval_batches=1, keep=3), stop_after=2)
    (ckpt,) = checkpoints(run)
    old = {**OLD_FLAT_SAVED, "data": str(corpus), "out": str(run)}
    (ckpt / "train_config.json").write_text(json.dumps(old, indent=2))
    write_manifest(ckpt)  # as an old run's manifest would list it
    yml = tmp_path / "old.yaml"
    yml.write_text(json.dumps({**old, "resume": True}))  # JSON is YAML
    capsys.readouterr()
    assert main(["train", "--config", str(yml)]) == 0
    assert "resuming at step 2" in capsys.readouterr().out
    last = resolve_checkpoint(run)
    assert last.name == "ckpt-00000004"
    load_model(last)  # verifies
    new = json.loads((last / "train_config.json").read_text())
    assert new["checkpointing"]["resume"] is True and new["optimizer"]["steps"] == 4
    assert TrainConfig.from_dict(new) == TrainConfig.from_dict({**old, "resume": True})


def test_sections_are_typed_and_checked_in_python():
    with pytest.raises(ConfigError, match=r"^optimizer must be OptimizerConfig\(\.\.\.\)"):
        TrainConfig(optimizer={"lr": 1.0})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^optimizer\.steps must be >= 1, got 0"):
        OptimizerConfig(steps=0)
    with pytest.raises(ConfigError, match="head_weights has 1 numbers but the model has 4 heads"):
        TrainConfig(optimizer=OptimizerConfig(head_weights=[1.0]))
    cfg = TrainConfig(checkpointing=CheckpointConfig(out="runs/y"))
    assert dataclasses.replace(cfg.checkpointing, resume=True).resume and cfg.optimizer.lr == 1e-3


def test_finetune_refuses_a_nested_init_from_in_its_config(tiny_run, tmp_path, capsys):
    yml = tmp_path / "c.yaml"
    yml.write_text("finetuning: {init_from: /some/other/run}\n")
    capsys.readouterr()
    rc = main(["finetune", str(tiny_run), "--config", str(yml), "--out", str(tmp_path / "ft")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "finetuning.init_from: /some/other/run" in err and "is for `mtp train`" in err


def test_head_type_applies_when_finetuning(corpus, tiny_run, tmp_path):
    # model.head_type (--head-type, or model: {head_type: ...}) rewires a parallel base's heads
    # as causal; left unset, the base's head type is kept.
    shutil.copytree(tiny_run, tmp_path / "base")
    for head_type, want in [("causal", "causal"), (None, "parallel")]:
        out = tmp_path / f"ft-{head_type}"
        train(tiny_train_config(corpus, out, steps=1, save_every=1, eval_every=0, eval_batches=1,
                                init_from=str(tmp_path / "base"), head_type=head_type, trainable="extra_heads"))
        assert load_model(out)[0].cfg.head_type == want
