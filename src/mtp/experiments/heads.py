"""Head types compared (issue 14, study (a)): parallel, causal and sequential heads trained from
scratch on the BPE code corpus, same trunk and head layer counts, seed, data and steps.

- parallel: every head reads the trunk's output z (the paper's layout);
- causal: head i reads head i-1's output;
- sequential (DeepSeek-V3's MTP module): head i reads head i-1's output and the embedding of the
  token x_{t+i-1} before its target, through a 2 dim -> dim projection (enorm, hnorm, eh_proj),
  so it has 2 dim^2 + 2 dim more parameters per extra head than the others (reported).

Beside them an n=1 model of the same layer count (next token only) is the reference for the
paper's "better": does head 1 of each multi-head model reach its next-token loss? For each model:
per-head validation loss and accuracy, teacher-forced agreement of each head with head 1, and
greedy self-speculative decoding (`mtp.decode_bench`) with chains of 1..n-1 drafts and the default
tree: tokens per forward,
acceptance per draft depth, wall-clock speedup over the same model's greedy, same output as greedy.
Same pipeline as `bytes` / `choose-n` (corpus, training and evaluation are theirs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from . import bytes as code
from . import common


@dataclass
class Settings(code.CodeSettings):
    tokenizer: str = "bpe"
    n_future: int = 4
    head_types: tuple[str, ...] = ("parallel", "causal", "sequential")
    baseline: bool = True  # also train n=1 (same layers): the next-token reference
    modes: tuple[str, ...] = ()  # decoding modes besides greedy; () = spec1..spec<n-1> and tree
    repeats: int = 3  # decoding timings: best of this many (modes interleaved)


def settings(scale: str) -> Settings:
    if scale == "quick":
        return Settings(**code.QUICK, repeats=1)
    # Default: the bytes/choose-n model and budget (dim 128, 10 layers, 600 steps x 16 x 256 BPE
    # tokens), four models (n=1 and three n=4 head types). Estimate from choose-n's measured step
    # times (docs/results.md, one torch thread beside another job): n=1 932 s, n=4 1410 s per 600
    # steps, so 932 + 3 x 1410 = 5200 s = 87 min on one busy core, about an hour on 2 free cores
    # (as bytes' 84 busy-core minutes are), plus 1-2 minutes of decoding benchmarks. Timed here
    # (5 steps each, one thread, load average 3.5): n=1 1.1 s/step, n=4 parallel 2.3, causal 1.7,
    # sequential 1.5, i.e. 66 busy-core minutes: sequential heads cost no more than the others.
    # Medium: the same models, half the steps (about 30 minutes on 2 free cores).
    return Settings(steps=300, warmup=50) if scale == "medium" else Settings()


def model_modes(st: Settings) -> list[str]:
    """The decoding modes run besides greedy: st.modes, or a chain for every k and the tree."""
    return list(st.modes) or [f"spec{k}" for k in range(1, st.n_future)] + ["tree"]


def decoding(model: Any, prompts: list[list[int]], st: Settings) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """decode_benchmark rows (greedy first) for the modes `model` can decode, and for the others
    why not (the mode check's GenerationError, e.g. a tree deeper than the model's heads)."""
    from ..decode_bench import decode_benchmark
    from ..generate import GenerationError
    from ..modes import parse_mode

    modes, skipped = [], {}
    for name in (model_modes(st) if model.cfg.n_future > 1 else []):
        mode = parse_mode(name)
        try:
            mode.check(model)
        except GenerationError as e:
            skipped[name] = str(e)
            continue
        modes.append(mode)
    rows = decode_benchmark(model, prompts, st.max_new_tokens, modes, batch_size=1, repeats=st.repeats)
    keep = ("mode", "tokens_per_s", "tokens_per_forward", "speedup", "acceptance", "matches_greedy", "fewer_steps",
            "step_cost")
    return [{k: r[k] for k in keep} for r in rows], skipped


def run(out_dir: Path, st: Settings, seeds: Sequence[int], scale: str = "default",
        command: str = "mtp experiment heads") -> dict[str, Any]:
    """Train the n=1 reference (if st.baseline) and every (head type, seed) of `st`, evaluate
    each and benchmark its decoding; `scale` only labels the results."""
    if not st.head_types:
        raise ValueError("head_types is empty: nothing to compare")
    t_start = time.perf_counter()
    data_dir, prompts = code.prepare_corpus(out_dir, st)
    plan = ([("n=1", "parallel", 1)] if st.baseline else []) + [(h, h, st.n_future) for h in st.head_types]
    runs: list[dict[str, Any]] = []
    results: dict[str, Any] = {}
    for label, head_type, n in plan:
        for seed in seeds:
            name = f"n1-s{seed}" if n == 1 else f"{head_type}-n{n}-s{seed}"
            model, trained = code.train_code_model(out_dir / "runs" / name, data_dir, st, n, seed, head_type)
            rows, skipped = decoding(model, prompts, st)
            runs.append({"heads": label, "head_type": head_type, "n": n, "seed": seed, **trained,
                         "decoding": rows, "skipped_modes": skipped})
            # Rewritten after every run, so a stopped experiment still leaves a table of what finished.
            results = write(out_dir, runs, st, seeds, scale, command, len(prompts), time.perf_counter() - t_start)
    return results


def _mean(values: Sequence[float | None]) -> float:
    return common.mean_std([v for v in values if v is not None])[0]


def _mean_lists(lists: Sequence[Sequence[float]]) -> list[float]:
    """Elementwise mean over seeds (NaN where no seed has a number)."""
    return [_mean([x[i] for x in lists if i < len(x)]) for i in range(max(map(len, lists), default=0))]


def _slash(values: Sequence[float], digits: int = 2) -> str:
    return "/".join("-" if v != v else f"{v:.{digits}f}" for v in values) or "-"


def summarize(runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per model (seeds averaged): the quality row, and one decoding row per mode."""
    summary, decode_rows = [], []
    base = [r for r in runs if r["n"] == 1]
    base_loss = _mean([r["val_loss"][0] for r in base]) if base else None
    base_rate = _mean([r["decoding"][0]["tokens_per_s"] for r in base]) if base else None
    for label in dict.fromkeys(r["heads"] for r in runs):
        mine = [r for r in runs if r["heads"] == label]
        row: dict[str, Any] = {"heads": label, "params": mine[0]["params"],
                               "non_embedding_params": mine[0]["non_embedding_params"]}
        row["loss1"], row["loss1_sd"] = common.mean_std([r["val_loss"][0] for r in mine])
        if base_loss is not None and mine[0]["n"] > 1:
            row["delta_loss1"] = row["loss1"] - base_loss
        row["acc1"] = _mean([r["head_acc"][0] for r in mine])
        row["head_loss"] = _mean_lists([r["val_loss"] for r in mine])
        row["head_acc"] = _mean_lists([r["head_acc"] for r in mine])
        row["agree"] = _mean_lists([r["agree"][1:] for r in mine if r.get("agree")])
        row["est_tpf"] = _mean([r["est_tokens_per_forward"] for r in mine])
        row["train_min"] = _mean([r["train_seconds"] for r in mine]) / 60
        for key in ("head_loss", "head_acc", "agree"):
            row[key + "_str"] = _slash(row[key], 3 if key == "head_loss" else 2)
        summary.append(row)
        for mode in dict.fromkeys(d["mode"] for r in mine for d in r["decoding"]):
            ds = [d for r in mine for d in r["decoding"] if d["mode"] == mode]
            rate = _mean([d["tokens_per_s"] for d in ds])
            decode_rows.append({
                "heads": label, "mode": mode, "tokens_per_forward": _mean([d["tokens_per_forward"] for d in ds]),
                "acceptance": _mean_lists([d["acceptance"] for d in ds]), "tokens_per_s": rate,
                "speedup": _mean([d["speedup"] for d in ds]),
                **({"vs_n1": rate / base_rate} if base_rate else {}),
                "same_as_greedy": "yes" if all(d["matches_greedy"] for d in ds) else "NO"})
            decode_rows[-1]["acceptance_str"] = _slash(decode_rows[-1]["acceptance"])
        for mode, why in mine[0]["skipped_modes"].items():
            decode_rows.append({"heads": label, "mode": mode, "acceptance_str": f"not run: {why}"})
    return summary, decode_rows


