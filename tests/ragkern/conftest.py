"""Fixtures shared by the ragkern tests."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models run much faster on one thread, and do not fight other jobs for the 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
