import sysconfig
from pathlib import Path
from typing import Any, Callable

import pytest
import torch


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
    from mtp.data import prepare

    src = tmp_path_factory.mktemp("src")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ["textwrap.py", "glob.py", "fnmatch.py", "shlex.py", "bisect.py", "colorsys.py"]:
        (src / name).write_text((stdlib / name).read_text())
    out = tmp_path_factory.mktemp("data")
    prepare(src, out, tokenizer="byte", val_fraction=0.2)
    return out


# ----- shared tiny builders ------------------------------------------------------------------------

def tiny_train_config(corpus: Path, out: Path, **kw: Any) -> Any:
    """A TrainConfig for a seconds-long CPU run on the `corpus` fixture (fields overridable)."""
    from mtp.train import TrainConfig

    base: dict[str, Any] = dict(data=str(corpus), out=str(out), preset="tiny", n_future=2, steps=12, batch_size=4,
                                seq_len=32, lr=3e-3, warmup=3, eval_every=6, eval_batches=2, save_every=4,
                                log_every=1, dtype="fp32", progress=False, chunk_size=50)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def make_config(corpus: Path) -> Callable[..., Any]:
    """make_config(out, **overrides) -> a tiny TrainConfig on the shared corpus."""
    return lambda out, **kw: tiny_train_config(corpus, out, **kw)


def tiny_model(seed: int = 0, **kw: Any) -> Any:
    """A random `tiny`-preset MTPModel in eval mode, fields overridable (e.g. n_future, vocab_size)."""
    from mtp.model import ModelConfig, MTPModel

    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset("tiny", **{"n_future": 2, "vocab_size": 53, "max_seq_len": 64, **kw})
    return MTPModel(cfg).eval()


@pytest.fixture(scope="session")
def tiny_run(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4 (copy it before changing it)."""
    from mtp.train import train

    out = tmp_path_factory.mktemp("tiny_run") / "run"
    train(tiny_train_config(corpus, out, steps=4, save_every=2, eval_every=4, eval_batches=1, keep=3))
    return out
