"""A training run from its settings: the data, the run record, the model and its ``Trainer``, the printed and saved
configuration, the metrics log and FID, then the loop. ``main.py`` calls ``train`` for every command that trains
(a new run, or a resumed one with ``--load_path``), in one process or in each of torchrun's.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from evaluation.metrics import MetricsLogger
from evaluation.scoring import build_evaluator, statistics_dir
from imagedata.loading import load_data
from runtime import distributed
from runtime.atomic import atomic_write_text
from runtime.errors import UserError
from runtime.memory import batch_memory
from sampling.model import build_diffusion
from settings.config import Config, show
from settings.record import RunRecord
from trainer import Trainer


def check_not_overwriting(config: Config) -> None:
    """A new run must not replace another run's checkpoint unless asked to (resuming that checkpoint is fine)."""
    existing = Path(config.save_folder) / "model.pt"
    if config.overwrite or not existing.exists():
        return
    if config.load_path and Path(config.load_path).resolve() == existing.resolve():
        return
    raise UserError(f"{existing} already holds a trained model; resume it with --load_path {existing}, "
                    f"pass another --save_folder, or add --overwrite to replace it")


def print_config(record: dict, trainer: Trainer, device) -> None:
    """Every setting and what the run records of itself, then the line of the device, precision and sizes."""
    params = f"{sum(p.numel() for p in trainer.diffusion.model.parameters()):,} parameters"
    width = max(map(len, record))
    print("\n".join(f"{k:>{width}}: {show(record[k])}" for k in sorted(record)))
    print(f"device {device}, precision {trainer.precision}, {params}, "
          f"effective batch size {record['effective_batch_size']}, learning rate {record['learning_rate']:g}")


def train(config: Config, ctx: distributed.Context, saved: RunRecord, *, extractor=None) -> None:
    """Train as ``config`` says: from scratch, or on from the checkpoint ``config.load_path`` (whose record is
    ``saved``). ``extractor`` replaces clean-fid's Inception for ``--fid``."""
    if ctx.is_main:
        check_not_overwriting(config)
    device = distributed.setup(ctx, config.device)
    data = load_data(config, device, ctx)
    image_set = data.image_set
    run = RunRecord.of_run(config, device=device, world_size=ctx.world_size, data=data, saved=saved,
                           fid_cache_dir=str(statistics_dir(config, image_set).resolve()) if image_set else None)
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    trainer = Trainer(build_diffusion(config, run.classes), data.batches, config=config, device=device,
                      dist_ctx=ctx, run=run)
    loaded = trainer.load(config.load_path) if config.load_path else {}
    examples = data.examples(config)
    if examples is not None:  # a resumed run keeps its checkpoint's examples when the images are streamed
        trainer.examples = examples
    if not loaded:
        torch.manual_seed(config.seed + ctx.rank)  # each rank draws its own timesteps and noise
    elif ctx.rank > 0:  # a checkpoint holds rank 0's RNG state; the others continue on streams of their own
        torch.manual_seed(config.seed + ctx.rank + 1_000_003 * trainer.step)
    record = {**config.to_dict(), **run.to_dict()}
    memory = batch_memory(trainer.diffusion, config, device)  # each rank checks its own device
    if ctx.is_main:
        print_config(record, trainer, device)
        print(memory)
        atomic_write_text(Path(config.save_folder) / "config.json", json.dumps(record, indent=1, default=str) + "\n")
        trainer.logger = MetricsLogger(config.save_folder, config=record, wandb_mode=config.wandb,
                                       project=config.wandb_project, run_name=config.run_name,
                                       history=trainer.history, resume_step=trainer.step,
                                       wandb_run_id=loaded.get("wandb_run_id"))
    try:
        if config.fid and ctx.is_main:
            if image_set is None:
                raise UserError("--fid needs the dataset in memory, but it is too large here; lower --image_size")
            trainer.evaluator = build_evaluator(config, device, image_set, run, required=False, extractor=extractor)
        trainer.train()
        if ctx.is_main:
            print(f"done: {Path(config.save_folder) / 'model.pt'} at step {trainer.step}")
    finally:
        if trainer.logger is not None:
            trainer.logger.close()
