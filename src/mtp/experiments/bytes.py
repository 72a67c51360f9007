"""Byte-level models (paper 3.3) and choosing n (paper 3.4), on the built-in code corpus.

bytes: byte-level models with n in {1, 2, 4, 8} at equal parameters: next-byte validation loss,
per-head accuracy, and self-speculative decoding (bytes per forward, wall-clock speedup over
greedy) using every head, in particular all 8 heads of the n=8 model (paper Table S3: 7.04 bytes
per forward and 6.39x at 7B).

choose-n (`mtp.experiments.choose_n`) runs the same pipeline with a BPE tokenizer and
n in {1, 2, 4, 6, 8}.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from . import common


@dataclass
class CodeSettings:
    """What every experiment on the code corpus sets (`bytes`, `choose-n`, `heads`): corpus and
    tokenizer, model size, training, evaluation and the decoding benchmark."""

    tokenizer: str = "byte"  # byte | bpe
    vocab_size: int = 2048  # BPE only
    max_bytes: int = 1_000_000  # corpus size (the stdlib's Python source, capped)
    model: dict[str, Any] = field(default_factory=lambda: dict(dim=128, n_layers=10, n_heads=4))
    steps: int = 600
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 2e-3
    warmup: int = 100
    seeds: tuple[int, ...] = (0,)
    eval_batches: int = 20
    prompts: int = 8  # decoding benchmark: prompts cut from the validation split
    prompt_len: int = 64
    max_new_tokens: int = 128


@dataclass
class Settings(CodeSettings):
    n_values: tuple[int, ...] = (1, 2, 4, 8)


# The quick scale of the code experiments: seconds, checks the plumbing only.
QUICK = dict(max_bytes=150_000, vocab_size=512, model=dict(dim=32, n_layers=9, n_heads=2), steps=10, batch_size=4,
             seq_len=64, warmup=2, eval_batches=2, prompts=2, prompt_len=16, max_new_tokens=16)


def settings(scale: str, tokenizer: str = "byte") -> Settings:
    n_values = (1, 2, 4, 8) if tokenizer == "byte" else (1, 2, 4, 6, 8)
    if scale == "quick":
        return Settings(tokenizer=tokenizer, n_values=n_values, **QUICK)
    # Default and medium are one setting (the field defaults), sized from measured runs
    # (docs/results.md): 16-21 min per byte model and about 21 per BPE model on one busy core; on 2
    # free cores about an hour. Longer runs: --set steps=1500 --set max_bytes=3000000.
    return Settings(tokenizer=tokenizer, n_values=n_values)


def decode_prompts(data_dir: Path, count: int, length: int) -> list[list[int]]:
    """`count` prompts of `length` tokens taken at even strides through the validation split."""
    from ..data import TokenData

    val = TokenData(data_dir, "val")
    stride = max(length, (len(val) - length) // max(1, count))
    return [[int(t) for t in val.tokens[i * stride : i * stride + length]] for i in range(count)
            if i * stride + length <= len(val)]


def prepare_corpus(out_dir: Path, st: CodeSettings) -> tuple[Path, list[list[int]]]:
    """The code corpus prepared under out_dir/data (once; reused when there) with st's tokenizer,
    and the decoding benchmark's prompts cut from its validation split."""
    from ..data import prepare

    data_dir = out_dir / "data"
    if not (data_dir / "meta.json").exists():
        prepare(None, data_dir, tokenizer=st.tokenizer, vocab_size=st.vocab_size, max_bytes=st.max_bytes)
    return data_dir, decode_prompts(data_dir, st.prompts, st.prompt_len)


