"""One optimizer step: Algorithm 1 over the step's batches, clipping, AdamW and the EMA.

``TrainStep.body`` is the step's whole work and the only copy of it. It runs eagerly, or, with CUDA graphs,
through ``runtime.graphs.Captured``: warm-up calls on a side stream, one capture, then replays.

With ``grad_accum`` k, the k batches of a step go through the network either as k passes of B images (the
gradients added up) or as one pass of k x B images (``one_pass``): the same loss, since the loss is a mean
and GroupNorm works per image, with the same timesteps and noise, drawn batch by batch as separate passes
draw them, and with self-conditioning taking the same half of the images. One pass launches fewer kernels;
separate passes hold less memory.

Mixed precision in fp16 scales the loss (``torch.amp.GradScaler``). With the fused AdamW that runs on CUDA,
the scaler hands the optimizer its overflow flag on the device, and a step whose gradients overflow is
skipped inside the optimizer's kernel, so nothing reads the GPU from the host and the step can be captured.
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch

from diffusion import Diffusion
from imagedata.batches import Batch
from runtime.graphs import Captured, train_with_graphs
from runtime.memory import activation_bytes_per_image, free_bytes
from runtime.precision import autocast
from training import build
from training.ema import update_ema
from training.masks import random_keep

GRAPH_WARMUP_STEPS = 3  # eager steps on a side stream before the capture, as CUDA graphs need


def use_one_pass(requested: str | bool, device: torch.device, *, step_bytes: int, free: int | None,
                 memory_fraction: float = 0.25) -> bool:
    """``--one_pass``: auto takes one pass on the CPU and on CUDA when the step's activations (``step_bytes``)
    take at most ``memory_fraction`` of the device's free memory (``free``); a pass per batch elsewhere."""
    if requested != "auto":
        return bool(requested)
    return device.type in ("cpu", "cuda") and (free is None or step_bytes <= memory_fraction * free)


def learning_rate(config, step: int) -> float:
    """The learning rate of optimizer step ``step`` (0-indexed): linear warm-up over ``--lr_warmup`` steps, then
    ``--learning_rate``, constant or decaying along a cosine to 0 at ``--train_steps``."""
    if config.lr_warmup > 0 and step < config.lr_warmup:
        return config.learning_rate * (step + 1) / config.lr_warmup
    if config.lr_decay == "none":
        return config.learning_rate
    progress = min(1.0, max(0.0, (step - config.lr_warmup) / max(1, config.train_steps - config.lr_warmup)))
    return config.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))


def use_fused_adam(device: torch.device) -> bool:
    """Fused Adam (one kernel for all parameters, overflow checks on the device) where it is fastest: CUDA."""
    return device.type == "cuda"


