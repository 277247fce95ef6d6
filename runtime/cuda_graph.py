"""CUDA graphs: capturing a function once and replaying it, and the reverse step captured that way.

A training step or a reverse step of the recommended model is a few hundred small kernels, which a GPU runs
faster than Python launches them. Captured in a CUDA graph, those kernels are launched at once by a replay.
The training step (``train_step.TrainStep``) and the reverse chain's step (``ChainSteps``) both run through
``Captured``. Whether a run uses graphs is ``graph_policy``'s question.
"""
from __future__ import annotations

import torch

from diffusion import Diffusion


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


class ChainStep:
    """One reverse step of ``sampler`` (``Diffusion.chain_step``) for batches of ``shape``, on static tensors:
    each call copies its inputs in, replays the captured step and returns the static outputs (x at the next
    timestep, and the x_0 estimate). Pass it as ``step`` to ``Diffusion.run_chain``; the noise stays drawn by
    the loop, so the images are the eager chain's own. A class-conditional model's labels are copied in like the
    other inputs; its guidance scale is part of the captured step."""

    def __init__(self, diffusion: Diffusion, shape: tuple[int, ...], *, sampler: str, eta: float = 0.0,
                 guidance: float = 0.0, capture: bool = True):
        self.diffusion, self.sampler, self.eta, self.guidance = diffusion, sampler, eta, guidance
        self.uses_noise = sampler == "ddpm" or eta > 0
        device = diffusion.device
        self.x = torch.zeros(shape, device=device)  # the chain's state x_t
        self.x_start = torch.zeros(shape, device=device)  # the previous step's x_0 estimate
        self.z = torch.zeros(shape, device=device)  # the step's noise
        self.t = torch.zeros(shape[0], dtype=torch.long, device=device)
        self.t_next = torch.zeros(shape[0], dtype=torch.long, device=device)
        self.y = torch.full((shape[0],), diffusion.null_class, dtype=torch.long, device=device)  # the labels
        self.captured = Captured(self._body, device, warmup=1, capture=capture)

    def _body(self) -> tuple[torch.Tensor, torch.Tensor]:
        estimate = self.x_start if self.diffusion.self_condition else None
        y = self.y if self.diffusion.num_classes else None
        x, x_start = self.diffusion.chain_step(self.sampler, self.x, self.t, self.t_next,
                                               self.z if self.uses_noise else None, estimate, eta=self.eta, y=y,
                                               guidance=self.guidance)
        self.x.copy_(x)
        self.x_start.copy_(x_start)
        return self.x, self.x_start

    def __call__(self, x, t, t_next, z, x_self_cond, y=None) -> tuple[torch.Tensor, torch.Tensor]:
        self.x.copy_(x)
        if self.diffusion.num_classes:
            self.y.copy_(y) if y is not None else self.y.fill_(self.diffusion.null_class)
        self.t.copy_(t)
        self.t_next.copy_(t_next)
        if self.uses_noise:
            self.z.copy_(z) if z is not None else self.z.zero_()  # DDIM's last step draws none: sigma is 0
        if x_self_cond is not None:
            self.x_start.copy_(x_self_cond)
        return self.captured()


class ChainSteps:
    """One ``ChainStep`` of ``diffusion`` per batch size, sampler and guidance scale, each captured at its first
    use."""

    def __init__(self, diffusion: Diffusion, *, capture: bool = True):
        self.diffusion, self.capture = diffusion, capture
        self.steps: dict[tuple[int, str, float], ChainStep] = {}

    def made(self) -> list[tuple[int, str, float]]:
        """The (batch size, sampler, guidance scale) of every step made so far."""
        return list(self.steps)

    def get(self, batch_size: int, sampler: str, guidance: float = 0.0) -> ChainStep:
        key = (batch_size, sampler, guidance)
        if key not in self.steps:
            d = self.diffusion
            shape = (batch_size, d.channels, d.image_size, d.image_size)
            self.steps[key] = ChainStep(d, shape, sampler=sampler, guidance=guidance, capture=self.capture)
        return self.steps[key]
