"""The package's samplers against diffusers' schedulers, built from the package's betas (needs diffusers, which the
package does not: pip install diffusers).

    python bench/check_samplers.py

The network is linear, eps = c_t x_t with c_t chosen so that the x_0 estimate is 0.2 x_t: it stays inside [-1, 1],
where the package's clamping is idle and diffusers' schedulers (which do not clamp) compute the same chain. Each
row runs both from the same x_T (and, for the SDE, the same noise at each step) over the package's timesteps and
prints the largest difference of the results; diffusers computes in float32, the package here in float64.
DDIM is compared over every timestep (diffusers' DDIM spaces its steps its own way), the ancestral sampler with
DDPMScheduler on the package's timesteps, and DPM-Solver++ likewise with DPMSolverMultistepScheduler.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from diffusion import Diffusion  # noqa: E402
from sampling.samplers import chain_plan  # noqa: E402

T = 50


class Linear(torch.nn.Module):
    """eps = c_t x_t, whose x_0 estimate (x_t - sqrt(1 - abar) eps) / sqrt(abar) is 0.2 x_t."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.alphas_cumprod = alphas_cumprod

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (1 - 0.2 * abar.sqrt()) / (1 - abar).sqrt() * x


def rows():
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    betas = Diffusion(torch.nn.Identity(), image_size=8, timesteps=T).betas.double().numpy()
    yield "ddim", T, DDIMScheduler(num_train_timesteps=T, trained_betas=betas, clip_sample=False, set_alpha_to_one=True)
    for steps in (10, 20):  # DDPM's posterior on the respaced chain (diffusers respaces custom timesteps)
        yield "ancestral", steps, DDPMScheduler(num_train_timesteps=T, trained_betas=betas, clip_sample=False)
    for name, kind in (("dpmpp_2m", "dpmsolver++"), ("dpmpp_2m_sde", "sde-dpmsolver++")):
        for steps in (10, 20):
            scheduler = DPMSolverMultistepScheduler(num_train_timesteps=T, trained_betas=betas, algorithm_type=kind)
            yield name, steps, scheduler


def compare(name: str, steps: int, scheduler) -> float:
    d = Diffusion(torch.nn.Identity(), image_size=8, timesteps=T).double()
    d.model = Linear(d.alphas_cumprod)
    x_T = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.5
    times = [i for i, _ in chain_plan(T, name, steps=steps)]
    if name == "ddim":  # every timestep: diffusers' DDIM steps from t to t - T / steps, which is then t - 1
        scheduler.set_timesteps(steps)
    else:
        scheduler.set_timesteps(timesteps=times)
    assert [int(t) for t in scheduler.timesteps] == times
    ours = d.run_chain(x_T.clone(), sampler=name, steps=steps, generator=torch.Generator().manual_seed(7)) * 2 - 1
    noise, x = torch.Generator().manual_seed(7), x_T.clone()
    for k, t in enumerate(times):
        eps = d.model(x, torch.full((len(x),), t))
        if name == "ddim":
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
        elif name == "ancestral":  # diffusers draws the step's noise itself, from the same stream
            x = scheduler.step(eps, t, x, generator=noise).prev_sample
        else:  # the package draws a step's noise unless it lands on x_0
            noisy = name.endswith("sde") and k < len(times) - 1
            z = torch.randn(x.shape, dtype=x.dtype, generator=noise) if noisy else None
            x = scheduler.step(eps, t, x, variance_noise=z).prev_sample
    return (ours - x.clamp(-1, 1)).abs().max().item()


def main() -> int:
    try:
        import diffusers
    except ImportError:
        raise SystemExit("this check needs diffusers: pip install diffusers") from None
    print(f"diffusers {diffusers.__version__}, torch {torch.__version__}")
    for name, steps, scheduler in rows():
        print(f"{name:>13}, {steps:>2} steps: largest difference {compare(name, steps, scheduler):.1e} "
              f"(against {type(scheduler).__name__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