def grad_scaler(device: torch.device, *, enabled: bool):
    """The fp16 loss scaler for ``device``. torch.amp.GradScaler came with torch 2.3; before it only CUDA has one
    (torch.cuda.amp), and ``choose_precision`` refuses fp16 elsewhere."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device.type, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled and device.type == "cuda")


def draw_inputs(diffusion: Diffusion, batches: list[Batch]) -> tuple:
    """``Diffusion.forward``'s arguments for one pass over ``batches``: x_0, t, noise, the count of
    self-conditioned images, the labels (None without) and a mask-conditional model's keep masks (None without).
    Timesteps, noise and masks are drawn batch by batch (as separate passes draw them), then the labels' dropout;
    the half of every batch that self-conditioning takes (its first B // 2 images) is placed first."""
    labelled, masked = batches[0].labels is not None, diffusion.mask_conditional
    images, ts, noises, labels, keeps = [batch.images for batch in batches], [], [], [], []
    for batch in batches:
        ts.append(diffusion.sample_timesteps(batch.images.shape[0], batch.images.device))
        noises.append(torch.randn_like(batch.images))
        if masked:
            keeps.append(random_keep(batch.images.shape[0], batch.images.shape[-1], device=batch.images.device))
        if labelled:
            labels.append(diffusion.drop_labels(batch.labels))
    halves = [len(x) // 2 for x in images]
    if len(batches) == 1:
        return (images[0], ts[0], noises[0], halves[0], labels[0] if labelled else None,
                keeps[0] if masked else None)

    def halves_first(parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([p[:h] for p, h in zip(parts, halves)] + [p[h:] for p, h in zip(parts, halves)])

    return (*map(halves_first, (images, ts, noises)), sum(halves), halves_first(labels) if labelled else None,
            halves_first(keeps) if masked else None)


class TrainStep:
    """The optimizer, the loss scaler and the step itself; ``step(batches, lr=..., ema_weight=...)`` runs one.

    ``diffusion`` is trained, ``ema`` (a copy of it) follows it. ``config`` is the run's ``settings.config.Config``;
    ``world_size`` above 1 wraps the diffusion model in DistributedDataParallel (one process per device). The
    optimizer and the wrap come from ``build``.
    """

    def __init__(self, diffusion: Diffusion, ema: Diffusion, *, config, device: torch.device, precision: str,
                 world_size: int = 1, batch_size: int = 0, announce: bool = True):
        self.diffusion, self.ema, self.config = diffusion, ema, config
        self.device, self.precision = device, precision
        self.graphed = train_with_graphs(config.cuda_graph, device, world_size=world_size, compiled=config.compile,
                                         announce=announce)
        self._step_images = config.grad_accum * batch_size
        self.fused = use_fused_adam(device)
        self.optimizer = build.build_optimizer(diffusion, config, fused=self.fused, capturable=self.graphed)
        self.scaler = grad_scaler(device, enabled=precision == "fp16")
        self.module = build.wrap_ddp(diffusion, device, world_size)
        self.ema_weight: float | torch.Tensor = 0.0  # 1 - the EMA's decay, as ``body`` reads it
        self._static_batches: list[Batch] = []
        # warm-up steps and the capture start with the gradients unset, so the capture allocates them in its pool
        self.captured = Captured(lambda: self.body(self._static_batches), device, warmup=GRAPH_WARMUP_STEPS,
                                 before=lambda: self.optimizer.zero_grad(set_to_none=True))
        self._written: tuple[float, float] | None = None  # (lr, ema weight) last written into the graph's tensors
        self.configure_optimizer()

    @functools.cached_property
    def one_pass(self) -> bool:
        """Whether the step's batches go through the network as one pass (``--one_pass``); decided at the first
        step, since ``auto`` runs the network once to estimate the memory (a model only sampled never does)."""
        if self.config.grad_accum == 1:
            return False
        step_bytes, free = 0, None
        if self.config.one_pass == "auto" and self.device.type in ("cpu", "cuda"):  # where the estimate decides
            step_bytes = self._step_images * activation_bytes_per_image(self.diffusion)
            free = free_bytes(self.device)
        return use_one_pass(self.config.one_pass, self.device, step_bytes=step_bytes, free=free)

    def configure_optimizer(self) -> None:
        """Give AdamW this run's implementation, also after loading a checkpoint written on another device or with
        or without CUDA graphs: fused where chosen, and with graphs capturable, its learning rate a device tensor
        (a captured step reads it when its kernels run)."""
        if self.captured.graph is not None:
            raise RuntimeError("the optimizer cannot change after the step was captured: load checkpoints first")
        for group in self.optimizer.param_groups:
            lr = float(group["lr"])
            group["lr"] = torch.tensor(lr, device=self.device) if self.graphed else lr
            group["capturable"], group["fused"] = self.graphed, self.fused
        if self.graphed and not isinstance(self.ema_weight, torch.Tensor):
            self.ema_weight = torch.zeros((), device=self.device)
        self._written = None

    def body(self, batches: list[Batch]) -> torch.Tensor:
        """The step's work: forward and backward, clipping, AdamW, EMA; returns the loss (no sync).

        Reads nothing from the host but the tensors it is handed, so that a CUDA graph can hold it. The gradients
        must be unset on entry (the first backward writes them, the others add to them).
        """
        loss = self.forward_backward(batches)
        self.update()
        return loss

    def forward_backward(self, batches: list[Batch]) -> torch.Tensor:
        """Algorithm 1's loss over ``batches`` (their mean), its gradients added to the parameters' (scaled in fp16)."""
        self.diffusion.train()
        passes = [batches] if self.one_pass else [[batch] for batch in batches]
        total = torch.zeros((), device=self.device)
        for i, group in enumerate(passes):
            # with DDP, gradients are averaged across ranks once, in the last pass
            last = i == len(passes) - 1
            sync = self.module.no_sync() if not last and self.module is not self.diffusion else contextlib.nullcontext()
            with sync, autocast(self.device, self.precision, cache_enabled=not self.graphed):
                loss = self.module(*draw_inputs(self.diffusion, group)) / (len(batches) / len(group))
                self.scaler.scale(loss).backward()
            total += loss.detach().float()
        return total

    def update(self) -> None:
        """Clip the gradients, take AdamW's step (skipped in fp16 when the gradients overflowed), move the EMA."""
        if self.config.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.diffusion.model.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        update_ema(self.ema.model, self.diffusion.model, self.ema_weight)

    def step(self, batches: list[Batch], *, lr: float, ema_weight: float) -> torch.Tensor:
        """One optimizer step on ``batches`` (the step's ``grad_accum`` batches) at learning rate ``lr``, the EMA
        moving ``ema_weight`` of the way to the new weights; returns the loss as a device tensor."""
        if not self.graphed:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.ema_weight = ema_weight
            loss = self.body(batches)
            self.optimizer.zero_grad(set_to_none=True)
            return loss
        if (lr, ema_weight) != self._written:  # the warm-ups change them; one tiny fill each
            for group in self.optimizer.param_groups:
                group["lr"].fill_(lr)
            self.ema_weight.fill_(ema_weight)
            self._written = (lr, ema_weight)
        if not self._static_batches:
            self._static_batches = [Batch(*(None if x is None else torch.empty_like(x) for x in batch))
                                    for batch in batches]
        for static, batch in zip(self._static_batches, batches):
            for s, b in zip(static, batch):
                if s is not None:
                    s.copy_(b)
        return self.captured().clone()  # a replay's loss tensor is refilled by the next one

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None}

    def forget_moments(self, parameter: torch.nn.Parameter) -> None:
        """Drop AdamW's state of one parameter (its moments and step count), which then starts as at a first step:
        for a parameter whose shape changed since the state was saved."""
        if self.captured.graph is not None:
            raise RuntimeError("the optimizer cannot change after the step was captured: load checkpoints first")
        self.optimizer.state.pop(parameter, None)

    def load_state_dict(self, state: dict) -> None:
        if state.get("optimizer"):
            build.load_optimizer_state(self.optimizer, state["optimizer"], self.config)
            self.configure_optimizer()
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
