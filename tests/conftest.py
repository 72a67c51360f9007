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
