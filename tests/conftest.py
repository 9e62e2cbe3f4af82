import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seeded, and on one thread: the models here are tiny, and threads only contend on a busy machine."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
