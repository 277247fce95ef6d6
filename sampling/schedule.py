"""The cosine noise schedule of Nichol & Dhariwal (2021), as the assignment defines it, and every per-timestep
coefficient that ``diffusion.Diffusion`` keeps as a buffer.

Equation numbers refer to the assignment handout (CMU 10-423 Homework 2, programming section). Timesteps are
0-indexed: entry ``t`` stands for the paper's ``t + 1``, so ``alphas_cumprod[t]`` is alpha_bar_{t+1} and
``alphas_cumprod_prev[0] = 1`` is alpha_bar_0. Everything is computed in float64.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from settings.config import SAMPLERS


def cosine_alphas(timesteps: int, *, s: float = 0.008) -> torch.Tensor:
    """alpha_t of Eq. (16) for paper t = 1 ... T, in float64: clip(alpha_bar_t / alpha_bar_{t-1}, 0.001, 1)."""
    t = torch.arange(timesteps + 1, dtype=torch.float64)
    f = torch.cos((t / timesteps + s) / (1 + s) * math.pi / 2) ** 2
    alphas_bar = f / f[0]  # paper alpha_bar_t = f(t) / f(0), t = 0 ... T
    return (alphas_bar[1:] / alphas_bar[:-1]).clamp(0.001, 1.0)


def extract(a: torch.Tensor, t: torch.Tensor, x_shape: Sequence[int]) -> torch.Tensor:
    """Pick ``a[t]`` for each batch element and shape it [B, 1, 1, ...] to broadcast against ``x_shape``."""
    return a.gather(-1, t).reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


def coefficients(timesteps: int) -> dict[str, torch.Tensor]:
    """Every coefficient of the forward process, the posterior and the samplers for T = ``timesteps``, by the name
    of its math, in float64 [T]."""
    alphas = cosine_alphas(timesteps)  # Eq. (16)
    betas = 1.0 - alphas
    alphas_cumprod = torch.cumprod(alphas, dim=0)  # Eq. (17): alpha_bar_t = prod_{i <= t} alpha_i
    alphas_cumprod_prev = F.pad(alphas_cumprod[:-1], (1, 0), value=1.0)
    # Eq. (18): posterior q(x_{t-1} | x_t, x_0); at paper t = 1 its variance is 0.
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    return {
        "betas": betas,
        "alphas": alphas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas": alphas.sqrt(),
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
        "sqrt_recip_alphas_cumprod": alphas_cumprod.rsqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1.0).sqrt(),
        "posterior_variance": posterior_variance,
        # log(0) at paper t = 1 is replaced by the next step's value, as in improved-diffusion.
        "posterior_log_variance_clipped": torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
        "posterior_mean_coef1": alphas_cumprod_prev.sqrt() * betas / (1.0 - alphas_cumprod),  # multiplies x_0
        "posterior_mean_coef2": alphas.sqrt() * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod),  # x_t
    }


def chain_plan(timesteps: int, sampler: str, *, steps: int | None = None,
               start_t: int | None = None) -> list[tuple[int, int]]:
    """The (from, to) 0-indexed timesteps of a reverse chain over T = ``timesteps``, to = -1 being x_0: DDPM visits
    ``start_t`` (default T-1) down to 0; DDIM ``steps`` (default min(50, T)) evenly spaced timesteps from T-1
    down to 0."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if sampler == "ddpm":
        start_t = timesteps - 1 if start_t is None else start_t
        if not 0 <= start_t < timesteps:
            raise ValueError(f"start_t must be in [0, {timesteps - 1}], got {start_t}")
        return [(i, i - 1) for i in range(start_t, -1, -1)]
    steps = min(50, timesteps) if steps is None else steps
    if not 1 <= steps <= timesteps:
        raise ValueError(f"DDIM steps must be in [1, {timesteps}] (T), got {steps}")
    times = torch.linspace(timesteps - 1, 0, steps, dtype=torch.float64).round().long().tolist()
    return list(zip(times, times[1:] + [-1]))
