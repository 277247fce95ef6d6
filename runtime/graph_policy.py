"""Whether a run uses CUDA graphs (``--cuda_graph``), asked separately for training steps and for sampling.

``True`` insists: where graphs cannot hold the training step, the run is refused in one line. ``auto`` uses them
wherever they can, and says on a GPU why the training step cannot. ``False`` never captures. The capture itself
is ``cuda_graph``'s.
"""
from __future__ import annotations

import torch

from runtime.errors import UserError


def graph_blocker(device: torch.device, *, world_size: int, compiled: bool) -> str | None:
    """Why a CUDA graph cannot hold this run's step (a phrase to follow "CUDA graphs"), or None if it can."""
    if device.type != "cuda":
        return f"need a CUDA GPU, and this run is on the {device.type.upper()}"
    if world_size > 1:
        return f"run in a single process, and this run has {world_size} (torchrun)"
    if compiled:
        return "and --compile both take over the step, so only one of them can"
    return None


def train_with_graphs(requested: str | bool, device: torch.device, *, world_size: int, compiled: bool,
              announce: bool = True) -> bool:
    """Whether the training step is captured: True insists (a blocker is a UserError), auto captures where it
    can and says on a GPU (with ``announce``) why it cannot, False never captures."""
    if requested is False:
        return False
    why = graph_blocker(device, world_size=world_size, compiled=compiled)
    if why is None:
        return True
    if requested is True:
        raise UserError(f"--cuda_graph True: CUDA graphs {why}; pass --cuda_graph auto or False")
    if device.type == "cuda" and announce:
        print(f"training steps run eagerly: CUDA graphs {why}")
    return False


def sample_with_graphs(requested: str | bool, device: torch.device) -> bool:
    """Whether the reverse chain's step is captured. Sampling runs in one process on the EMA copy, which
    ``--compile`` leaves alone, so only the device decides: a CUDA GPU, unless ``--cuda_graph False``."""
    return requested is not False and device.type == "cuda"
