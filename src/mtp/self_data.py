"""Training text the base model writes itself: its greedy continuations of corpus prompts.

Draft heads are judged by how often head 1 accepts their drafts, and at decoding time head 1 reads
its own output, not corpus text. `write_self_data` samples prompts from a prepared corpus's train
split, continues them with the base's greedy decoding (batched, `mtp.generate`), and writes a
prepared dataset (the `mtp prepare` format, so `train`/`finetune --data` read it) whose train
split is prompt + continuation + end-of-text for every prompt, optionally followed by the
corpus's own train text; the val split is the corpus's (validation stays on corpus text).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .data import META_FORMAT, META_VERSION, DataError, TokenData
from .fsutil import DATASET, atomic_dir, check_target
from .generate import generate
from .model import MTPModel


def corpus_prompts(data: TokenData, count: int, length: int, seed: int = 0) -> list[list[int]]:
    """`count` prompts of at most `length` tokens from seeded random places in `data`; a prompt
    that crosses a document boundary keeps only what follows the last end-of-text in it (the
    end-of-text itself when nothing follows), so every prompt lies inside one document."""
    if count < 1 or length < 1:
        raise DataError(f"need at least one prompt of at least one token, got {count} of {length}")
    n = len(data.tokens)
    if n == 0:
        raise DataError(f"the {data.split} split of {data.directory} is empty")
    length = min(length, n)
    starts = np.random.Generator(np.random.PCG64([seed, 14])).integers(0, n - length + 1, size=count)
    prompts = []
    for s in starts.tolist():
        p = data.tokens[s : s + length].astype(np.int64).tolist()
        ends = [i for i, t in enumerate(p) if t == data.eos_id]
        if ends:
            p = p[ends[-1] + 1 :] or [data.eos_id]
        prompts.append(p)
    return prompts


def continuations(model: MTPModel, prompts: Sequence[Sequence[int]], new_tokens: int, eos_id: int,
                  batch_size: int, progress: bool = False) -> list[list[int]]:
    """The model's greedy continuations (at most `new_tokens`, ending at its first end-of-text),
    decoded with the KV cache, `batch_size` rows at a time (continuous batching)."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts) * new_tokens, desc="self-data", unit="tok", dynamic_ncols=True)
    on_tokens = None if bar is None else (lambda new: bar.update(sum(map(len, new))))
    try:
        res = generate(model, [list(p) for p in prompts], new_tokens, stop_tokens=(eos_id,), on_tokens=on_tokens,
                       batch_size=batch_size)
    finally:
        if bar is not None:
            bar.close()
        model.clear_cache()
    return res.tokens


def write_self_data(model: MTPModel, data_dir: str | Path, out_dir: str | Path, *, prompts: int = 256,
                    prompt_len: int = 64, new_tokens: int = 128, batch_size: int = 16, seed: int = 0,
                    keep_corpus: bool = False, base: str = "", progress: bool = False,
                    force: bool = False) -> dict[str, Any]:
    """Write the dataset described in the module docstring to `out_dir`; returns its meta.json.
    Built beside `out_dir` and moved in when complete (an existing dataset there is replaced; a
    directory holding anything else is refused unless `force`)."""
    if new_tokens < 1:
        raise DataError(f"new_tokens must be >= 1, got {new_tokens}")
    src = Path(data_dir).expanduser()
    train = TokenData(src, "train")
    if train.vocab_size > model.cfg.vocab_size:
        raise DataError(f"{src} was tokenized with {train.vocab_size} tokens but the model has "
                        f"vocab_size={model.cfg.vocab_size}: wrong tokenizer")
    out = Path(out_dir).expanduser()
    if out.resolve() == src.resolve():
        raise DataError(f"--out {out} is the corpus itself; choose another directory")
    check_target(out, (DATASET,), force)
    asked = corpus_prompts(train, prompts, prompt_len, seed)
    model.eval()
    with torch.no_grad():
        outs = continuations(model, asked, new_tokens, train.eos_id, batch_size, progress)
    samples = [p + o + ([] if o and o[-1] == train.eos_id else [train.eos_id]) for p, o in zip(asked, outs)]
    flat = np.array([t for s in samples for t in s], dtype=train.dtype)
    generated = sum(map(len, outs))
    with atomic_dir(out, commit_file="meta.json") as tmp:
        with open(tmp / "train.bin", "wb") as f:
            f.write(flat.tobytes())
            if keep_corpus:
                f.write(np.asarray(train.tokens).tobytes())
        shutil.copyfile(src / "val.bin", tmp / "val.bin")
        shutil.copyfile(src / "tokenizer.json", tmp / "tokenizer.json")
        meta = dict(train.meta)
        meta.update({
            "format": META_FORMAT, "version": META_VERSION,
            "n_train_tokens": len(flat) + (len(train.tokens) if keep_corpus else 0),
            "source": f"self-data:{src}",
            "self_data": {"base": base, "corpus": str(src.resolve()), "prompts": prompts, "prompt_len": prompt_len,
                          "new_tokens": new_tokens, "seed": seed, "generated_tokens": generated,
                          "sample_tokens": len(flat), "keep_corpus": keep_corpus,
                          "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")},
        })
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
