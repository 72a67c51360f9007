"""The frozen base's outputs cached once (mtp.base_cache): training from the cache equals training
through the base; a changed base, data or setting rebuilds it; an interrupted build leaves nothing
that could be taken for a valid cache."""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from mtp import base_cache as bc
from mtp.cli import main
from mtp.data import TokenData, prepare
from mtp.fsutil import TMP_PREFIX, TargetError
from mtp.loss import base_kind, mtp_backward
from mtp.model import MTPModel
from mtp.train import set_trainable, train

from conftest import tiny_model, tiny_train_config

SEQ, EXTRA = 32, 3


def frozen_model(head_type: str = "parallel", seed: int = 0) -> MTPModel:
    model = tiny_model(seed, training=True, n_future=EXTRA, head_type=head_type, init_std=0.1)
    set_trainable(model, "extra_heads")
    return model


def build(path, model, data, *, dtype="fp32", topk=4, **kw):
    spec = bc.CacheSpec(kind=base_kind(model.cfg.head_type), topk=topk, dtype=dtype, autocast="fp32")
    return bc.ensure_cache(path, model, data, SEQ, EXTRA, spec, batch_size=16, chunk_size=100,
                           log=lambda msg: None, **kw)


def _grads(model):
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def step(model, tokens, base, targets):
    model.zero_grad()
    loss, heads = mtp_backward(model, tokens, [1.0, 0.6, 0.3], seq_len=SEQ, chunk_size=50, targets=targets,
                               distill_topk=4, base=base)
    return heads, _grads(model)


@pytest.mark.parametrize("head_type", ["parallel", "causal", "sequential"])
def test_training_from_the_cache_equals_running_the_base(corpus, tmp_path, head_type):
    model = frozen_model(head_type)
    data = TokenData(corpus, "train")
    cache32, built = build(tmp_path / "fp32", model, data)
    cache16, _ = build(tmp_path / "bf16", model, data, dtype="bf16")
    assert built and (tmp_path / "fp32" / bc.META).is_file()
    windows = data.batch_windows(3, 4, SEQ, EXTRA, seed=1)
    tokens = data.gather(windows, SEQ, EXTRA)
    for targets in ("data", "self", "distill"):
        ref_heads, ref = step(model, tokens, None, targets)
        heads, got = step(model, tokens, cache32.get(windows), targets)
        # Only heads 2..n train: the base's weights get no gradient either way.
        assert set(got) == set(ref) == {k for k, p in model.named_parameters() if p.requires_grad}
        assert all(k.startswith(("heads.1.", "heads.2.")) for k in got)
        torch.testing.assert_close(heads, ref_heads, rtol=1e-5, atol=1e-6)
        for k in ref:  # float32 storage: the same numbers, up to the base's batch composition
            torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6, msg=f"{targets} {k}")
        heads16, got16 = step(model, tokens, cache16.get(windows), targets)
        torch.testing.assert_close(heads16, ref_heads, rtol=0.02, atol=0.01)
        for k in ref:  # bf16 hidden states: rounding at the 3rd significant digit
            rel = (got16[k] - ref[k]).norm() / ref[k].norm().clamp(min=1e-12)
            assert rel < 0.05, (targets, k, float(rel))


def test_stale_cache_is_rebuilt_never_reused(corpus, tmp_path):
    model = frozen_model("sequential")
    data = TokenData(corpus, "train")
    path = tmp_path / "cache"
    first, built = build(path, model, data)
    assert built
    assert build(path, model, data)[1] is False  # same base and data: reused
    with torch.no_grad():
        model.heads[1].eh_proj.weight.add_(1.0)  # a trained head: not part of the base
    assert build(path, model, data)[1] is False
    with torch.no_grad():
        model.trunk_layers[0].attention.wq.weight[0, 0] += 1e-3  # the base changed
    second, built = build(path, model, data)
    assert built and second.meta["fingerprint"] != first.meta["fingerprint"]
    with torch.no_grad():  # the rebuilt cache holds the changed base's head-1 output
        ref = model.hidden(data.gather(np.array([5]), SEQ, EXTRA)[:, :SEQ], heads=1)[:, :, 0]
    torch.testing.assert_close(second.get([5]).hidden, ref, rtol=1e-5, atol=1e-6)
    assert build(path, model, data, topk=8)[1] is True  # other settings: rebuilt
    # Other data (the same tokenizer, other text): rebuilt.
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text((Path(sysconfig.get_paths()["stdlib"]) / "bisect.py").read_text() * 3)
    prepare(src, tmp_path / "other", tokenizer="byte", val_fraction=0.2)
    assert build(path, model, TokenData(tmp_path / "other", "train"))[1] is True
    # A truncated file (e.g. copied in part): rebuilt.
    with open(path / "nll.bin", "r+b") as f:
        f.truncate(8)
    assert bc.BaseCache.open(path) is None
    assert build(path, model, TokenData(tmp_path / "other", "train"))[1] is True
    # A directory holding something else is refused.
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(TargetError):
        build(tmp_path / "busy", model, data)


