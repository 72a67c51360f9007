"""Rank, world size and device, read once from the environment torchrun sets.

Everything that depends on the process layout asks this module, so multi-process training only
has to change this file (process-group init, model wrapping) and nothing in the training loop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


def init(device: str = "auto") -> DistInfo:
    """Single process unless launched by torchrun; multi-process training is not wired in yet."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1:
        raise RuntimeError("multi-process training (torchrun) is not supported yet; run a single process")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=pick_device(device, local_rank))
