import sysconfig
from pathlib import Path

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
