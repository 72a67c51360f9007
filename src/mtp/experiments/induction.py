"""Induction (paper 4.1): does 2-token prediction help small models learn induction?

Procedurally generated simple children's stories whose characters have random two-token names:
a first syllable ("Ko") and a second syllable ("##rin"), each a single token of a word-level
vocabulary, so every name is exactly two tokens. Names are drawn afresh for every story and the
characters of one story never share a first syllable. The second token of a name can only be
predicted by copying it from an earlier mention: the metric is head-1 (next-token) accuracy on
the second token of names that already occurred earlier in the story (chance: 1/#second syllables).

n=1 vs n=2 at equal parameters (n=2 moves one trunk block into the second head), across model
sizes, over seeds; accuracy is also tracked along training.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from . import common

FIRST = ["Ba", "Be", "Bo", "Da", "Di", "Do", "Fa", "Fe", "Ka", "Ki", "Ko", "La", "Li", "Lo", "Ma", "Mi",
         "Mo", "Na", "Ni", "No", "Pa", "Pi", "Po", "Ra", "Ri", "Ro", "Sa", "Si", "So", "Ta", "Ti", "To"]
SECOND = ["##bar", "##ben", "##dil", "##dor", "##fen", "##gan", "##kel", "##kin", "##lan", "##lix", "##mar",
          "##mun", "##nak", "##nel", "##pin", "##pol", "##rak", "##rin", "##sam", "##sel", "##tak", "##tim",
          "##val", "##vin", "##wen", "##wok", "##zar", "##zel", "##bo", "##da", "##ki", "##lu"]
KINDS = ["girl", "boy", "cat", "dog", "bird", "bear", "rabbit", "fox", "frog", "duck"]
ADJS = ["little", "happy", "small", "big", "kind", "shy", "brave", "funny", "quiet", "curious"]
PLACES = ["house", "park", "forest", "garden", "town", "school", "farm", "beach", "village", "hill"]
OBJS = ["ball", "kite", "box", "toy", "book", "hat", "drum", "boat", "cup", "stick"]
FOODS = ["apple", "cake", "cookie", "pear", "banana", "sandwich", "carrot", "pie"]
FEELS = ["happy", "sad", "tired", "glad", "proud", "sleepy", "excited", "scared"]
ANIMALS = ["tree", "flower", "rock", "cloud", "bug", "snail", "butterfly", "puddle"]

# Sentences after the introduction; A, B (and C) are characters, the rest word lists.
BODY = [
    "A and B played with a {obj} in the {place} .",
    "B said : i like your {obj} , A !",
    "A gave B a {food} .",
    "B was very {feel} .",
    "A saw a big {thing} near the {place} .",
    "B ran to A and said hello .",
    "A and B went to the {place} together .",
    "A wanted to find the {obj} .",
    "B helped A look for the {obj} .",
    "then A and B ate a {food} .",
    "A told B a story about a {kind} .",
    "B laughed and A smiled .",
    "A was {feel} because B was {feel} .",
    "A and B looked at the {thing} .",
    "C came to the {place} with a {obj} .",
    "C said hello to A and B .",
    "A , B and C played all day .",
]
ENDINGS = ["at the end of the day A was {feel} .", "A and B became good friends .",
           "A went home and slept .", "B said goodbye to A ."]


def vocabulary() -> list[str]:
    words: set[str] = set()
    for s in BODY + ENDINGS + ["once upon a time there was a {adj} {kind} named A .",
                               "A lived in a {adj} {place} .", "one day A met a {adj} {kind} named B .",
                               "later they met a {kind} named C ."]:
        words.update(w for w in s.split() if w not in ("A", "B", "C") and not w.startswith("{"))
    for lst in (KINDS, ADJS, PLACES, OBJS, FOODS, FEELS, ANIMALS):
        words.update(lst)
    return sorted(words) + FIRST + SECOND


def make_story(rng: random.Random) -> tuple[str, list[int]]:
    """A story and the word indices of the SECOND token of every repeated name mention."""
    firsts = rng.sample(FIRST, 3)  # distinct first syllables: the first token never gives the name away
    names = {c: (f, rng.choice(SECOND)) for c, f in zip("ABC", firsts)}
    with_c = rng.random() < 0.5

    def fill(s: str) -> str:
        return s.format(obj=rng.choice(OBJS), place=rng.choice(PLACES), food=rng.choice(FOODS),
                        feel=rng.choice(FEELS), thing=rng.choice(ANIMALS), kind=rng.choice(KINDS),
                        adj=rng.choice(ADJS))

    sentences = [fill("once upon a time there was a {adj} {kind} named A ."), fill("A lived in a {adj} {place} ."),
                 fill("one day A met a {adj} {kind} named B .")]
    ab = [s for s in BODY if "C" not in s.split()]
    picks = rng.sample(ab, rng.randint(4, 7))
    if with_c:  # C is introduced somewhere in the middle and mentioned once or twice after
        k = rng.randint(0, len(picks))
        tail = picks[k:] + rng.sample([s for s in BODY if "C" in s.split()], rng.randint(1, 2))
        rng.shuffle(tail)
        picks = picks[:k] + ["later they met a {kind} named C ."] + tail
    sentences += [fill(s) for s in picks] + [fill(rng.choice(ENDINGS))]

    words: list[str] = []
    targets: list[int] = []
    seen: set[str] = set()
    for s in sentences:
        for w in s.split():
            if w in names:
                if w in seen:
                    targets.append(len(words) + 1)
                seen.add(w)
                words += list(names[w])
            else:
                words.append(w)
    return " ".join(words), targets


@dataclass
class Settings:
    sizes: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> ModelConfig overrides of "1M"
    steps: int = 600
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 2e-3
    warmup: int = 50
    train_stories: int = 40_000
    eval_stories: int = 500
    eval_points: int = 4  # accuracy measured this many times along training
    seeds: tuple[int, ...] = (0, 1)
    n_values: tuple[int, ...] = (1, 2)


SIZES = {
    "d32": dict(dim=32, n_layers=4, n_heads=2),
    "d64": dict(dim=64, n_layers=4, n_heads=4),
    "1M": dict(),
    "3M": dict(dim=256, n_layers=4, n_heads=8),
}


def settings(scale: str) -> Settings:
    if scale == "quick":
        return Settings(sizes={"d32": SIZES["d32"]}, steps=20, batch_size=8, seq_len=64, warmup=5,
                        train_stories=600, eval_stories=40, eval_points=2, seeds=(0,))
    if scale == "medium":
        # Fewer sizes, trained longer: at 300 steps no size beat chance (see docs/results.md).
        return Settings(sizes={k: SIZES[k] for k in ("d64", "1M")}, steps=1000, lr=3e-3, eval_points=5)
    # Sizes from the 1M preset up, at the learning rate where the 1M model forms induction heads
    # (at 3e-3 it did not within 1000 steps). Measured with one thread on the busy machine: 6-15
    # min per 1M run, 20-28 per 3M run; on 2 free cores the 8 runs should take about an hour.
    return Settings(sizes={k: SIZES[k] for k in ("1M", "3M")}, steps=1000, lr=1e-3, eval_points=5)


@torch.no_grad()
def name_accuracy(model: Any, stories: Sequence[tuple[list[int], list[int]]], batch_size: int = 64) -> float:
    """Head-1 accuracy on repeated names' second tokens; stories are (ids incl. leading eos, targets)."""
    hits = total = 0
    for i in range(0, len(stories), batch_size):
        chunk = stories[i : i + batch_size]
        tokens = common.pad_batch([ids for ids, _ in chunk])
        pred = model(tokens, heads=1)[:, :, 0].argmax(-1)  # pred[b, t] guesses token t+1
        for b, (ids, targets) in enumerate(chunk):
            for t in targets:
                hits += int(pred[b, t - 1] == ids[t])
                total += 1
    return hits / max(1, total)


