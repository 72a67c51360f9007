"""Prompt lookup proposal rules compared by exact replay (`mtp.lookup.replay_lookup`), no timing.

    python bench/bench_lookup.py                                  # runs/demo, 8 held-out prompts, 64 tokens
    python bench/bench_lookup.py --checkpoint runs/smollm2/base --max-new-tokens 64
    python bench/bench_lookup.py --validate                       # also run mtp's lookup<k> and compare

The model decodes each prompt greedily once; every rule and k is then replayed on those outputs,
counting passes exactly as the speculative loop does (the prefill gives the first token; a pass
accepts the longest draft prefix that equals the output, plus one token from head 1). Two
numbers per cell: tokens per forward as `mtp bench decode` counts it (all passes, prefill
included) and vLLM's own metric (1 + accepted / passes that had drafts, drafts accepted past
the token limit in the last pass included, as vLLM counts them), which leaves out the prefill and
every pass without a proposal and so reads higher on the same text. The old mtp rule is replayed
with the decoder's padding (repeats of the last token up to k), vLLM's without (it verifies only
what it proposed).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

import torch

from mtp.checkpoint import load_model
from mtp.cli import default_bench_prompts
from mtp.generate import generate
from mtp.lookup import NGramIndex, ReplayCount, replay_lookup
from mtp.modes import parse_mode


def matches(history: Sequence[int], n: int) -> list[int]:
    """Ends j < len-1 of earlier occurrences of history's last n tokens, in order."""
    end, suffix = len(history) - 1, list(history[-n:])
    return [j for j in range(n - 1, end) if list(history[j - n + 1 : j + 1]) == suffix]


def reference(latest: bool, fill: bool, max_n: int = 3, min_n: int = 1) -> Callable[[Sequence[int], int], list[int]]:
    """A brute-force proposer: the longest suffix (max_n..min_n tokens) that occurred before; its
    latest or earliest occurrence; the k tokens after it, cut at the end of the text (vLLM) or,
    `fill`, continued by copying on past the end (text[end + i] = text[j + i], the repeat the
    match implies)."""
    def propose(history: Sequence[int], k: int) -> list[int]:
        for n in range(min(max_n, len(history) - 1), min_n - 1, -1):
            ends = matches(history, n)
            if ends:
                j = ends[-1] if latest else ends[0]
                out = list(history[j + 1 : j + 1 + k])
                if fill:
                    text = list(history)
                    while len(out) < k:
                        out.append((text + out)[j + 1 + len(out)])
                return out
        return []
    return propose


def rules(max_n: int) -> dict[str, Callable[[], Callable[[Sequence[int], int], list[int]]]]:
    """name -> a factory of one request's proposer."""
    return {
        "mtp (NGramIndex)": lambda: NGramIndex(max_n).propose,  # latest occurrence, filled
        "latest, cut (old mtp)": lambda: reference(True, False, max_n),
        "earliest, cut (vLLM)": lambda: reference(False, False, max_n),
        "earliest, filled": lambda: reference(False, True, max_n),
    }


def replay_all(prompts: list[list[int]], outputs: list[list[int]], k: int, make, pad: bool,
               limit: int) -> ReplayCount:
    total = ReplayCount()
    for p, o in zip(prompts, outputs):
        total += replay_lookup(p, o, k, make(), pad=pad, limit=limit)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="runs/demo")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, nargs="+", default=[3, 4, 5, 6])
    ap.add_argument("--max-n", type=int, nargs="+", default=[3])
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--validate", action="store_true", help="run mtp's lookup<k> too: its tokens per forward "
                    "must equal the replay of NGramIndex")
    args = ap.parse_args()
    print(" ".join([os.path.basename(sys.executable)] + sys.argv), f"| load {os.getloadavg()[0]:.2f}")
    model, tok = load_model(args.checkpoint, dtype=torch.bfloat16 if args.dtype == "bf16" else None)
    prompts = [tok.encode(p) for p in default_bench_prompts()]
    n = args.max_new_tokens
    # Past the limit too: vLLM's metric counts drafts accepted beyond max_tokens in the last pass.
    outputs = generate(model, prompts, n + max(args.k)).tokens
    print(f"{len(prompts)} prompts, {sum(len(o[:n]) for o in outputs)} greedy tokens")
    for max_n in args.max_n:
        print(f"\nmax_n = {max_n}: tokens per forward (mtp's count) | vLLM's metric (1 + accepted / drafted passes)")
        print(f"{'rule':<24}" + "".join(f"{'k=' + str(k):>16}" for k in args.k))
        for name, make in rules(max_n).items():
            cells = []
            for k in args.k:
                c = replay_all(prompts, outputs, k, make, pad="vLLM" not in name, limit=n)
                cells.append(f"{c.tokens_per_forward:.3f} | {c.per_drafted_pass:.2f}")
            print(f"{name:<24}" + "".join(f"{c:>16}" for c in cells))
        if args.validate and max_n == 3:
            for k in args.k:
                res = parse_mode(f"lookup{k}").run(model, prompts, n)
                rep = replay_all(prompts, outputs, k, rules(3)["mtp (NGramIndex)"], pad=True, limit=n)
                assert res.tokens == [o[:n] for o in outputs], "lookup output differs from greedy"
                ok = abs(res.tokens_per_forward - rep.tokens_per_forward) < 1e-12
                print(f"validate lookup{k}: mtp {res.tokens_per_forward:.4f} ({sum(res.row_forwards)} passes), "
                      f"replay {rep.tokens_per_forward:.4f} ({rep.forwards} passes) {'OK' if ok else 'MISMATCH'}")


if __name__ == "__main__":
    main()
