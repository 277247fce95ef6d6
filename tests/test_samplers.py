"""The samplers against independent implementations, in float64 on a small network with weights that make every
layer matter: DDIM at eta = 1 over every timestep is DDPM; the ancestral sampler is DDPM on the respaced chain;
DDIM at eta = 0 is Euler's method on the probability flow ODE in the variance-exploding form (x / alpha against
sigma / alpha, as k-diffusion writes its samplers); DPM-Solver++(2M) and its SDE variant match their
variance-exploding forms step for step, with the same noise."""
from __future__ import annotations

import math

import pytest
import torch

from diffusion import coefficients
from helpers import tiny_diffusion
from sampling.samplers import SAMPLERS, chain_plan

T = 12


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "self-conditioned"])
def model(request):
    torch.manual_seed(0)
    d = tiny_diffusion(T=T, self_condition=request.param)
    for p in d.model.parameters():  # an untrained U-Net predicts zeros; these weights make every layer matter
        torch.nn.init.normal_(p, std=0.2) if p.dim() > 1 else None
    d = d.double().eval()
    for name, value in coefficients(T).items():  # the schedule itself in float64, not its float32 buffers
        getattr(d, name).copy_(value)
    return d


def start(seed: int = 3) -> torch.Tensor:
    return torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def ve_sigma(d, t: int) -> float:
    """sigma / alpha at 0-indexed t (0 at x_0, t = -1): the noise level of the variance-exploding form."""
    abar = 1.0 if t < 0 else float(d.alphas_cumprod[t])
    return math.sqrt((1 - abar) / abar)


def denoised(d, x_ve: torch.Tensor, t: int, previous: torch.Tensor) -> torch.Tensor:
    """The network's clamped x_0 estimate at x = alpha x_ve (previous: a self-conditioned network's input)."""
    alpha = math.sqrt(float(d.alphas_cumprod[t]))
    return d.predict_start(alpha * x_ve, torch.full((len(x_ve),), t), previous)


def test_ddim_at_eta_1_over_every_timestep_is_ddpm(model):
    """The same x_T and the same noise at each step: DDIM's sigma at eta = 1 is the posterior's, and its mean from
    the recomputed noise is Eq. (18)'s."""
    ddpm = model.run_chain(start(), sampler="ddpm", generator=torch.Generator().manual_seed(5))
    ddim = model.run_chain(start(), sampler="ddim", steps=T, eta=1.0, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ddim, ddpm, rtol=0, atol=1e-10)


@pytest.mark.parametrize("steps", [T, 4])
def test_ddim_at_eta_0_is_euler_on_the_probability_flow(model, steps):
    x_ve, previous = start() / math.sqrt(float(model.alphas_cumprod[-1])), torch.zeros(3, 3, 16, 16).double()
    for i, j in chain_plan(T, "ddim", steps=steps):
        estimate = denoised(model, x_ve, i, previous)
        slope = (x_ve - estimate) / ve_sigma(model, i)  # dx/dsigma
        x_ve, previous = x_ve + slope * (ve_sigma(model, j) - ve_sigma(model, i)), estimate
    expected = ((x_ve + 1) / 2).clamp(0, 1)  # at sigma = 0, x_ve is x_0
    torch.testing.assert_close(model.run_chain(start(), sampler="ddim", steps=steps), expected, rtol=0, atol=1e-10)


def respaced_ddpm(model, steps: int, noise: torch.Generator) -> torch.Tensor:
    """Algorithm 2 on the chain respaced onto the visited timesteps (Nichol & Dhariwal 2021, Sec. 4): each pair
    t > t' gets beta' = 1 - abar_t / abar_t', and the step draws from that chain's posterior, Eq. (18) and (19)
    with beta' in place of beta_t."""
    x, previous = start(), torch.zeros(3, 3, 16, 16).double()
    for i, j in chain_plan(T, "ancestral", steps=steps):
        abar, abar_next = float(model.alphas_cumprod[i]), 1.0 if j < 0 else float(model.alphas_cumprod[j])
        beta = 1 - abar / abar_next
        estimate = model.predict_start(x, torch.full((len(x),), i), previous)
        mean = (math.sqrt(abar_next) * beta * estimate + math.sqrt(1 - beta) * (1 - abar_next) * x) / (1 - abar)
        x, previous = mean, estimate
        if j >= 0:
            x = mean + math.sqrt(beta * (1 - abar_next) / (1 - abar)) * torch.randn(
                x.shape, dtype=x.dtype, generator=noise)
    return ((x + 1) / 2).clamp(0, 1)


