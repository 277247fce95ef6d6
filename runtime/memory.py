"""How much memory there is, and what fits in it: the decoded images, a training step's activations.

Each check keeps a ``memory_fraction`` of the free memory for what it places, leaving the rest to everything
else the run holds.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from runtime.errors import UserError


def available_memory_bytes(*, meminfo: Path = Path("/proc/meminfo"),
                           cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Host memory this process can still use: MemAvailable, capped by a cgroup v2 limit; None if unknown."""
    values = []
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                values.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            values.append(int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    if not values:
        try:
            values.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return max(0, min(values))


def free_bytes(device: torch.device) -> int | None:
    """Free memory on ``device``: the GPU's own for CUDA, the host's for the CPU and MPS (which shares it)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_memory_bytes()


def fits(nbytes: int, device: torch.device, *, memory_fraction: float, free: int | None = None) -> bool:
    """Whether ``nbytes`` take at most ``memory_fraction`` of ``device``'s free memory (``free``, if given);
    True where the free memory is unknown."""
    free = free_bytes(device) if free is None else free
    return free is None or nbytes <= memory_fraction * free


@torch.no_grad()
def activation_bytes_per_image(diffusion) -> int:
    """About the memory one training image's activations take: every layer's output in one forward pass of the
    network, at 4 bytes per value (what a step holds per image for its backward pass, give or take)."""
    total = 0

    def count(module, inputs, output) -> None:
        nonlocal total
        total += output.numel() if isinstance(output, torch.Tensor) else 0

    model, size = diffusion.model, diffusion.image_size
    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(count) for m in leaves]
    was_training = model.training
    model.eval()  # no dropout, so the global RNG is left alone
    try:
        x = torch.zeros(1, diffusion.channels, size, size, device=diffusion.device)
        t = torch.zeros(1, dtype=torch.long, device=x.device)
        diffusion.predict_noise(x, t, torch.zeros_like(x) if diffusion.self_condition else None)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return 4 * total


def batch_memory(diffusion, config, device: torch.device, *, free: int | None = None) -> str:
    """Whether a training batch's activations fit ``device``'s free memory: the line saying so, or a UserError
    saying what to lower. Half of the free memory is the limit, the rest being the weights, the optimizer, the
    decoded images and what the backward pass allocates besides."""
    per_image = activation_bytes_per_image(diffusion)
    need = config.batch_size * per_image
    free = free_bytes(device) if free is None else free
    if free is None:
        return f"memory: a batch's activations take about {need / 2**30:.2f} GiB ({device}'s free memory is unknown)"
    if need <= free / 2:
        return f"memory: a batch's activations take about {need / 2**30:.2f} GiB of the {free / 2**30:.1f} GiB free"
    fit = int(free / 2 // per_image)
    effective = config.batch_size * config.grad_accum
    if fit >= 1:
        lower = (f"lower --batch_size to {fit} and raise --grad_accum to {-(-effective // fit)} to keep the effective "
                 f"batch of {effective}, or lower --image_size")
    else:
        lower = "lower --image_size or --unet_dim"
    raise UserError(f"a batch of {config.batch_size} images at {config.image_size}px needs about {need / 2**30:.1f} "
                    f"GiB for its activations, more than half of the {free / 2**30:.1f} GiB free on {device}; {lower}")
