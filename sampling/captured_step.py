"""The reverse chain's step on static tensors, captured in a CUDA graph: one per batch size, sampler and guidance
scale, replayed at every step of every chain of that shape. The noise stays drawn by ``Diffusion.run_chain``, so
the images are the eager chain's own.
"""
from __future__ import annotations

import torch

from diffusion import Diffusion
from runtime.graphs import Captured
from sampling.samplers import sampler_named


class ChainStep:
    """One reverse step of ``sampler`` (its step in ``samplers.SAMPLERS``) for batches of ``shape``, on static tensors:
    each call copies its inputs in, replays the captured step and returns the static outputs (x at the next
    timestep, and the x_0 estimate). Pass it as ``step`` to ``Diffusion.run_chain``; the noise stays drawn by
    the loop, so the images are the eager chain's own. A class-conditional model's labels are copied in like the
    other inputs; its guidance scale is part of the captured step."""

    def __init__(self, diffusion: Diffusion, shape: tuple[int, ...], *, sampler: str, eta: float = 0.0,
                 guidance: float = 0.0, capture: bool = True):
        self.diffusion, self.eta, self.guidance = diffusion, eta, guidance
        self.sampler = sampler_named(sampler)
        self.uses_noise = self.sampler.stochastic(eta)
        device = diffusion.device
        self.x = torch.zeros(shape, device=device)  # the chain's state x_t
        self.x_start = torch.zeros(shape, device=device)  # the previous step's x_0 estimate
        self.t_prev = torch.zeros(shape[0], dtype=torch.long, device=device)  # where it was made
        self.z = torch.zeros(shape, device=device)  # the step's noise
        self.t = torch.zeros(shape[0], dtype=torch.long, device=device)
        self.t_next = torch.zeros(shape[0], dtype=torch.long, device=device)
        self.y = torch.full((shape[0],), diffusion.null_class, dtype=torch.long, device=device)  # the labels
        self.captured = Captured(self._body, device, warmup=1, capture=capture)

    def _body(self) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.y if self.diffusion.num_classes else None
        x, x_start = self.sampler.step(self.diffusion, self.x, self.t, self.t_next,
                                       self.z if self.uses_noise else None, self.x_start, t_prev=self.t_prev, y=y,
                                       guidance=self.guidance, eta=self.eta)
        self.x.copy_(x)
        self.x_start.copy_(x_start)
        return self.x, self.x_start

    def __call__(self, x, t, t_next, z, x_prev, t_prev, y=None) -> tuple[torch.Tensor, torch.Tensor]:
        self.x.copy_(x)
        if self.diffusion.num_classes:
            self.y.copy_(y) if y is not None else self.y.fill_(self.diffusion.null_class)
        self.t.copy_(t)
        self.t_next.copy_(t_next)
        if self.uses_noise:
            self.z.copy_(z) if z is not None else self.z.zero_()  # DDIM's last step draws none: sigma is 0
        self.x_start.copy_(x_prev)
        self.t_prev.copy_(t_prev)
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
