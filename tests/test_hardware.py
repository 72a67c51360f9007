"""`--dtype auto` resolves from what the CPU does in hardware (flags faked here)."""

import pytest
import torch

from mtp import hardware
from mtp.generate import decode_dtype


@pytest.fixture
def flags(monkeypatch):
    def set_flags(*names: str) -> None:
        monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(names))
    return set_flags


@pytest.mark.parametrize("names, train, decode", [
    (("avx2", "avx512f"), "fp32", torch.float32),  # no bf16 in hardware (Ice Lake): both fp32
    (("avx512f", "avx512_bf16"), "bf16", torch.bfloat16),  # bf16 dot products: bf16 both (session 13)
    (("avx512_bf16", "amx_bf16", "amx_tile"), "bf16", torch.bfloat16),  # AMX: bf16 both
])
def test_auto_dtypes_follow_cpu_flags(flags, names, train, decode):
    flags(*names)
    assert hardware.train_dtype("auto", torch.device("cpu")) == train
    assert decode_dtype("auto", "cpu") == decode


def test_explicit_train_dtype_is_kept(flags):
    flags("amx_bf16")
    assert hardware.train_dtype("fp32", torch.device("cpu")) == "fp32"
    flags()
    assert hardware.train_dtype("bf16", torch.device("cpu")) == "bf16"


def test_cpu_flags_reads_this_machine():
    hardware.cpu_flags.cache_clear()
    try:
        with open("/proc/cpuinfo") as f:
            line = next(line for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags here")
    assert hardware.cpu_flags() == frozenset(line.split(":", 1)[1].split())