def write(out_dir: Path, runs: list[dict[str, Any]], st: Settings, seeds: Sequence[int], scale: str, command: str,
          n_prompts: int, seconds: float) -> dict[str, Any]:
    summary, decode_rows = summarize(runs)
    results = {"experiment": "heads", "scale": scale, "settings": st, "seeds": list(seeds), "runs": runs,
               "summary": summary, "decoding": decode_rows, "seconds": seconds}
    plot(summary, decode_rows, out_dir / "heads.png")
    n = st.n_future
    md = common.header("Head types: parallel vs causal vs sequential (issue 14)", command, st, seeds, seconds)
    md += (f"\nEach model has {st.model.get('n_layers')} layers; the n={n} models keep {n} of them as heads "
           f"(one block each), so parameters are matched except for the sequential heads' projections "
           f"(2 dim x dim + 2 norms per extra head). n=1 is the next-token-only reference of the same size. "
           f"Validation loss in nats per token; agreement: how often head i's argmax equals head 1's at the "
           f"position it predicts (teacher-forced, heads 2..{n}); teacher-forced tok/fwd: 1 + the run length of "
           f"correct drafts.\n\n")
    md += common.markdown_table(summary, [
        ("heads", "heads"), ("params", "params"), ("non_embedding_params", "non-embedding"),
        ("loss1", "head-1 val loss"), ("delta_loss1", "vs n=1"), ("acc1", "head-1 acc"),
        ("head_loss_str", "val loss per head"), ("head_acc_str", "acc per head"),
        ("agree_str", "agree with head 1 (h2..)"), ("est_tpf", "teacher-forced tok/fwd"),
        ("train_min", "train min")])
    md += (f"\n\nGreedy self-speculative decoding, batch 1, {st.max_new_tokens} new tokens from {n_prompts} "
           f"validation prompts of {st.prompt_len} tokens, best of {st.repeats} timing(s): tokens per forward, "
           f"acceptance per draft depth (P(draft j accepted | drafts before it accepted)), wall-clock speedup "
           f"over the same model's greedy and tokens/s relative to the n=1 model's greedy.\n\n")
    md += common.markdown_table(decode_rows, [
        ("heads", "heads"), ("mode", "mode"), ("tokens_per_forward", "tokens/forward"),
        ("acceptance_str", "acceptance h2/h3/.."), ("tokens_per_s", "tok/s"), ("speedup", "speedup vs own greedy"),
        ("vs_n1", "vs n=1 greedy"), ("same_as_greedy", "same as greedy")])
    md += "\n\n![heads](heads.png)\n"
    common.write_results(out_dir, results, md)
    return results


