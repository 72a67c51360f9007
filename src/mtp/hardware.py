"""What the machine's CPU can do fast, read from /proc/cpuinfo (Linux; elsewhere: nothing)."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def has_native_bf16() -> bool:
    """bf16 dot products in hardware (AVX512-BF16 or AMX). Without them a CPU computes bf16
    matmuls by conversion: training under bf16 autocast ran 2.4x slower than fp32 on an Ice Lake
    Xeon (demo preset, 2 threads, session 9)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def train_dtype(name: str, device: torch.device) -> str:
    """`--dtype` of training, resolved: auto is bf16 on CUDA (where supported) and on CPUs with
    native bf16, fp32 elsewhere."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and has_native_bf16() else "fp32"