@pytest.mark.parametrize("steps", [T, 5, 2])
def test_ancestral_is_ddpm_on_the_respaced_chain(model, steps):
    got = model.run_chain(start(), sampler="ancestral", steps=steps, generator=torch.Generator().manual_seed(7))
    expected = respaced_ddpm(model, steps, torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    if steps == T:  # over every timestep it is the assignment's chain itself
        ddpm = model.run_chain(start(), sampler="ddpm", generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(got, ddpm, rtol=0, atol=1e-10)


def dpm_solver_pp_2m_ve(model, steps: int, *, noise: torch.Generator | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) in the variance-exploding form, in time s = -log sigma (the SDE variant with ``noise``):
    the first step and the step onto x_0 of first order."""
    x_ve, previous, before = start() / math.sqrt(float(model.alphas_cumprod[-1])), None, None
    estimate_in = torch.zeros(3, 3, 16, 16).double()
    for i, j in chain_plan(T, "dpmpp_2m", steps=steps):
        estimate = denoised(model, x_ve, i, estimate_in)
        sigma, sigma_next = ve_sigma(model, i), ve_sigma(model, j)
        if sigma_next == 0:
            x_ve = estimate
        else:
            h = math.log(sigma / sigma_next)
            d = estimate
            if previous is not None:
                r = math.log(ve_sigma(model, before) / sigma) / h
                d = (1 + 1 / (2 * r)) * estimate - previous / (2 * r)
            if noise is None:
                x_ve = (sigma_next / sigma) * x_ve - math.expm1(-h) * d
            else:
                z = torch.randn(x_ve.shape, dtype=x_ve.dtype, generator=noise)
                x_ve = ((sigma_next / sigma) * math.exp(-h) * x_ve - math.expm1(-2 * h) * d
                        + sigma_next * math.sqrt(-math.expm1(-2 * h)) * z)
        previous, before, estimate_in = estimate, i, estimate
    return ((x_ve + 1) / 2).clamp(0, 1)


@pytest.mark.parametrize("steps", [T, 5])
def test_dpm_solver_pp_2m_matches_its_variance_exploding_form(model, steps):
    got = model.run_chain(start(), sampler="dpmpp_2m", steps=steps)
    torch.testing.assert_close(got, dpm_solver_pp_2m_ve(model, steps), rtol=0, atol=1e-10)


@pytest.mark.parametrize("steps", [T, 5])
def test_dpm_solver_pp_2m_sde_matches_its_variance_exploding_form(model, steps):
    # one generator draws each step's noise, in the same order in both
    got = model.run_chain(start(), sampler="dpmpp_2m_sde", steps=steps, generator=torch.Generator().manual_seed(9))
    noise = torch.Generator().manual_seed(9)
    torch.testing.assert_close(got, dpm_solver_pp_2m_ve(model, steps, noise=noise), rtol=0, atol=1e-10)


def test_every_sampler_adds_no_noise_onto_x_0_and_reaches_the_data_point_of_an_oracle():
    """An oracle network that knows x_0: every sampler at every step count ends exactly at it."""
    x_start = torch.rand(1, 3, 16, 16) * 2 - 1

    class Oracle(torch.nn.Module):
        def forward(self, x_t, t):
            abar = oracle.alphas_cumprod[t].view(-1, 1, 1, 1)
            return (x_t - abar.sqrt() * x_start) / (1 - abar).sqrt()

    oracle = tiny_diffusion(T=T)
    oracle.model = Oracle()
    for name in SAMPLERS:
        for steps in (2, 5, T):
            images = oracle.sample(2, sampler=name, steps=steps, generator=torch.Generator().manual_seed(1))
            torch.testing.assert_close(images, ((x_start + 1) / 2).expand(2, -1, -1, -1), rtol=0, atol=1e-4)
