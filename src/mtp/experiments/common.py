"""Shared pieces of the experiments: settings by scale, word-level data sets, training with
evaluations along the way (through `mtp.train.train`, resumable), and writing results.

Every experiment writes into its out dir: results.json (settings, seeds, every number),
results.md (markdown tables) and PNG plots; the runs (checkpoints, metrics.jsonl) live under runs/.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..data import EOS_TOKEN, PAD_TOKEN, Tokenizer, prepare
from ..model import MTPModel

SCALES = ("quick", "medium", "default")


def check_scale(scale: str) -> str:
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    return scale


def override(settings: Any, overrides: Mapping[str, Any] | None) -> Any:
    """The settings dataclass with fields replaced; lists become tuples where the field is one."""
    if not overrides:
        return settings
    fields = {f.name for f in dataclasses.fields(settings)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown experiment setting(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    values = {k: tuple(v) if isinstance(getattr(settings, k), tuple) and isinstance(v, list) else v
              for k, v in overrides.items()}
    return dataclasses.replace(settings, **values)


# ----- data ---------------------------------------------------------------------------------------
def word_tokenizer(words: Sequence[str]) -> Tokenizer:
    """A word-level tokenizer (split on whitespace, one id per word) for synthetic tasks, so that
    every word of the task is exactly one token. Ids: <|endoftext|> 0, <|pad|> 1, then `words`."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {EOS_TOKEN: 0, PAD_TOKEN: 1}
    for w in words:
        if w in vocab or not w or any(c.isspace() for c in w):
            raise ValueError(f"bad or repeated word {w!r}")
        vocab[w] = len(vocab)
    hf = HFTokenizer(models.WordLevel(vocab=vocab, unk_token=PAD_TOKEN))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # spaces between words; "##x" glues on
    return Tokenizer(hf, kind="bpe")


def prepare_documents(docs: Iterable[str], out_dir: Path, tokenizer: Tokenizer, val_fraction: float = 0.02) -> dict[str, Any]:
    """Write documents (one per line, each ended by <|endoftext|>) to a text file and run
    `mtp.data.prepare` on it, as a user would; the last `val_fraction` of lines becomes val."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / "meta.json").exists():  # already prepared by an earlier (interrupted) run
        return json.loads((out_dir / "meta.json").read_text())
    src = out_dir.parent / f"{out_dir.name}.txt"
    with open(src, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(d + f" {EOS_TOKEN}\n")
    meta = prepare(src, out_dir, tokenizer=tokenizer, val_fraction=val_fraction)
    src.unlink()
    return meta


def pad_batch(seqs: Sequence[Sequence[int]], pad: int = 0) -> torch.Tensor:
    """Right-padded LongTensor (B, max_len); causal attention keeps padding from mattering."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
    return out


# ----- training -----------------------------------------------------------------------------------
def train_run(cfg: Any, eval_steps: Sequence[int] = (), evaluate: Callable[[MTPModel], dict[str, Any]] | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train `cfg` (a TrainConfig) with `mtp.train.train`, stopping at each of `eval_steps` to run
    `evaluate` on the checkpoint. Resumable: a run directory that already holds the final
    checkpoint and its evaluations is read back instead of retrained.

    Returns {"history": [{"step", **evaluate(...)}], "val": final per-head val metrics (loss, acc,
    agree: how often head i's argmax equals head 1's at the position it predicts),
    "records": metrics.jsonl records, "seconds": training time, "non_embedding_params"}."""
    from ..checkpoint import latest_checkpoint, load_model, load_trainer_state
    from ..train import train

    out = Path(cfg.checkpointing.out)
    cache = out / "experiment_evals.json"
    saved: dict[str, Any] = json.loads(cache.read_text()) if cache.exists() else {"history": [], "seconds": 0.0}
    stops = sorted({s for s in eval_steps if 0 < s < cfg.optimizer.steps} | {cfg.optimizer.steps})
    every = math.gcd(*stops)
    cfg = dataclasses.replace(cfg, checkpointing=dataclasses.replace(cfg.checkpointing, resume=True, save_every=every,
                                                                     keep=1, progress=False))
    ckpt = latest_checkpoint(out)
    done = int(load_trainer_state(ckpt)["step"]) if ckpt is not None else 0
    evaluated = {h["step"] for h in saved["history"]}
    result: dict[str, Any] = {}
    for stop in stops:
        if stop > done:
            t0 = time.perf_counter()
            result = train(cfg, stop_after=stop - done)
            saved["seconds"] += time.perf_counter() - t0
            done = stop
        if evaluate is not None and stop not in evaluated and stop <= done:
            model, _ = load_model(out)
            rec = {"step": stop, **evaluate(model)}
            saved["history"].append(rec)
            log(f"  {out.name} step {stop}: " + ", ".join(f"{k} {_short(v)}" for k, v in rec.items() if k != "step"))
        saved["history"].sort(key=lambda h: h["step"])
        cache.write_text(json.dumps(saved, indent=1))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    vals = [r for r in records if r.get("kind") == "val"]
    model, _ = load_model(out)
    return {
        "history": saved["history"],
        "val": {"loss": vals[-1]["head_loss"], "acc": vals[-1]["head_acc"], "agree": vals[-1].get("head_agree")}
        if vals else result.get("val"),
        "records": records,
        "seconds": saved["seconds"],
        "non_embedding_params": model.num_params(non_embedding=True),
        "params": model.num_params(),
    }


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list) and v and isinstance(v[0], float):
        return "[" + ", ".join(f"{x:.3g}" for x in v[:10]) + "]"
    return str(v)[:80]


def set_threads(threads: int | None) -> None:
    """torch intra-op threads for this process (None leaves torch's default)."""
    if threads:
        torch.set_num_threads(threads)


# ----- results ------------------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, sd


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """rows of dicts -> a markdown table; columns are (key, header). Floats get 4 significant digits."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(k, "")) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(out_dir: Path, results: dict[str, Any], markdown: str) -> None:
    """results.json (everything, machine-readable) and results.md (for people)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=_json_default) + "\n")
    os.replace(tmp, out_dir / "results.json")
    (out_dir / "results.md").write_text(markdown.rstrip() + "\n")


def _json_default(o: Any) -> Any:
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"cannot serialise {type(o).__name__}")


def new_figure(ncols: int = 1, width: float = 6.0, height: float = 4.2):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lines(ax: Any, series: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float] | None]],
               xlabel: str, ylabel: str, title: str, logx: bool = False) -> None:
    """One line per label: (x, mean, std or None); std draws error bars."""
    for label, (xs, ys, err) in series.items():
        if err is not None and any(e > 0 for e in err):
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
        else:
            ax.plot(xs, ys, marker="o", label=label)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def header(title: str, command: str, settings: Any, seeds: Sequence[int], seconds: float) -> str:
    s = dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else dict(settings)
    lines = [f"# {title}", "", f"Command: `{command}`", "", f"Seeds: {list(seeds)}; wall time {seconds / 60:.1f} min.", "",
             "Settings: " + ", ".join(f"{k}={v}" for k, v in s.items()), ""]
    return "\n".join(lines)
