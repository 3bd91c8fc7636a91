"""Fixtures for the comparison harness's tests. Like the harness they import torch, timm and
torchvision only, so they run alone on a GPU box without Ray:
``MSMAE_TEST_DEVICE=cuda pytest tests/comparison --confcutdir tests/comparison``."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session")
def device() -> torch.device:
    """CPU by default; the device MSMAE_TEST_DEVICE names otherwise (it must exist)."""
    name = os.environ.get("MSMAE_TEST_DEVICE", "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail(f"MSMAE_TEST_DEVICE={name} but CUDA is not available")
    return torch.device(name)


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    """These models are tiny: one CPU thread is faster than several fighting over shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
