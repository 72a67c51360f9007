"""Decoding speed: plain greedy vs self-speculative decoding (chains of k drafts, a Medusa tree).

    python bench/bench_decode.py                     # a tiny 4-head model, quickly trained on a loop
    python bench/bench_decode.py --train-steps 0     # the same model untrained
    python bench/bench_decode.py --n-layers 16       # deeper trunk: heads are a smaller share
    python bench/bench_decode.py --checkpoint DIR    # a saved model (mtp.checkpoint.load_model)
    python bench/bench_decode.py --checkpoint DIR --dtype bf16 --ratio-only   # verify cost in bf16

Prints, for each batch size, the time of a cached forward of 1 token vs 5 tokens measured side by
side (what a verify pass costs relative to a greedy step), then the decode table: tokens/s,
tokens per forward, speedup over greedy, per-head acceptance, and whether the tokens equal greedy.
Speedup ~= tokens per forward / (verify pass time / greedy step time), minus bookkeeping.
"""

from __future__ import annotations

import argparse
import time

import torch

from mtp import ModelConfig, MTPModel
from mtp.decode_bench import decode_benchmark, default_modes, format_table, forward_time_ratio
from mtp.loss import mtp_backward

TEXT_PROMPTS = [
    "def fibonacci(n):\n    ",
    "class Stack:\n    def __init__(self):\n        ",
    "import os\n\n\ndef list_files(path):\n    ",
    "    for i in range(len(items)):\n        if ",
    "def read_config(filename):\n    with open(filename) as f:\n        ",
    "Once upon a time, ",
    "The quick brown fox ",
    "if __name__ == \"__main__\":\n    ",
]
LOOP_LEN = 23


def loop_windows(n: int, length: int, vocab: int, generator: torch.Generator, noise: float = 0.0) -> torch.Tensor:
    """Windows of a fixed random loop of tokens, with a fraction `noise` of random tokens."""
    loop = torch.randint(vocab, (LOOP_LEN,), generator=torch.Generator().manual_seed(1234))
    start = torch.randint(LOOP_LEN, (n,), generator=generator)
    x = loop[(start[:, None] + torch.arange(length)) % LOOP_LEN]
    flip = torch.rand(n, length, generator=generator) < noise
    return torch.where(flip, torch.randint(vocab, (n, length), generator=generator), x)


def synthetic_model(steps: int, preset: str = "tiny", n_layers: int | None = None, vocab: int = 64) -> MTPModel:
    """An n_future=4 model trained for `steps` steps on a noisy loop, so drafts get accepted."""
    torch.manual_seed(0)
    extra = {} if n_layers is None else {"n_layers": n_layers}
    model = MTPModel(ModelConfig.from_preset(preset, n_future=4, vocab_size=vocab, max_seq_len=256, **extra))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        loss, _ = mtp_backward(model, loop_windows(16, 64, vocab, g, noise=0.1))
        opt.step()
    if steps:
        print(f"trained {steps} steps in {time.perf_counter() - start:.1f}s, final loss {loss.item():.3f}")
    return model.eval()


def synthetic_prompts(n: int, vocab: int) -> list[list[int]]:
    """Half loop windows (easy to draft), half random tokens (hard)."""
    g = torch.Generator().manual_seed(1)
    loops = loop_windows(n - n // 2, 12, vocab, g).tolist()
    return loops + torch.randint(vocab, (n // 2, 12), generator=g).tolist()


def load_checkpoint(path: str) -> tuple[MTPModel, list[list[int]]]:
    from mtp.checkpoint import load_model  # lazy: only needed with --checkpoint

    model, tok = load_model(path)
    if tok is None:
        raise SystemExit(f"{path} has no tokenizer; cannot encode the benchmark prompts")
    prompts = []
    for text in TEXT_PROMPTS:
        ids = tok.encode(text)
        prompts.append(list(getattr(ids, "ids", ids)))
    return model, prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="checkpoint or run directory; default: a synthetic tiny model")
    ap.add_argument("--train-steps", type=int, default=150, help="training steps of the synthetic model")
    ap.add_argument("--preset", default="tiny", help="size of the synthetic model (mtp.PRESETS)")
    ap.add_argument("--n-layers", type=int, help="override the synthetic model's depth (4 of them are heads)")
    ap.add_argument("--prompts", type=int, default=16, help="number of prompts (repeated from the list)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--modes", nargs="+", help="default: greedy, spec1..spec<n-1>, tree")
    ap.add_argument("--repeats", type=int, default=1, help="best of this many timed runs")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                    help="weights and cache dtype (speculative output equals greedy in each)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--ratio-only", action="store_true", help="only the 5-vs-1 token forward times")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.checkpoint:
        model, base_prompts = load_checkpoint(args.checkpoint)
    else:
        model = synthetic_model(args.train_steps, args.preset, args.n_layers)
        base_prompts = synthetic_prompts(args.prompts, model.cfg.vocab_size)
    model = model.to(args.device, torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    prompts = [base_prompts[i % len(base_prompts)] for i in range(args.prompts)]
    modes = args.modes or default_modes(model)
    cfg = model.cfg
    print(f"model: dim={cfg.dim} layers={cfg.n_layers} n_future={cfg.n_future} vocab={cfg.vocab_size} "
          f"params={model.num_params() / 1e6:.2f}M  {args.dtype}  threads={torch.get_num_threads()}")

    for batch in args.batch_sizes:
        t = forward_time_ratio(model, batch_size=batch, context=32, n_tokens=5)
        print(f"\nbatch {batch}: cached forward, 1 token head 1 {t['t1'] * 1e3:.2f} ms | 1 token all heads "
              f"{t['t1_all'] * 1e3:.2f} ms | 5 tokens all heads {t['tn'] * 1e3:.2f} ms | "
              f"5-vs-1 ratio {t['ratio']:.2f} (vs a greedy step {t['step_ratio']:.2f})")
        if args.ratio_only:
            continue
        rows = decode_benchmark(model, prompts, args.max_new_tokens, modes, batch_size=batch, repeats=args.repeats)
        print(format_table(rows), flush=True)


if __name__ == "__main__":
    main()
