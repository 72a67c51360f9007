"""Per-head metrics beyond `mtp.train.evaluate` (which gives per-head loss and top-1 accuracy):
top-k accuracy, and the run-length of correct draft heads, a teacher-forced proxy for how many
tokens self-speculative decoding commits per forward."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import TokenData, validation_batches
from ..loss import IGNORE, align_targets
from ..model import MTPModel

__all__ = ["head_metrics", "evaluate_prepared"]


@torch.no_grad()
def head_metrics(model: MTPModel, batches: Iterable[Tensor], seq_len: int,
                 topk: Sequence[int] = (1, 5)) -> dict[str, Any]:
    """Metrics over windows (B, seq_len + n_future) of tokens:

    loss[i], acc@k[i]: cross-entropy and top-k accuracy of head i+1 (target t+i+1);
    prefix_acc[i]: fraction of positions where heads 2..i+1 all predict the data (i = 0: always 1);
    est_tokens_per_forward: 1 + sum over draft heads of prefix_acc, the tokens a greedy chain of
    all drafts would commit per forward if head 1 always agreed with the data."""
    n = model.cfg.n_future
    loss = torch.zeros(n, dtype=torch.float64)
    hits = {k: torch.zeros(n, dtype=torch.float64) for k in topk}
    prefix = torch.zeros(n, dtype=torch.float64)
    count = torch.zeros(n, dtype=torch.float64)
    full = 0  # positions where every head has a target, the denominator of prefix_acc
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    for tokens in batches:
        tokens = tokens.to(device)
        targets = align_targets(tokens, n, seq_len, model.cfg.head_type == "sequential")
        logits = model(tokens[:, :seq_len]).float()  # (B, T, n, V)
        valid = targets != IGNORE
        for i in range(n):
            lg, tg, ok = logits[:, :, i], targets[:, :, i], valid[:, :, i]
            loss[i] += F.cross_entropy(lg[ok], tg[ok], reduction="sum").double().cpu()
            count[i] += ok.sum().double().cpu()
            top = lg.topk(max(topk), dim=-1).indices
            for k in topk:
                hits[k][i] += ((top[..., :k] == tg[..., None]).any(-1) & ok).sum().double().cpu()
        all_ok = valid.all(-1)
        correct = (logits.argmax(-1) == targets) & all_ok[..., None]
        run = torch.ones_like(all_ok)
        prefix[0] += all_ok.sum().double().cpu()
        for i in range(1, n):
            run = run & correct[:, :, i]
            prefix[i] += (run & all_ok).sum().double().cpu()
        full += int(all_ok.sum())
    model.train(was_training)
    count = count.clamp(min=1)
    prefix_acc = (prefix / max(1, full)).tolist()
    return {
        "loss": (loss / count).tolist(),
        **{f"acc@{k}": (hits[k] / count).tolist() for k in topk},
        "prefix_acc": prefix_acc,
        "est_tokens_per_forward": 1.0 + sum(prefix_acc[1:]),
    }


def evaluate_prepared(model: MTPModel, data_dir: str | Path, split: str = "val", batch_size: int = 8,
                      seq_len: int = 256, max_batches: int | None = 20, topk: Sequence[int] = (1, 5)) -> dict[str, Any]:
    """`head_metrics` over the first windows of a prepared corpus split."""
    data = TokenData(data_dir, split)
    return head_metrics(model, validation_batches(data, batch_size, seq_len, model.cfg.n_future, max_batches),
                        seq_len, topk)
