"""CUDA graphs: whether a run uses them (``--cuda_graph``, asked apart for training steps and for sampling), and
``Captured``, which captures a function once and replays it.

A training step or a reverse step of the recommended model is a few hundred small kernels, which a GPU runs
faster than Python launches them. Captured in a CUDA graph, those kernels are launched at once by a replay. The
training step (``training.step.TrainStep``) and the reverse chain's step (``sampling.captured_step``) both run
through ``Captured``.

``--cuda_graph True`` insists: where graphs cannot hold the training step, the run is refused in one line.
``auto`` uses them wherever they can, and says on a GPU why the training step cannot. ``False`` never captures.
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


class Captured:
    """``fn`` as a CUDA graph: run eagerly on a side stream for the first ``warmup`` calls (as capture needs),
    captured at the next call and replayed from then on. ``before`` runs ahead of each warm-up call and of the
    capture. Each call returns what ``fn`` returns; a replay, the tensors the capture recorded, refilled.

    With ``capture=False`` every call runs ``fn`` eagerly on the current stream: the same static-tensor code
    path, which is what tests check on a CPU."""

    def __init__(self, fn, device: torch.device, *, warmup: int, before=None, capture: bool = True):
        self.fn, self.device, self.warmup_left, self.capture = fn, device, warmup, capture
        self.before = before or (lambda: None)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output = None

    def __call__(self):
        if not self.capture:
            self.before()
            return self.fn()
        if self.graph is None and self.warmup_left > 0:
            self.warmup_left -= 1
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self.before()
                output = self.fn()
            torch.cuda.current_stream(self.device).wait_stream(side)
            return output
        if self.graph is None:
            self.before()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.output = self.fn()
        self.graph.replay()
        return self.output
