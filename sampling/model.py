"""The model a run's settings describe: built new for training (``build_diffusion``), or loaded from a checkpoint
for every command that uses a trained model (``load_model``).

A loaded model is what sampling, scoring, the figures and the edits need, and nothing more: the EMA weights on
their device in eval mode, the precision they compute in, the run's record (its classes among it), the training
step it was saved at and the few training images the checkpoint keeps for figures. No optimizer, loss scaler,
DistributedDataParallel wrap or training graph is built, and the training step is never imported (EDM's
``generate.py`` loads its EMA network in the same way).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from diffusion import Diffusion
from runtime.checkpoint import check_architecture, load_checkpoint, load_state_strict
from runtime.distributed import pick_device
from runtime.errors import UserError
from runtime.precision import choose_precision
from sampling.ema_sampler import EMASampler
from settings.record import RunRecord
from training.data_mean import means_from_state
from unet import Unet


def build_diffusion(config, classes: tuple[str, ...] = ()) -> Diffusion:
    """The model ``config`` describes, class-conditional over ``classes`` when there are any."""
    try:
        net = Unet(config.unet_dim, config.dim_mults, channels=config.channels, num_res_blocks=config.num_res_blocks,
                   attention_levels=config.attention_levels, dropout=config.dropout,
                   self_condition=config.self_condition, image_size=config.image_size, num_classes=len(classes),
                   mask_conditional=config.mask_conditional)
        return Diffusion(net, image_size=config.image_size, channels=config.channels, timesteps=config.time_steps,
                         loss_type=config.loss, class_dropout=config.class_dropout if classes else 0.0)
    except ValueError as e:
        raise UserError(f"{e} (check --image_size, --unet_dim and --dim_mults)") from None


@dataclass
class LoadedModel:
    """A trained model ready to use: ``diffusion`` holds the EMA weights (eval mode, no gradients) on ``device``,
    computing in ``precision``; ``sampler`` draws and edits images with it as ``config`` says; ``run`` is what the
    run recorded of itself; ``step`` the training step of the checkpoint; ``examples`` the training images
    (uint8 [K, C, S, S]) it keeps, or None."""

    diffusion: Diffusion
    config: object
    run: RunRecord
    step: int
    examples: torch.Tensor | None
    device: torch.device
    precision: str
    sampler: EMASampler

    @property
    def classes(self) -> tuple[str, ...]:
        """A class-conditional model's class names, by label (none for an unconditional one)."""
        return self.run.classes

    @classmethod
    def of(cls, diffusion: Diffusion, config, *, run: RunRecord | None = None, step: int = 0,
           examples: torch.Tensor | None = None) -> LoadedModel:
        """A model in hand (such as a trainer's EMA copy) made ready to use as ``config`` says, on its device."""
        run = RunRecord() if run is None else run
        device = diffusion.device
        precision = choose_precision(config.precision, device)
        return cls(diffusion, config, run, step, examples, device, precision,
                   EMASampler(diffusion, config, device=device, precision=precision, classes=run.classes))

    def describe(self) -> str:
        """One line: where it runs, in what precision, how large, and from which step."""
        params = sum(p.numel() for p in self.diffusion.model.parameters())
        line = (f"device {self.device}, precision {self.precision}, {params:,} parameters, "
                f"checkpoint at step {self.step}")
        if self.diffusion.data_mean is None:
            line += ("; the checkpoint keeps no data mean, so the chain's first step takes the network's estimate "
                     "(resuming its training adds the mean of the images it then trains on)")
        return line


def load_model(config, *, device: torch.device | str | None = None, run: RunRecord | None = None) -> LoadedModel:
    """The EMA model of the checkpoint ``config.load_path``, built as ``config`` describes it (whose network
    settings must be the checkpoint's: ``main.py`` adopts them), on ``device`` (default: ``--device``). ``run``
    replaces the checkpoint's record (a command that read the data knows more of it)."""
    device = pick_device(config.device) if device is None else torch.device(device)
    ckpt = load_checkpoint(config.load_path, mmap=True)  # mapped: the optimizer's tensors are never read
    check_architecture(ckpt["config"], config, config.load_path)
    run = RunRecord.from_dict(ckpt.get("run")) if run is None else run
    diffusion = build_diffusion(config, run.classes)
    load_state_strict(diffusion.model, ckpt.get("ema", ckpt["model"]), "EMA model", config.load_path)
    diffusion = diffusion.to(device).eval().requires_grad_(False)
    if ckpt.get("data_mean") is not None:
        diffusion.set_data_mean(means_from_state(ckpt["data_mean"]))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    examples = ckpt.get("examples")
    return LoadedModel.of(diffusion, config, run=run, step=int(ckpt["step"]),
                          examples=None if examples is None else examples.clone())