def test_interrupted_build_leaves_nothing_half_valid(corpus, tmp_path, monkeypatch):
    model = frozen_model()
    data = TokenData(corpus, "train")
    path = tmp_path / "cache"
    real, calls = bc.head1_outputs, []

    def dying(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # a kill in the middle of the build
        return real(*a, **kw)

    monkeypatch.setattr(bc, "head1_outputs", dying)
    with pytest.raises(KeyboardInterrupt):
        build(path, model, data)
    assert not path.exists() and not any(p.name.startswith(TMP_PREFIX) for p in tmp_path.iterdir())
    monkeypatch.setattr(bc, "head1_outputs", real)
    old, _ = build(path, model, data)
    with torch.no_grad():
        model.norm.weight.mul_(1.5)
    calls.clear()
    monkeypatch.setattr(bc, "head1_outputs", dying)
    with pytest.raises(KeyboardInterrupt):
        build(path, model, data)  # a rebuild for the changed base dies half-way
    # The old cache is still whole, but it is the old base's: never taken for the new one.
    assert json.loads((path / bc.META).read_text())["fingerprint"] == old.meta["fingerprint"]
    monkeypatch.setattr(bc, "head1_outputs", real)
    new, built = build(path, model, data)
    assert built and new.meta["fingerprint"] != old.meta["fingerprint"]


@pytest.mark.parametrize("head_type", ["parallel", "sequential"])
def test_finetune_from_the_cache_follows_the_uncached_run(corpus, tmp_path, tiny_run, monkeypatch, head_type):
    # A base with 2 parallel heads, finetuned with 3 heads (sequential ones: built from its blocks).
    trunk_calls = []
    real_trunk = MTPModel.trunk
    monkeypatch.setattr(MTPModel, "trunk", lambda self, *a, **kw: trunk_calls.append(1) or real_trunk(self, *a, **kw))
    fields = dict(init_from=str(tiny_run), n_future=3, trainable="extra_heads", targets="distill", distill_topk=8,
                  steps=5, eval_every=0, save_every=5, model={"head_type": head_type})
    plain = train(tiny_train_config(corpus, tmp_path / "plain", **fields))
    at_train_logs: list[int] = []
    cached = train(tiny_train_config(corpus, tmp_path / "cached", base_cache="auto", base_cache_dtype="fp32",
                                     **fields),
                   on_log=lambda rec: at_train_logs.append(len(trunk_calls)) if rec["kind"] == "train" else None)
    losses = lambda res: [r["head_loss"] for r in res["records"] if r["kind"] == "train"]
    torch.testing.assert_close(torch.tensor(losses(cached)), torch.tensor(losses(plain)), rtol=1e-4, atol=1e-5)
    assert at_train_logs[0] == at_train_logs[-1]  # no trunk ran during the training steps
    meta = json.loads((tmp_path / "cached" / "base-cache" / bc.META).read_text())
    assert meta["kind"] == ("z" if head_type == "parallel" else "h1") and meta["topk"] == 8
    # The CLI: finetune reuses an existing cache (given by path) and says nothing about building it.
    shutil.copytree(tmp_path / "cached" / "base-cache", tmp_path / "shared-cache")
    argv = ["finetune", str(tiny_run), "--data", str(corpus), "--out", str(tmp_path / "cli"), "--n-future", "3",
            "--targets", "distill", "--distill-topk", "8", "--base-cache", str(tmp_path / "shared-cache"),
            "--base-cache-dtype", "fp32", "--steps", "2", "--batch-size", "4", "--seq-len", "32", "--dtype", "fp32",
            "--chunk-size", "50", "--eval-batches", "1", "--no-progress", "--model", f"head_type={head_type}"]
    before = (tmp_path / "shared-cache" / "hidden.bin").stat().st_mtime_ns
    assert main(argv) == 0
    assert (tmp_path / "shared-cache" / "hidden.bin").stat().st_mtime_ns == before


def test_base_cache_needs_frozen_base_heads(corpus, tmp_path):
    with pytest.raises(ValueError, match="trainable=extra_heads"):
        tiny_train_config(corpus, tmp_path / "x", trainable="heads", base_cache="auto")
    assert tiny_train_config(corpus, tmp_path / "x", base_cache="none").finetuning.base_cache is None
