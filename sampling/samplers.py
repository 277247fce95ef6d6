"""The samplers: one reverse step each, over one signature, behind one table of names.

Every sampler runs in the one loop of ``Diffusion.run_chain``, which visits the (from, to) timesteps of a plan
(``chain_plan``), draws each step's noise and calls the sampler's step:

    step(diffusion, x, t, t_next, z, x_prev, *, t_prev, y=None, guidance=0.0, eta=0.0) -> (x_next, x_start)

``x`` is the chain's state at the 0-indexed timesteps ``t`` ([B] long), ``t_next`` where the step lands (-1 is
x_0), ``z`` the step's N(0, I) noise (None where the sampler adds none: at the last step, or a deterministic
sampler; a zero tensor must act as None, as a captured CUDA graph hands zeros). ``x_prev`` is the previous step's
clamped x_0 estimate, made at ``t_prev`` (zeros, and ``t_prev`` = ``t``, at the first step: no estimate yet); it
is a self-conditioned network's input, and a multistep sampler's history. ``y`` and ``guidance`` are the class
labels and guidance scale of ``Diffusion.predict_noise``, ``eta`` DDIM's noise level. It returns the next state
and the clamped x_0 estimate. All of it is tensor arithmetic without host reads, so a CUDA graph can hold it.

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


def ddpm_step(diffusion, x, t, t_next, z, x_prev, *, t_prev=None, y=None, guidance=0.0, eta=0.0):
    """Algorithm 2, lines 4 to 9, from t to t - 1 (``t_next``): the posterior mean of Eq. (18) at the clamped x_0
    estimate, plus the posterior's standard deviation times ``z``."""
    return diffusion.reverse_step(x, t, z, x_prev, y, guidance)


def ddim_step(diffusion, x, t, t_next, z, x_prev, *, t_prev=None, y=None, guidance=0.0, eta=0.0):
    """DDIM (Song et al. 2021, Eq. 12) from t to ``t_next``, any distance apart: x_0 estimated and clamped, the noise
    recomputed from the clamped estimate, sigma * ``z`` added when eta > 0 (sigma of their Eq. 16)."""
    abar, abar_next = diffusion.alpha_bar(t, x.shape), diffusion.alpha_bar(t_next, x.shape)
    sigma = eta * ((1 - abar_next) / (1 - abar) * (1 - abar / abar_next)).sqrt()
    x_start = diffusion.predict_start(x, t, x_prev, y, guidance)
    eps = (x - abar.sqrt() * x_start) / (1.0 - abar).sqrt()
    x = abar_next.sqrt() * x_start + (1 - abar_next - sigma ** 2).clamp(min=0).sqrt() * eps
    return (x if z is None else x + sigma * z), x_start


def ancestral_step(diffusion, x, t, t_next, z, x_prev, *, t_prev=None, y=None, guidance=0.0, eta=0.0):
    """DDPM's ancestral step from t to ``t_next``, any distance apart: a draw from the posterior q(x_t' | x_t, x_0)
    of the chain respaced onto the visited timesteps (beta' = 1 - alpha-bar_t / alpha-bar_t'; Nichol & Dhariwal
    2021, Sec. 4) at the clamped x_0 estimate. It is DDIM at eta = 1 (Song et al. 2021, Eq. 16), and ``ddpm_step``
    where t' = t - 1."""
    return ddim_step(diffusion, x, t, t_next, z, x_prev, t_prev=t_prev, y=y, guidance=guidance, eta=1.0)