def train_code_model(run_dir: Path, data_dir: Path, st: CodeSettings, n_future: int, seed: int,
                     head_type: str = "parallel") -> tuple[Any, dict[str, Any]]:
    """Train (or read back, when finished) one model of st's size with `n_future` heads of
    `head_type` and evaluate it on the validation split. Returns the model and its row:
    parameter counts, per-head val_loss / head_acc, agree (teacher-forced agreement of each head
    with head 1, from training's final evaluation), est_tokens_per_forward, train_seconds."""
    from ..checkpoint import load_model
    from ..evaluate.metrics import evaluate_prepared
    from ..train import CheckpointConfig, DataConfig, ModelSpec, OptimizerConfig, RuntimeConfig, TrainConfig

    cfg = TrainConfig(
        model=ModelSpec(preset="1M", n_future=n_future, head_type=head_type, overrides=dict(st.model)),
        optimizer=OptimizerConfig(steps=st.steps, lr=st.lr, warmup=st.warmup),
        data=DataConfig(dir=str(data_dir), batch_size=st.batch_size, seq_len=st.seq_len, seed=seed),
        checkpointing=CheckpointConfig(out=str(run_dir), eval_every=0, eval_batches=st.eval_batches,
                                       log_every=max(1, st.steps // 20)),
        runtime=RuntimeConfig(dtype="fp32", chunk_size=None))
    res = common.train_run(cfg)
    model, _ = load_model(run_dir)
    metrics = evaluate_prepared(model, data_dir, batch_size=8, seq_len=st.seq_len, max_batches=st.eval_batches)
    return model, {"non_embedding_params": res["non_embedding_params"], "params": res["params"],
                   "val_loss": metrics["loss"], "head_acc": metrics["acc@1"], "agree": res["val"].get("agree"),
                   "est_tokens_per_forward": metrics["est_tokens_per_forward"], "train_seconds": res["seconds"]}


def run(out_dir: Path, st: Settings, seeds: Sequence[int], scale: str = "default",
        command: str = "mtp experiment bytes") -> dict[str, Any]:
    """Train every (n, seed) of `st` (byte or BPE, per st.tokenizer), evaluate and time decoding;
    `scale` only labels the results."""
    from ..decode_bench import decode_benchmark

    t_start = time.perf_counter()
    data_dir, prompts = prepare_corpus(out_dir, st)
    unit = "bytes" if st.tokenizer == "byte" else "tokens"
    if not st.n_values:
        raise ValueError("n_values is empty: nothing to train")
    runs: list[dict[str, Any]] = []
    results: dict[str, Any] = {}
    for n in st.n_values:
        for seed in seeds:
            model, trained = train_code_model(out_dir / "runs" / f"n{n}-s{seed}", data_dir, st, n, seed)
            row: dict[str, Any] = {"n": n, "seed": seed, **trained}
            if n > 1:  # self-speculative decoding with every extra head (k = n - 1 drafts)
                bench = decode_benchmark(model, prompts, st.max_new_tokens, [f"spec{n - 1}"], batch_size=1)
                spec = bench[-1]
                row.update(tokens_per_forward=spec["tokens_per_forward"], speedup=spec["speedup"],
                           acceptance=spec["acceptance"], matches_greedy=spec["matches_greedy"],
                           greedy_tokens_per_s=bench[0]["tokens_per_s"])
            else:
                row.update(tokens_per_forward=1.0, speedup=1.0)
            runs.append(row)
            # Rewritten after every run, so a stopped experiment still leaves a table of what finished.
            results = write(out_dir, runs, st, seeds, scale, command, unit, len(prompts), time.perf_counter() - t_start)
    return results


def write(out_dir: Path, runs: list[dict[str, Any]], st: Settings, seeds: Sequence[int], scale: str, command: str,
          unit: str, n_prompts: int, seconds: float) -> dict[str, Any]:
    summary = []
    for n in dict.fromkeys(r["n"] for r in runs):
        mine = [r for r in runs if r["n"] == n]
        row = {"n": n, "params": mine[0]["non_embedding_params"]}
        row["loss1"], row["loss1_sd"] = common.mean_std([r["val_loss"][0] for r in mine])
        row["acc1"], _ = common.mean_std([r["head_acc"][0] for r in mine])
        row["head_acc"] = "/".join(f"{common.mean_std([r['head_acc'][i] for r in mine])[0]:.2f}" for i in range(n))
        row["tpf"], _ = common.mean_std([r["tokens_per_forward"] for r in mine])
        row["speedup"], _ = common.mean_std([r["speedup"] for r in mine])
        summary.append(row)
    name = "bytes" if st.tokenizer == "byte" else "choose_n"
    title = ("Byte-level models (paper 3.3)" if st.tokenizer == "byte" else "Choosing n on BPE code (paper 3.4)")
    results = {"experiment": name, "scale": scale, "settings": st, "seeds": list(seeds), "runs": runs,
               "summary": summary, "seconds": seconds}
    plot(summary, unit, out_dir / f"{name}.png")
    md = common.header(title, command, st, seeds, results["seconds"])
    md += (f"\nNext-{unit[:-1]} validation loss (nats), per-head top-1 accuracy, and greedy self-speculative "
           f"decoding with all n-1 draft heads ({unit} per forward; wall-clock speedup over greedy, batch 1, "
           f"{st.max_new_tokens} new {unit} from {n_prompts} validation prompts).\n\n")
    md += common.markdown_table(summary, [("n", "n"), ("params", "non-embedding params"), ("loss1", "head-1 val loss"),
                                          ("acc1", "head-1 acc"), ("head_acc", "acc per head"),
                                          ("tpf", f"{unit}/forward"), ("speedup", "speedup")])
    md += f"\n\n![{name}]({name}.png)\n"
    common.write_results(out_dir, results, md)
    return results


def plot(summary: list[dict[str, Any]], unit: str, path: Path) -> None:
    fig, (ax1, ax2) = common.new_figure(2)
    ns = [r["n"] for r in summary]
    common.plot_lines(ax1, {"head 1 (next token)": (ns, [r["loss1"] for r in summary], [r["loss1_sd"] for r in summary])},
                      "n (heads)", "validation loss (nats)", f"next-{unit[:-1]} loss vs n")
    common.plot_lines(ax2, {f"{unit}/forward": (ns, [r["tpf"] for r in summary], None),
                            "speedup (wall clock)": (ns, [r["speedup"] for r in summary], None)},
                      "n (heads; k = n-1 drafts)", "x", "self-speculative decoding")
    common.save_figure(fig, path)
