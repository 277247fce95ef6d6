"""The reverse chain with every step replayed from one captured CUDA graph: sampling as fast as training.

A reverse step at the recommended size is, like a training step, a few hundred small kernels that a GPU runs
faster than Python launches them. ``ChainGraph`` holds one step of the DDPM chain (``Diffusion.reverse_step``)
or of DDIM (``Diffusion.ddim_step``, eta = 0) for one batch shape, reading static tensors: the chain's state,
the timestep, the step's noise or DDIM's coefficients, and the previous x_0 estimate of a self-conditioned
network. Each step refills those and replays the graph. The noise is drawn outside the graph, from the
caller's generator in the eager loops' order, so the images are the eager loops' own.

With ``capture=False`` the same static-tensor step runs eagerly: what the tests check on a CPU.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from diffusion import Diffusion, unnormalize
from train_step import Captured


class ChainGraph:
    """The reverse chain for batches of ``shape`` with ``sampler`` ("ddpm", or "ddim" over ``steps``)."""

    def __init__(self, diffusion: Diffusion, shape: tuple[int, ...], *, sampler: str = "ddpm", steps: int = 50,
                 capture: bool = True):
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
        self.diffusion, self.shape, self.sampler = diffusion, tuple(shape), sampler
        self.pairs = diffusion.ddim_pairs(steps) if sampler == "ddim" else []
        device = diffusion.device
        self.x = torch.zeros(self.shape, device=device)  # the chain's state x_t
        self.x_start = torch.zeros(self.shape, device=device)  # the previous step's x_0 estimate
        self.z = torch.zeros(self.shape, device=device)  # the step's noise (DDPM)
        self.t = torch.zeros(self.shape[0], dtype=torch.long, device=device)
        self.abar, self.abar_next = torch.ones((), device=device), torch.ones((), device=device)  # DDIM
        self.sigma = torch.zeros((), device=device)  # DDIM's noise scale: 0, the deterministic sampler
        self._captured = Captured(self._body, device, warmup=1) if capture else None

    def _body(self) -> None:
        """One reverse step on the static tensors, in place: what the graph holds."""
        d = self.diffusion
        estimate = self.x_start if d.self_condition else None
        if self.sampler == "ddpm":
            x, x_start = d.reverse_step(self.x, self.t, self.z, estimate)
        else:
            x, x_start = d.ddim_step(self.x, self.t, estimate, self.abar, self.abar_next, self.sigma)
        self.x.copy_(x)
        self.x_start.copy_(x_start)

    def _step(self) -> None:
        """Run ``_body`` once: eagerly, or on CUDA once on a side stream, then captured, then replayed."""
        (self._captured or self._body)()

    @torch.no_grad()
    def run(self, x: torch.Tensor, *, start_t: int | None = None, return_steps: Iterable[int] = (),
            generator: torch.Generator | None = None) -> torch.Tensor | tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The chain from ``x`` ([B, C, H, W] at 0-indexed ``start_t``, default T-1), as ``p_sample_loop`` or
        (DDIM, from T-1 only) ``ddim_sample`` runs it; images in [0, 1], with ``return_steps`` as there."""
        d = self.diffusion
        self.x.copy_(x)
        self.x_start.zero_()  # the first step has no estimate yet
        wanted, intermediates = set(return_steps), {}
        if self.sampler == "ddpm":
            start_t = d.num_timesteps - 1 if start_t is None else start_t
            for i in range(start_t, -1, -1):
                if i in wanted:
                    intermediates[i] = unnormalize(self.x)
                self.t.fill_(i)
                self.z.copy_(d.step_noise(self.x, i, generator))
                self._step()
        else:
            for i, j in self.pairs:
                self.t.fill_(i)
                self.abar.copy_(d.alphas_cumprod[i])
                self.abar_next.copy_(d.alphas_cumprod[j] if j >= 0 else torch.ones(()))
                self._step()
        images = unnormalize(self.x)
        return (images, intermediates) if wanted else images

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """New images in [0, 1] from x_T ~ N(0, I), as ``Diffusion.sample`` draws them."""
        return self.run(torch.randn(self.shape, device=self.x.device, generator=generator), generator=generator)


class ChainGraphs:
    """One ``ChainGraph`` of ``diffusion`` per batch size and sampler, each captured at its first use."""

    def __init__(self, diffusion: Diffusion, *, steps: int, capture: bool = True):
        self.diffusion, self.steps, self.capture = diffusion, steps, capture
        self._chains: dict[tuple[int, str], ChainGraph] = {}

    def get(self, batch_size: int, sampler: str) -> ChainGraph:
        key = (batch_size, sampler)
        if key not in self._chains:
            d = self.diffusion
            shape = (batch_size, d.channels, d.image_size, d.image_size)
            self._chains[key] = ChainGraph(d, shape, sampler=sampler, steps=self.steps, capture=self.capture)
        return self._chains[key]
