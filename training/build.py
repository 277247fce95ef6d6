"""What training adds to a model, built in one place from the run's settings: the EMA copy, AdamW, and the
DistributedDataParallel wrap. (The model itself is ``sampling.model.build_diffusion``'s, which training and the
commands over a trained model share.)

AdamW's two parameter groups are named: ``"decay"`` (the kernels of the convolutions and linear layers, which
take ``--weight_decay``; Loshchilov & Hutter 2019) and ``"no_decay"`` (biases and GroupNorm gains). A
checkpoint's optimizer state brings its own hyperparameters; ``load_optimizer_state`` puts this run's settings
back into each group by its name, so that a resumed run trains as its command line says.
"""
from __future__ import annotations

import copy

import torch

from diffusion import Diffusion


def ema_copy(diffusion: Diffusion) -> Diffusion:
    """The EMA's model: a frozen copy of ``diffusion`` in eval mode, which ``training.ema.update_ema`` moves."""
    return copy.deepcopy(diffusion).eval().requires_grad_(False)


def optimizer_settings(config) -> dict[str, dict]:
    """The hyperparameters this run's settings give each named parameter group."""
    return {"decay": {"lr": config.learning_rate, "weight_decay": config.weight_decay},
            "no_decay": {"lr": config.learning_rate, "weight_decay": 0.0}}


def build_optimizer(diffusion: Diffusion, config, *, fused: bool, capturable: bool) -> torch.optim.AdamW:
    """AdamW over the network's parameters in the two named groups."""
    params = list(diffusion.model.parameters())
    members = {"decay": [p for p in params if p.dim() >= 2], "no_decay": [p for p in params if p.dim() < 2]}
    groups = [{"name": name, "params": members[name], **values} for name, values in optimizer_settings(config).items()]
    return torch.optim.AdamW(groups, fused=fused, capturable=capturable)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, config) -> None:
    """Load a checkpoint's optimizer state (the moments and step counts), then give every group this run's
    settings by the group's name. A checkpoint written before the groups had names holds them in the order
    ``build_optimizer`` makes them."""
    names = [group["name"] for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    settings = optimizer_settings(config)
    for group, name in zip(optimizer.param_groups, names):
        group.setdefault("name", name)
        group.update(settings[group["name"]])


def wrap_ddp(diffusion: Diffusion, device: torch.device, world_size: int) -> torch.nn.Module:
    """``diffusion`` in DistributedDataParallel when the run has more than one process, else itself."""
    if world_size <= 1:
        return diffusion
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(diffusion, device_ids=ids, broadcast_buffers=False)
