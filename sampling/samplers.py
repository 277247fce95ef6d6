"""The samplers: one reverse step each, over one signature, behind one table of names.

Every sampler runs in the one loop of ``Diffusion.run_chain``, which visits the (from, to) timesteps of a plan
(``chain_plan``), draws each step's noise and calls the sampler's step:

    step(diffusion, x, t, t_next, z, x_self_cond, *, y=None, guidance=0.0, eta=0.0) -> (x_next, x_start)

``x`` is the chain's state at the 0-indexed timesteps ``t`` ([B] long), ``t_next`` where the step lands (-1 is
x_0), ``z`` the step's N(0, I) noise (None where the sampler adds none: at the last step, or a deterministic
sampler; a zero tensor must act as None, as a captured CUDA graph hands zeros), ``x_self_cond`` the previous
step's x_0 estimate (zeros at the first step), ``y`` and ``guidance`` the class labels and guidance scale of
``Diffusion.predict_noise``, ``eta`` DDIM's noise level. It returns the next state and the clamped x_0 estimate.

A step uses only ``Diffusion``'s public mathematics (``predict_start``, ``alpha_bar``, ``reverse_step``), so a new
sampler is one function here and one entry in ``SAMPLERS``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampler:
    """A sampler's step, whether its steps add noise (for a given eta), and whether it must visit every timestep
    (then its chain has T steps whatever step count is asked)."""

    step: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    stochastic: Callable[[float], bool]
    every_timestep: bool = False


def ddpm_step(diffusion, x, t, t_next, z, x_self_cond, *, y=None, guidance=0.0, eta=0.0):
    """Algorithm 2, lines 4 to 9, from t to t - 1 (``t_next``): the posterior mean of Eq. (18) at the clamped x_0
    estimate, plus the posterior's standard deviation times ``z``."""
    return diffusion.reverse_step(x, t, z, x_self_cond, y, guidance)


def ddim_step(diffusion, x, t, t_next, z, x_self_cond, *, y=None, guidance=0.0, eta=0.0):
    """DDIM (Song et al. 2021, Eq. 12) from t to ``t_next``, any distance apart: x_0 estimated and clamped, the noise
    recomputed from the clamped estimate, sigma * ``z`` added when eta > 0 (sigma of their Eq. 16)."""
    abar, abar_next = diffusion.alpha_bar(t, x.shape), diffusion.alpha_bar(t_next, x.shape)
    sigma = eta * ((1 - abar_next) / (1 - abar) * (1 - abar / abar_next)).sqrt()
    x_start = diffusion.predict_start(x, t, x_self_cond, y, guidance)
    eps = (x - abar.sqrt() * x_start) / (1.0 - abar).sqrt()
    x = abar_next.sqrt() * x_start + (1 - abar_next - sigma ** 2).clamp(min=0).sqrt() * eps
    return (x if z is None else x + sigma * z), x_start


SAMPLERS: dict[str, Sampler] = {
    "ddpm": Sampler(ddpm_step, stochastic=lambda eta: True, every_timestep=True),
    "ddim": Sampler(ddim_step, stochastic=lambda eta: eta > 0),
}


def sampler_named(name: str) -> Sampler:
    """The entry of ``SAMPLERS`` called ``name``; ValueError naming the choices otherwise."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {tuple(SAMPLERS)}, got {name!r}")
    return SAMPLERS[name]


def chain_plan(timesteps: int, sampler: str, *, steps: int | None = None,
               start_t: int | None = None) -> list[tuple[int, int]]:
    """The (from, to) 0-indexed timesteps of a reverse chain over T = ``timesteps``, to = -1 being x_0: ``steps``
    (default min(50, T); T for a sampler that visits every timestep) evenly spaced timesteps from T-1 down to 0,
    those above ``start_t`` (default T-1) left out."""
    if sampler_named(sampler).every_timestep:
        steps = timesteps
    steps = min(50, timesteps) if steps is None else steps
    if not 1 <= steps <= timesteps:
        raise ValueError(f"{sampler.upper()} steps must be in [1, {timesteps}] (T), got {steps}")
    start_t = timesteps - 1 if start_t is None else start_t
    if not 0 <= start_t < timesteps:
        raise ValueError(f"start_t must be in [0, {timesteps - 1}], got {start_t}")
    times = torch.linspace(timesteps - 1, 0, steps, dtype=torch.float64).round().long().tolist()
    return [(i, j) for i, j in zip(times, times[1:] + [-1]) if i <= start_t]
