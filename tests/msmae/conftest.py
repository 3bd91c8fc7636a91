"""Fixtures for the method tests. These import torch and timm only, so they run on a GPU
box without Ray: ``MSMAE_TEST_DEVICE=cuda pytest tests/msmae --confcutdir tests/msmae``."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session")
def device() -> torch.device:
    name = os.environ.get("MSMAE_TEST_DEVICE", "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail(f"MSMAE_TEST_DEVICE={name} but CUDA is not available")
    return torch.device(name)


@pytest.fixture
def generator(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(1234)
