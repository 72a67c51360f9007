"""The frozen base's outputs for the training text, computed once and memory-mapped.

Heads-only finetuning (trainable=extra_heads) trains heads 2..n on a base whose embedding,
trunk, head 1, norm and unembedding never change. Their outputs for every training window are
therefore the same at every epoch, so they are computed once (`ensure_cache`) and read back by
window index (`BaseCache.get`); an epoch then costs only the trained heads. Per window of
seq_len input tokens the cache holds:

    hidden.bin   (windows, T, dim)  what heads 2..n read: the trunk output z (parallel and linear
                                    heads) or head 1's output (causal and sequential heads, which
                                    also read token embeddings: those come from the tokens)
    nll.bin      (windows, T)       float32, head 1's negative log-likelihood of the next token
    topk_ids.bin (windows, T, k)    int32, head 1's k likeliest next tokens (targets self/distill)
    topk_probs.bin (windows, T, k)  their probabilities (not renormalised), fp16 (fp32 with a
                                    float32 cache)
    cache.json   shapes, dtypes and the fingerprint

`hidden.bin` is bf16 by default (raw 16-bit words; numpy has no bf16), or float32 for exactness.
Windows are those of `TokenData` (inputs tokens[w*T : (w+1)*T], never overlapping), and the trunk
is causal, so a window's outputs depend on its own tokens only.

The fingerprint covers the frozen weights (bytes), the model config fields that shape them, the
training split's bytes, seq_len, the window count, what is stored and how it was computed. A
cache whose fingerprint or file sizes do not match is rebuilt, never reused. The cache is built
in a temporary directory beside its target and swapped in whole (`fsutil.atomic_dir`), so an
interrupted build leaves the previous state (no cache, or the old one, which is then stale).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .checkpoint import file_digest
from .data import TokenData
from .fsutil import TMP_PREFIX, TargetError, atomic_dir
from .loss import BaseOutputs, align_targets, base_kind, head1_outputs
from .model import MTPModel

FORMAT = "mtp-base-cache"
VERSION = 1
META = "cache.json"
DTYPES = {"bf16": (torch.bfloat16, np.uint16), "fp32": (torch.float32, np.float32)}
# Config fields that do not change what the frozen part computes (the heads trained, their draft
# vocabulary, and the layer count, which moves with n_future; n_trunk is fingerprinted instead).
_HEAD_FIELDS = ("n_future", "head_type", "n_layers", "draft_vocab")


def frozen_modules(model: MTPModel) -> dict[str, torch.nn.Module]:
    """What the cache stands in for: embedding, trunk, head 1, shared norm and unembedding."""
    return {"tok_embeddings": model.tok_embeddings, "trunk_layers": model.trunk_layers,
            "heads.0": model.heads[0], "norm": model.norm, "output": model.output}


def fingerprint(model: MTPModel, data: TokenData, seq_len: int, n_windows: int, settings: dict[str, Any]) -> str:
    """SHA-256 over everything the cached values depend on (see the module docstring)."""
    h = hashlib.sha256()
    cfg = {k: v for k, v in model.cfg.to_dict().items() if k not in _HEAD_FIELDS}
    head = {"format": FORMAT, "version": VERSION, "config": cfg, "n_trunk": model.cfg.n_trunk,
            "seq_len": seq_len, "n_windows": n_windows, "settings": settings,
            "data": {"tokens": len(data.tokens), "dtype": data.dtype.name}}
    h.update(json.dumps(head, sort_keys=True).encode())
    for prefix, module in frozen_modules(model).items():
        for name, t in sorted(module.state_dict().items()):
            t = t.detach().contiguous().cpu()
            h.update(f"{prefix}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    bin_path = data.directory / f"{data.split}.bin"
    h.update(file_digest(bin_path).encode() if bin_path.exists() else b"empty")
    return h.hexdigest()


@dataclass
class CacheSpec:
    """What a cache holds and how it is computed; part of the fingerprint."""

    kind: str  # "z" or "h1" (see loss.BaseOutputs)
    topk: int  # head 1's likeliest tokens kept per position (0: none, targets=data)
    dtype: str = "bf16"  # hidden.bin: bf16 | fp32
    autocast: str = "bf16"  # the autocast dtype the base ran under: bf16 | fp32

    def settings(self) -> dict[str, Any]:
        return {"kind": self.kind, "topk": self.topk, "dtype": self.dtype, "autocast": self.autocast}


def _files(meta: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    W, T, d, k = meta["n_windows"], meta["seq_len"], meta["dim"], meta["topk"]
    files = {"hidden.bin": ((W, T, d), np.dtype(DTYPES[meta["dtype"]][1])), "nll.bin": ((W, T), np.dtype(np.float32))}
    if k:
        probs = np.float32 if meta["dtype"] == "fp32" else np.float16
        files["topk_ids.bin"] = ((W, T, k), np.dtype(np.int32))
        files["topk_probs.bin"] = ((W, T, k), np.dtype(probs))
    return files


class BaseCache:
    """A built cache, memory-mapped read-only; `get(windows)` gives a batch's `BaseOutputs`."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path, self.meta = path, meta
        self.arrays = {name: np.memmap(path / name, dtype=dt, mode="r", shape=shape)
                       for name, (shape, dt) in _files(meta).items()}

    @classmethod
    def open(cls, path: str | Path, expect: str | None = None) -> "BaseCache | None":
        """The cache at `path` if it is complete (its files have the sizes cache.json says) and,
        when `expect` is given, has that fingerprint; else None."""
        path = Path(path)
        try:
            meta = json.loads((path / META).read_text())
            if meta.get("format") != FORMAT or meta.get("version") != VERSION:
                return None
            if expect is not None and meta.get("fingerprint") != expect:
                return None
            for name, (shape, dt) in _files(meta).items():
                if (path / name).stat().st_size != int(np.prod(shape)) * dt.itemsize:
                    return None
            return cls(path, meta)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def get(self, windows: np.ndarray, device: torch.device | str = "cpu",
            dtype: torch.dtype = torch.float32) -> BaseOutputs:
        """The base's outputs for these windows (indices from `TokenData.batch_windows`);
        `hidden` in `dtype` (the trained heads' parameter dtype)."""
        windows = np.asarray(windows, dtype=np.int64)
        hidden = torch.from_numpy(np.ascontiguousarray(self.arrays["hidden.bin"][windows]))
        if self.meta["dtype"] == "bf16":
            hidden = hidden.view(torch.bfloat16)
        out = BaseOutputs(kind=self.meta["kind"], hidden=hidden.to(device=device, dtype=dtype),
                          nll=torch.from_numpy(np.ascontiguousarray(self.arrays["nll.bin"][windows])).to(device))
        if self.meta["topk"]:
            out.topk_ids = torch.from_numpy(self.arrays["topk_ids.bin"][windows].astype(np.int64)).to(device)
            out.topk_probs = torch.from_numpy(
                self.arrays["topk_probs.bin"][windows].astype(np.float32)).to(device)
        return out