def run(out_dir: Path, st: Settings, seeds: Sequence[int], scale: str = "default",
        command: str = "mtp experiment induction") -> dict[str, Any]:
    """Train and evaluate every (seed, size, n) of `st`; `scale` only labels the results."""
    from ..train import CheckpointConfig, DataConfig, ModelSpec, OptimizerConfig, RuntimeConfig, TrainConfig

    t_start = time.perf_counter()
    tok = common.word_tokenizer(vocabulary())
    # Data: one story set for every run (seed 1234), a disjoint evaluation set (seed 4321).
    data_dir = out_dir / "data"
    rng = random.Random(1234)
    common.prepare_documents((make_story(rng)[0] for _ in range(st.train_stories)), data_dir, tok)
    erng = random.Random(4321)
    eval_set = []
    for _ in range(st.eval_stories):
        text, targets = make_story(erng)
        ids = [tok.eos_id] + tok.encode(text)  # stories follow an eos in training, too
        eval_set.append((ids, [t + 1 for t in targets]))
    assert all(len(tok.encode(f"{f} {s}")) == 2 for f in FIRST[:3] for s in SECOND[:3])

    every = max(1, st.steps // st.eval_points)
    eval_steps = [every * k for k in range(1, st.eval_points + 1)]
    runs: list[dict[str, Any]] = []
    results: dict[str, Any] = {}
    # Seed-major order, with results rewritten after every run: a stopped experiment still leaves
    # one seed across all sizes, and re-running it picks up where it stopped.
    for seed in seeds:
        for size, overrides in st.sizes.items():
            for n in st.n_values:
                cfg = TrainConfig(
                    model=ModelSpec(preset="1M", n_future=n, overrides=dict(overrides)),
                    optimizer=OptimizerConfig(steps=st.steps, lr=st.lr, warmup=st.warmup),
                    data=DataConfig(dir=str(data_dir), batch_size=st.batch_size, seq_len=st.seq_len, seed=seed),
                    checkpointing=CheckpointConfig(out=str(out_dir / "runs" / f"{size}-n{n}-s{seed}"), eval_every=0,
                                                   eval_batches=5, log_every=max(1, st.steps // 20)),
                    runtime=RuntimeConfig(dtype="fp32", chunk_size=None))
                res = common.train_run(cfg, eval_steps, lambda m: {"name_acc": name_accuracy(m, eval_set)})
                runs.append({"size": size, "n": n, "seed": seed, "non_embedding_params": res["non_embedding_params"],
                             "name_acc": res["history"][-1]["name_acc"], "history": res["history"],
                             "val_loss": res["val"]["loss"] if res["val"] else None, "train_seconds": res["seconds"]})
                results = write(out_dir, runs, st, seeds, scale, command, time.perf_counter() - t_start)
    return results


def write(out_dir: Path, runs: list[dict[str, Any]], st: Settings, seeds: Sequence[int], scale: str, command: str,
          seconds: float) -> dict[str, Any]:
    summary = summarize(runs, st, seeds)
    results = {"experiment": "induction", "scale": scale, "settings": st, "seeds": list(seeds), "runs": runs,
               "summary": summary, "chance": 1 / len(SECOND), "seconds": seconds,
               "complete": len(runs) == len(seeds) * len(st.sizes) * len(st.n_values)}
    plot(runs, summary, out_dir / "induction.png")
    md = common.header("Induction (paper 4.1): second token of repeated two-token names", command, st, seeds,
                       seconds)
    if not results["complete"]:
        md += f"\n**Incomplete: {len(runs)} of {len(seeds) * len(st.sizes) * len(st.n_values)} runs so far.**\n"
    md += ("\nHead-1 accuracy on the second token of a name that already occurred in the story "
           f"(chance {1 / len(SECOND):.3f}); mean ± std over seeds.\n\n")
    md += common.markdown_table(summary, [("size", "size"), ("params", "non-embedding params"),
                                          ("acc_n1", "n=1 acc"), ("sd_n1", "±"), ("acc_n2", "n=2 acc"),
                                          ("sd_n2", "±"), ("gain", "n=2 - n=1")])
    md += "\n\n![induction](induction.png)\n"
    common.write_results(out_dir, results, md)
    return results


def summarize(runs: list[dict[str, Any]], st: Settings, seeds: Sequence[int]) -> list[dict[str, Any]]:
    rows = []
    for size in st.sizes:
        row: dict[str, Any] = {"size": size}
        if not any(r["size"] == size for r in runs):
            continue
        for n in st.n_values:
            accs = [r["name_acc"] for r in runs if r["size"] == size and r["n"] == n]
            if not accs:
                continue
            row[f"acc_n{n}"], row[f"sd_n{n}"] = common.mean_std(accs)
            row["params"] = next(r["non_embedding_params"] for r in runs if r["size"] == size)
        if "acc_n1" in row and "acc_n2" in row:
            row["gain"] = row["acc_n2"] - row["acc_n1"]
        rows.append(row)
    return rows


def plot(runs: list[dict[str, Any]], summary: list[dict[str, Any]], path: Path) -> None:
    fig, (ax1, ax2) = common.new_figure(2)
    ns = sorted({r["n"] for r in runs})
    series = {}
    for n in ns:
        rows = [row for row in summary if f"acc_n{n}" in row]
        series[f"n={n}"] = ([row["params"] for row in rows], [row[f"acc_n{n}"] for row in rows],
                            [row[f"sd_n{n}"] for row in rows])
    common.plot_lines(ax1, series, "non-embedding parameters", "accuracy on repeated name (2nd token)",
                      "induction accuracy vs model size", logx=True)
    for row in summary:
        ax1.annotate(row["size"], (row["params"], row.get("acc_n1", 0)), fontsize=7, alpha=0.7)
    sizes = list(dict.fromkeys(r["size"] for r in runs))
    for r in runs:  # colour: size; line style: n; one line per seed
        steps = [h["step"] for h in r["history"]]
        accs = [h["name_acc"] for h in r["history"]]
        ax2.plot(steps, accs, marker=".", ls="-" if r["n"] == 1 else "--", alpha=0.8,
                 color=f"C{sizes.index(r['size']) % 10}", label=f"{r['size']} n={r['n']} s{r['seed']}")
    for ax in (ax1, ax2):
        ax.axhline(1 / len(SECOND), color="grey", ls=":", lw=1)
        ax.text(ax.get_xlim()[0], 1 / len(SECOND), " chance", fontsize=7, color="grey", va="bottom")
    ax2.set_xlabel("training step")
    ax2.set_ylabel("accuracy on repeated name (2nd token)")
    ax2.set_title("along training (solid n=1, dashed n=2)")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=6, ncol=2)
    common.save_figure(fig, path)
