"""The spatial tests work on tiny tensors: one intra-op thread avoids thread-pool hand-offs that cost more than the
work itself (and stall badly on a loaded machine)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