def ensure_cache(path: str | Path, model: MTPModel, data: TokenData, seq_len: int, extra: int, spec: CacheSpec,
                 *, batch_size: int = 8, chunk_size: int | None = 2048, device: torch.device | str = "cpu",
                 progress: bool = False, log: Any = None) -> tuple[BaseCache, bool]:
    """The cache of `model`'s frozen outputs on `data` at `path`: reused when its fingerprint
    matches, else built (replacing a stale one). Returns (cache, built). `extra`: the tokens past
    each window (n_future), which set the window count as in training. `log(msg)` reports."""
    path = Path(path)
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if spec.kind != base_kind(model.cfg.head_type):
        raise ValueError(f"{model.cfg.head_type} heads read {base_kind(model.cfg.head_type)!r}, not {spec.kind!r}")
    n_windows = data._require_windows(seq_len, extra)
    fp = fingerprint(model, data, seq_len, n_windows, spec.settings())
    found = BaseCache.open(path, fp)
    if found is not None:
        return found, False
    if path.exists() and any(p for p in path.iterdir() if not p.name.startswith(TMP_PREFIX)):
        if not (path / META).exists():
            raise TargetError(f"base cache {path} holds other files (no {META}); choose another base_cache")
        say(f"base cache {path} is stale or incomplete (the base, the data or the settings changed): rebuilding")
    meta = {"format": FORMAT, "version": VERSION, "fingerprint": fp, "n_windows": n_windows, "seq_len": seq_len,
            "dim": model.cfg.dim, "data": str(data.directory), "split": data.split, **spec.settings()}
    start = time.perf_counter()
    with atomic_dir(path, replace=True) as tmp:
        _build(tmp, meta, model, data, extra, spec, batch_size, chunk_size, torch.device(device), progress)
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
    cache = BaseCache.open(path, fp)
    if cache is None:  # cannot happen unless the files changed under us
        raise OSError(f"base cache {path} did not read back after building it")
    size = sum((path / n).stat().st_size for n in _files(meta)) / 2**20
    say(f"base cache {path}: {n_windows} windows x {seq_len} tokens, {size:,.0f} MiB, "
        f"built in {time.perf_counter() - start:.0f}s")
    return cache, True


@torch.no_grad()
def _build(tmp: Path, meta: dict[str, Any], model: MTPModel, data: TokenData, extra: int, spec: CacheSpec,
           batch_size: int, chunk_size: int | None, device: torch.device, progress: bool) -> None:
    arrays = {name: np.memmap(tmp / name, dtype=dt, mode="w+", shape=shape)
              for name, (shape, dt) in _files(meta).items()}
    W, T = meta["n_windows"], meta["seq_len"]
    store = DTYPES[spec.dtype][0]
    was_training = model.training
    model.eval()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=W * T, desc="base cache", unit="tok", unit_scale=True, dynamic_ncols=True)
    amp = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if spec.autocast == "bf16"
           else torch.autocast(device_type=device.type, enabled=False))
    try:
        for start in range(0, W, batch_size):
            windows = np.arange(start, min(W, start + batch_size), dtype=np.int64)
            tokens = data.gather(windows, T, extra).to(device)
            inputs = tokens[:, :T]
            with amp:
                rope = model.rope(model.default_positions(inputs))
                z = model.trunk(inputs, rope)
                h1 = model.run_head(0, z, rope)
                ids, probs, nll = head1_outputs(model, h1, max(1, spec.topk), chunk_size,
                                                next_tokens=align_targets(tokens, 1, T)[..., 0])
            hidden = (z if spec.kind == "z" else h1).to(store).cpu()
            sl = slice(start, start + len(windows))
            arrays["hidden.bin"][sl] = (hidden.view(torch.int16).numpy().view(np.uint16) if spec.dtype == "bf16"
                                        else hidden.numpy())
            arrays["nll.bin"][sl] = nll.float().cpu().numpy()
            if spec.topk:
                arrays["topk_ids.bin"][sl] = ids.to(torch.int32).cpu().numpy()
                arrays["topk_probs.bin"][sl] = probs.float().cpu().numpy().astype(arrays["topk_probs.bin"].dtype)
            if bar is not None:
                bar.update(len(windows) * T)
        for arr in arrays.values():
            arr.flush()
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
        del arrays
