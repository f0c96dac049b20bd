"""Fixtures of the families tier: one thread for the tiny models, and SmolLM2's real weights where installed."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the hub


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread and leave the other cores to other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
