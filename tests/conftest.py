"""Shared fixtures. Tests import the package's modules from the repository root.

pyproject.toml runs the suite in parallel worker processes (pytest-xdist, one per core, at most four); each
worker computes with one thread, and so do the processes its tests start, so that the workers do not fight over
the cores."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state, so failures reproduce."""
    torch.manual_seed(0)
    yield
