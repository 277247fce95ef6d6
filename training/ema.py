"""The exponential moving average (EMA) of the weights that samples, figures and FID use.

After optimizer step ``step`` (0-indexed), ``ema += (1 - decay) * (weights - ema)`` with

    decay = min(ema_decay, (1 + step) / (gamma + 2 + step)).

With that warm-up the EMA after S steps weighs step s in proportion to about s ** gamma: the power-function
average of Karras et al. (2024, "Analyzing and Improving the Training Dynamics of Diffusion Models"). Its
relative width ``sigma_rel`` (the standard deviation of s / S under those weights) is the same at every step
count until ``ema_decay`` caps it, so a short run and a long one both average over the same fraction of
their steps; ``sigma_rel`` sets gamma. 0.05 (gamma about 17) averages about the last twentieth of a run.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import nn

MAX_SIGMA_REL = math.sqrt(1 / 12)  # the plain mean of all steps (gamma = 0): no power-function average is wider


@functools.lru_cache(maxsize=16)
def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of the power-function average whose relative width is ``sigma_rel``.

    Under weights proportional to x ** gamma on [0, 1], x has variance (gamma + 1) / ((gamma + 2) ** 2 (gamma + 3)),
    which falls from 1/12 at gamma = 0 towards 0 as gamma grows; solved by bisection.
    """
    if not 0 < sigma_rel < MAX_SIGMA_REL:
        raise ValueError(f"ema_sigma_rel must be in (0, {MAX_SIGMA_REL:.4f}) (a power-function average is never "
                         f"wider), got {sigma_rel}")

    def width(gamma: float) -> float:
        return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))

    low, high = 0.0, 1.0
    while width(high) > sigma_rel:
        high *= 2
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if width(mid) > sigma_rel else (low, mid)
    return (low + high) / 2


def ema_decay(step: int, decay: float, sigma_rel: float) -> float:
    """The EMA's decay for optimizer step ``step`` (0-indexed): min(decay, (1 + step) / (gamma + 2 + step))."""
    return min(decay, (1 + step) / (sigma_rel_to_gamma(sigma_rel) + 2 + step))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, weight: float | torch.Tensor) -> None:
    """ema += weight * (model - ema) for the parameters (weight = 1 - decay); the buffers are copied.

    A 0-dim device tensor as ``weight`` is read when the kernels run, not when they are queued, which is what a
    captured CUDA graph needs: every replay sees that step's value without a new capture.
    """
    ema_params = list(ema.parameters())
    params = [p.detach() for p in model.parameters()]
    if isinstance(weight, torch.Tensor):
        torch._foreach_add_(ema_params, torch._foreach_mul(torch._foreach_sub(params, ema_params), weight))
    else:
        torch._foreach_lerp_(ema_params, params, weight)
    for ema_buffer, buffer in zip(ema.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)
