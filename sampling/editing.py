"""Editing images with a trained model: inpainting and image-to-image, on the reverse chain of either sampler.

Both start from real images x_0 (in [-1, 1]) and run the model's one reverse chain, ``Diffusion.run_chain``, on
any sampler of ``samplers.SAMPLERS``; this module only chooses where the chain starts and what it merges:

- **Inpainting** (``keep``: 1 where a pixel is kept, 0 where it is filled). After each reverse step t -> t' the
  kept pixels are replaced by the real image noised to t' (``q_sample``), so the chain fills the hole around
  them; the output keeps the input's pixels exactly where ``keep`` is 1. With ``resample`` U > 1, each step is
  repeated U times, the merged x_{t'} being noised back to t in between (q(x_t | x_t'), one forward jump), as
  RePaint does (Lugmayr et al. 2022): the model's part then has U chances to agree with the kept part, at U
  times the cost. U = 1 is plain replacement. With ``kept_guidance`` zeta > 0, each step is also pulled towards
  agreeing with the kept pixels, as diffusion posterior sampling does (Chung et al. 2023, their Algorithm 1): x_t'
  moves by -zeta times the gradient, with respect to x_t, of the distance ||keep * (x_0 - x_0 estimate)|| over
  the kept pixels. Replacement shows the model the kept pixels only through the noise; the pull tells it, through
  the network, which content of the hole makes its estimate of them right. It costs one backward pass through the
  network per step, and acts only with resampling (U > 1): on plain replacement it lowers the fill's agreement
  with the kept pixels instead (docs/editing.md).
- **Candidates**: inpainting with ``candidates`` K > 1 fills each image K times and returns the fill nearest the
  other K - 1 (least summed distance after a Gaussian blur of a sixteenth of the side, so that strokes a
  pixel or two apart count as alike): the consensus, a minimum-Bayes-risk choice among samples. One fill is a
  draw from the completions the model finds likely; the consensus is the completion most of its draws agree on,
  at K times the cost.
- **Image-to-image** (SDEdit, Meng et al. 2022) at strength s in [0, 1]: x_0 noised to the chain's step s * T
  and denoised from there, optionally towards a class (a class-conditional model's ``classes`` and
  ``guidance``). s = 0 returns the input; s = 1 starts from pure noise, the same draw as plain sampling.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from diffusion import Diffusion
from sampling.samplers import chain_plan


def pull_applies(kept_guidance: float, resample: int) -> bool:
    """Whether inpainting pulls its steps towards the kept pixels: a positive scale, on resampled steps only."""
    return kept_guidance > 0 and resample > 1


def pulled_to_kept(step, x0: torch.Tensor, keep: torch.Tensor, scale: float):
    """``step`` (``Diffusion.run_chain``'s signature) followed by diffusion posterior sampling's pull: x at t' moves
    by -``scale`` times the gradient, with respect to x at t, of each image's distance between ``x0`` and the step's
    x_0 estimate over the ``keep`` pixels. Not at the last step, which returns the image itself."""
    def step_and_pull(x, t, t_next, z, x_prev, t_prev, y):
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            x_next, x_start = step(x_in, t, t_next, z, x_prev, t_prev, y)
            distance = (keep * (x0 - x_start.float())).flatten(1).norm(dim=1).sum()
            (gradient,) = torch.autograd.grad(distance, x_in)
        last = (t_next < 0).view(-1, *([1] * (x.dim() - 1)))
        return torch.where(last, x_next.detach(), x_next.detach() - scale * gradient), x_start.detach()
    return step_and_pull


def start_of(diffusion: Diffusion, strength: float, plan: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The part of ``plan`` that image-to-image at ``strength`` runs: the steps from timestep ``strength * T - 1``
    down (none for 0, all for 1)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    first = round(strength * diffusion.num_timesteps) - 1
    return [(i, j) for i, j in plan if i <= first]


def consensus(candidates: torch.Tensor) -> torch.Tensor:
    """The index, for each image, of its candidate nearest the others: ``candidates`` [B, K, C, S, S] -> [B], each
    candidate's summed Euclidean distance to the others, compared in fp32 after a Gaussian blur of sigma S / 16.
    With K = 2 both are equally near, and the first is returned."""
    from torchvision.transforms.functional import gaussian_blur  # torchvision only where it is used

    batch, k = candidates.shape[:2]
    sigma = candidates.shape[-1] / 16
    radius = min(math.ceil(3 * sigma), candidates.shape[-1] - 1)  # reflect padding needs a kernel below the side
    with torch.autocast(candidates.device.type, enabled=False):
        blurred = gaussian_blur(candidates.flatten(0, 1).float(), [2 * radius + 1] * 2, [sigma] * 2)
        flat = blurred.view(batch, k, -1)
        return torch.cdist(flat, flat).sum(dim=2).argmin(dim=1)


@torch.no_grad()
def edit(diffusion: Diffusion, images: torch.Tensor, *, keep: torch.Tensor | None = None, strength: float = 1.0,
         resample: int = 1, sampler: str = "ddpm", steps: int | None = None, eta: float = 0.0,
         generator: torch.Generator | None = None, classes: torch.Tensor | None = None, guidance: float = 0.0,
         kept_guidance: float = 0.0, candidates: int = 1, step=None,
         progress: Callable[[float], None] | None = None) -> torch.Tensor:
    """Inpaint (``keep`` given) or redraw at ``strength`` the ``images`` ([B, C, S, S] in [0, 1]); returns images
    in [0, 1]. ``sampler``, ``steps``, ``eta``, ``classes``, ``guidance``, ``step`` and ``progress`` as in
    ``Diffusion.run_chain``; ``kept_guidance`` and ``candidates`` as above (inpainting only; the pull with
    ``resample`` > 1 only, and ``step`` must then be eager, not a captured graph; ``step`` runs batches of
    B * ``candidates``). A mask-conditional model inpaints seeing the kept pixels at every step
    (``Diffusion.seeing``), with its own steps in place of ``step``."""
    if resample < 1:
        raise ValueError(f"resample must be at least 1, got {resample}")
    if kept_guidance < 0:
        raise ValueError(f"kept_guidance must be non-negative, got {kept_guidance}")
    if candidates < 1 or (candidates > 1 and keep is None):
        raise ValueError(f"candidates must be at least 1, and 1 for image-to-image, got {candidates}")
    if candidates > 1:  # every image K times in a row, its best fill chosen after the chain
        batch = len(images)
        filled = edit(diffusion, images.repeat_interleave(candidates, dim=0),
                      keep=keep.expand_as(images).repeat_interleave(candidates, dim=0),
                      resample=resample, sampler=sampler, steps=steps, eta=eta, generator=generator,
                      classes=None if classes is None else classes.repeat_interleave(candidates, dim=0),
                      guidance=guidance, kept_guidance=kept_guidance, step=step, progress=progress)
        filled = filled.view(batch, candidates, *filled.shape[1:])
        return filled[torch.arange(batch, device=filled.device), consensus(filled)]
    x0 = images.to(diffusion.device, torch.float32) * 2 - 1
    plan = chain_plan(diffusion.num_timesteps, sampler, steps=steps)
    if keep is None:
        plan = start_of(diffusion, strength, plan)
    else:
        keep = keep.to(x0.device, x0.dtype).expand_as(x0)
    if not plan:
        return images.clone()
    x = torch.randn(x0.shape, device=x0.device, generator=generator)  # as Diffusion.sample draws x_T
    first = plan[0][0]
    if keep is None and first < diffusion.num_timesteps - 1:
        x = diffusion.q_sample(x0, torch.full((len(x0),), first, device=x0.device, dtype=torch.long), x)

    def merge(x: torch.Tensor, j: int) -> torch.Tensor:
        """The kept pixels of x_0 noised to t' = ``j`` (x_0 itself at the end), the chain's elsewhere."""
        known = x0 if j < 0 else diffusion.q_sample(x0, torch.full((len(x0),), j, device=x0.device, dtype=torch.long),
                                                      torch.randn(x.shape, device=x.device, generator=generator))
        return keep * known + (1 - keep) * x

    if keep is not None and diffusion.mask_conditional:  # its steps see the kept pixels: its own, eager ones
        diffusion, step = diffusion.seeing(x0, keep), None
    if keep is not None and pull_applies(kept_guidance, resample):
        step = pulled_to_kept(step or diffusion.sampler_step(sampler, guidance=guidance, eta=eta), x0, keep,
                              kept_guidance)
    out = diffusion.run_chain(x, sampler=sampler, plan=plan, eta=eta, generator=generator, classes=classes,
                              guidance=guidance, step=step, merge=None if keep is None else merge,
                              resample=resample, progress=progress).float()
    return out if keep is None else torch.where(keep.bool(), images.to(out.device, torch.float32), out)
