"""Small-scale reproductions of the paper's studies; `run_experiment(name, ...)` runs one.

Each writes results.json, results.md and PNG plots into its out dir (see `common`). Scales:
quick (plumbing only, about a minute), medium (a reduced run), default (about an hour on 2 cores,
sized from measured step times).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

EXPERIMENTS = {
    "induction": "induction",  # paper 4.1
    "polynomial": "polynomial",  # paper 4.2
    "bytes": "bytes",  # paper 3.3
    "choose-n": "choose_n",  # paper 3.4
    "heads": "heads",  # parallel vs causal vs sequential heads (issue 14)
}


def run_experiment(name: str, quick: bool = False, out_dir: str | Path | None = None,
                   seeds: Sequence[int] | None = None, scale: str | None = None,
                   threads: int | None = None, command: str | None = None,
                   overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run experiment `name` (see EXPERIMENTS) and return its results (also written to out_dir).

    quick=True is scale="quick"; seeds default to the scale's; `overrides` replace fields of the
    scale's settings (e.g. {"lr": 1e-3, "steps": 2000}); out_dir defaults to
    runs/experiments/<name>-<scale>[-<overrides>]. Re-running into the same out_dir reuses
    finished runs. The returned dict also holds "out_dir"."""
    from . import common

    key = name.replace("_", "-")
    if key not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    scale = common.check_scale(scale or ("quick" if quick else "default"))
    if quick and scale != "quick":
        raise ValueError("quick=True conflicts with scale=" + scale)
    overrides = dict(overrides or {})
    # Scalars spelled out (lr0.001), structured values by a short hash: different settings never share a directory.
    suffix = "".join(f"-{k}{v}" if not isinstance(v, (dict, list, tuple)) else
                     f"-{k}{hashlib.sha1(json.dumps(v, sort_keys=True).encode()).hexdigest()[:6]}"
                     for k, v in sorted(overrides.items()))
    suffix = re.sub(r"[^A-Za-z0-9_.+-]", "", suffix)
    out = Path(out_dir) if out_dir is not None else Path("runs") / "experiments" / f"{key}-{scale}{suffix}"
    out.mkdir(parents=True, exist_ok=True)
    common.set_threads(threads)
    module = importlib.import_module(f".{EXPERIMENTS[key]}", __name__)
    if command is None:
        command = f"mtp experiment {key}" + ("" if scale == "default" else f" --{scale}") + f" --out {out}"
        if seeds:
            command += " --seeds " + " ".join(map(str, seeds))
        if threads:
            command += f" --threads {threads}"
        for k, v in overrides.items():
            command += f" --set '{k}={json.dumps(v) if not isinstance(v, str) else v}'"
    st = common.override(module.settings(scale), overrides)
    t0 = time.perf_counter()
    results = module.run(out, st, tuple(seeds) if seeds else st.seeds, scale=scale, command=command)
    results.setdefault("seconds", time.perf_counter() - t0)
    results["out_dir"] = str(out)
    return results


__all__ = ["EXPERIMENTS", "run_experiment"]