def plot(summary: list[dict[str, Any]], decode_rows: list[dict[str, Any]], path: Path) -> None:
    fig, (ax1, ax2, ax3) = common.new_figure(3, width=5.2)
    multi = [r for r in summary if len(r["head_loss"]) > 1]
    common.plot_lines(ax1, {r["heads"]: (list(range(1, len(r["head_loss"]) + 1)), r["head_loss"], None) for r in multi},
                      "head i (predicts token t+i)", "validation loss (nats)", "per-head loss by head type")
    ax1.set_xticks(range(1, max((len(r["head_loss"]) for r in summary), default=1) + 1))
    for r in summary:
        if len(r["head_loss"]) == 1:
            ax1.axhline(r["loss1"], ls="--", color="gray", label=f"{r['heads']} (next token only)")
            ax1.legend(fontsize=8)
    labels = [r["heads"] for r in multi]
    modes = list(dict.fromkeys(d["mode"] for d in decode_rows if d["mode"] != "greedy"))
    width = 0.8 / max(1, len(labels))
    for ax, key, ylabel in ((ax2, "tokens_per_forward", "tokens per forward"),
                            (ax3, "speedup", "speedup over own greedy (wall clock)")):
        for j, label in enumerate(labels):
            got = {d["mode"]: d.get(key) for d in decode_rows if d["heads"] == label}
            xs = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(modes))]
            ax.bar(xs, [got.get(m) or 0.0 for m in modes], width, label=label)
            for x, m in zip(xs, modes):
                if got.get(m) is None:  # not run (the mode check refused it)
                    ax.text(x, 0.02, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks(range(len(modes)), modes)
        ax.set_xlabel("decoding mode")
        ax.set_ylabel(ylabel)
        ax.set_title(ylabel.split(" (")[0] + " by head type")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    common.save_figure(fig, path)
