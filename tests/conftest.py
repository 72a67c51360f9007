"""Shared fixtures and the tests' model and run builders.

Test files import the builders by name (`from conftest import tiny_model`); a file with one model
of its own names it once, e.g. `make_model = partial(tiny_model, n_future=2, init_std=0.2)`.
"""

import sysconfig
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from mtp.data import prepare
from mtp.model import ModelConfig, MTPModel
from mtp.train import TrainConfig, train


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    # The test models are tiny: one thread is faster for them, and keeps the 2-core CI machine
    # free for the multi-process tests.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small prepared byte-level corpus built from a few standard-library files."""
    src = tmp_path_factory.mktemp("src")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ["textwrap.py", "glob.py", "fnmatch.py", "shlex.py", "bisect.py", "colorsys.py"]:
        (src / name).write_text((stdlib / name).read_text())
    out = tmp_path_factory.mktemp("data")
    prepare(src, out, tokenizer="byte", val_fraction=0.2)
    return out


# ----- shared tiny builders ------------------------------------------------------------------------

def tiny_config(**overrides: Any) -> ModelConfig:
    """The `tiny` preset (dim 64, 6 layers, vocab 512, context 512) with ModelConfig fields overridden."""
    return ModelConfig.from_preset("tiny", **overrides)


def tiny_model(seed: int = 0, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
               training: bool = False, **overrides: Any) -> MTPModel:
    """A random `tiny_config(**overrides)` model: the same seed gives the same weights (and leaves
    torch's global generator in the same state); in eval mode unless `training`."""
    torch.manual_seed(seed)
    return MTPModel(tiny_config(**overrides)).to(device, dtype).train(training)


def tiny_train_fields(corpus: Path | str, out: Path | str, **overrides: Any) -> dict[str, Any]:
    """The options of a seconds-long CPU training run on `corpus`, as a plain dict of flat keys
    (as in YAML or flags; it can cross into torchrun workers as JSON)."""
    return dict(data=str(corpus), out=str(out), preset="tiny", n_future=2, steps=12, batch_size=4, seq_len=32,
                lr=3e-3, warmup=3, eval_every=6, eval_batches=2, save_every=4, log_every=1, dtype="fp32",
                progress=False, chunk_size=50) | overrides


def tiny_train_config(corpus: Path | str, out: Path | str, **overrides: Any) -> TrainConfig:
    """A TrainConfig for a seconds-long CPU run on the `corpus` fixture (options overridable by
    flat key, e.g. steps=8)."""
    return TrainConfig.from_dict(tiny_train_fields(corpus, out, **overrides))


@pytest.fixture
def make_config(corpus: Path) -> Callable[..., TrainConfig]:
    """make_config(out, **overrides) -> a tiny TrainConfig on the shared corpus."""
    return lambda out, **kw: tiny_train_config(corpus, out, **kw)


@pytest.fixture(scope="session")
def tiny_run(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4 (copy it before changing it)."""
    out = tmp_path_factory.mktemp("tiny_run") / "run"
    train(tiny_train_config(corpus, out, steps=4, save_every=2, eval_every=4, eval_batches=1, keep=3))
    return out
