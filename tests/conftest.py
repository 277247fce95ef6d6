"""Shared fixtures. Tests import the package's modules from the repository root."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state, so failures reproduce."""
    torch.manual_seed(0)
    yield
