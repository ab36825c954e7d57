"""Shared test set-up: a fixed torch seed for every test."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread for tiny problems: thread-pool hand-offs cost more than the work (and stall on a
    loaded machine). Folders of such tests make it autouse in their conftest."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