def _dpm_solver_pp_2m(diffusion, x, t, t_next, z, x_prev, t_prev, y, guidance, *, noise: bool):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), and with ``noise`` its SDE variant (their Eq. 18's second
    order, the midpoint form), on the clamped x_0 estimate. In log-SNR time lambda = log(alpha / sigma), with
    h = lambda' - lambda and the previous estimate's r = h_last / h:

        D = x_0 + (x_0 - x_prev) / (2 r)                       (first order, D = x_0: no estimate yet, or t' is x_0)
        ODE: x' = (sigma' / sigma) x + alpha' (1 - e^-h) D
        SDE: x' = (sigma' / sigma) e^-h x + alpha' (1 - e^-2h) D + sigma' sqrt(1 - e^-2h) z

    e^-h is computed as the ratio of sigma / alpha at t' and at t, so that the last step (sigma' = 0) is finite."""
    abar, abar_next = diffusion.alpha_bar(t, x.shape), diffusion.alpha_bar(t_next, x.shape)
    abar_prev = diffusion.alpha_bar(t_prev, x.shape)
    ratio = lambda a: ((1 - a) / a).sqrt()  # noqa: E731  sigma / alpha = e^-lambda
    x_start = diffusion.predict_start(x, t, x_prev, y, guidance)
    last, first = (t_next < 0).view(-1, 1, 1, 1), (t_prev == t).view(-1, 1, 1, 1)
    decay = ratio(abar_next) / ratio(abar)  # e^-h
    h = -torch.log(torch.where(last, torch.full_like(decay, 0.5), decay))  # any finite value where t' is x_0
    h_last = torch.log(ratio(abar_prev) / ratio(abar))
    r = torch.where(first | last, torch.ones_like(h), h_last / h)
    d = torch.where(first | last, x_start, x_start + (x_start - x_prev) / (2 * r))
    sigma, sigma_next, alpha_next = (1 - abar).sqrt(), (1 - abar_next).sqrt(), abar_next.sqrt()
    if not noise:
        return (sigma_next / sigma) * x + alpha_next * (1 - decay) * d, x_start
    x = (sigma_next / sigma) * decay * x + alpha_next * (1 - decay ** 2) * d
    return (x if z is None else x + sigma_next * (1 - decay ** 2).sqrt() * z), x_start


def dpmpp_2m_step(diffusion, x, t, t_next, z, x_prev, *, t_prev, y=None, guidance=0.0, eta=0.0):
    """DPM-Solver++(2M): the probability-flow ODE, second order from the previous step's estimate."""
    return _dpm_solver_pp_2m(diffusion, x, t, t_next, z, x_prev, t_prev, y, guidance, noise=False)


def dpmpp_2m_sde_step(diffusion, x, t, t_next, z, x_prev, *, t_prev, y=None, guidance=0.0, eta=0.0):
    """DPM-Solver++(2M) SDE: the reverse SDE, second order from the previous step's estimate, fresh noise each step."""
    return _dpm_solver_pp_2m(diffusion, x, t, t_next, z, x_prev, t_prev, y, guidance, noise=True)


# The steps of a sampler that does not visit every timestep, unless asked (or T where T is fewer); chosen by
# measurement, docs/sampling.md.
DEFAULT_STEPS = 10

SAMPLERS: dict[str, Sampler] = {
    "ancestral": Sampler(ancestral_step, stochastic=lambda eta: True),
    "ddpm": Sampler(ddpm_step, stochastic=lambda eta: True, every_timestep=True),
    "ddim": Sampler(ddim_step, stochastic=lambda eta: eta > 0),
    "dpmpp_2m": Sampler(dpmpp_2m_step, stochastic=lambda eta: False),
    "dpmpp_2m_sde": Sampler(dpmpp_2m_sde_step, stochastic=lambda eta: True),
}


def sampler_named(name: str) -> Sampler:
    """The entry of ``SAMPLERS`` called ``name``; ValueError naming the choices otherwise."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {tuple(SAMPLERS)}, got {name!r}")
    return SAMPLERS[name]


def chain_plan(timesteps: int, sampler: str, *, steps: int | None = None,
               start_t: int | None = None) -> list[tuple[int, int]]:
    """The (from, to) 0-indexed timesteps of a reverse chain over T = ``timesteps``, to = -1 being x_0: ``steps``
    (default min(``DEFAULT_STEPS``, T); T for a sampler that visits every timestep) evenly spaced timesteps from
    T-1 down to 0, those above ``start_t`` (default T-1) left out."""
    if sampler_named(sampler).every_timestep:
        steps = timesteps
    steps = min(DEFAULT_STEPS, timesteps) if steps is None else steps
    if not 1 <= steps <= timesteps:
        raise ValueError(f"{sampler.upper()} steps must be in [1, {timesteps}] (T), got {steps}")
    start_t = timesteps - 1 if start_t is None else start_t
    if not 0 <= start_t < timesteps:
        raise ValueError(f"start_t must be in [0, {timesteps - 1}], got {start_t}")
    times = torch.linspace(timesteps - 1, 0, steps, dtype=torch.float64).round().long().tolist()
    return [(i, j) for i, j in zip(times, times[1:] + [-1]) if i <= start_t]
