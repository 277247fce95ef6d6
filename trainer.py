"""The training loop: steps, checkpoints, sample grids, FID, curves and figures.

``Trainer`` receives built objects (the diffusion model, an endless iterator of ``imagedata.batches.Batch`` on
the device, a config, the run record) and keeps each job in a small method: ``train_step``, ``train``,
``evaluate``, ``save``, ``load``. It trains a model and nothing else: the step itself lives in
``training.step.TrainStep``; the periodic sample grids and FID come from the EMA weights through
``sampling.ema_sampler.EMASampler`` (``trainer.sampler``); using a trained model is ``sampling/``'s, from a
checkpoint (``sampling.model.load_model``), without a trainer.

A class-conditional model (its class names in the run record, ``settings.record.RunRecord.classes``) samples at
the guidance scale ``--guidance``; its grids hold a row per class, and FID is scored per class and over all
classes.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from diffusion import Diffusion
from evaluation.figures import save_grid
from evaluation.metrics import MetricsLogger
from runtime import checkpoint as ckpt_io
from runtime import distributed
from runtime.errors import UserError
from runtime.precision import choose_precision
from sampling.ema_sampler import EMASampler
from settings.config import Config
from settings.record import RunRecord
from training import build
from training.data_mean import DataMean, means_from_state
from training.ema import ema_decay
from training.interrupt import StopSignals, TrainingInterrupted
from training.step import TrainStep, learning_rate


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last checkpoint on disk is from before that."""

    exit_code = 1


class Trainer:
    """Trains ``diffusion`` on ``batches`` (an endless iterator of ``imagedata.batches.Batch``) as ``config`` says;
    ``run`` is what the run records of itself (its classes among it)."""

    def __init__(self, diffusion: Diffusion, batches, *, config: Config, device: torch.device | str,
                 run: RunRecord | None = None, logger: MetricsLogger | None = None, evaluator=None,
                 dist_ctx: distributed.Context = distributed.Context()):
        self.config, self.dist, self.device = config, dist_ctx, torch.device(device)
        self.diffusion = diffusion.to(self.device)
        self.batches = batches
        self.data_iter = iter(batches) if batches is not None else None
        self.save_folder = Path(config.save_folder)
        self.run = run or RunRecord()
        if self.run.num_classes != diffusion.num_classes:
            raise ValueError(f"the model has {diffusion.num_classes} classes, the run record {self.run.num_classes}")
        self.logger, self.evaluator = logger, evaluator
        self.step, self.best_fid, self.history = 0, math.inf, []
        self.examples: torch.Tensor | None = None  # a few training images (uint8) the checkpoint keeps for figures
        self.precision = choose_precision(config.precision, self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.ema = build.ema_copy(self.diffusion)
        self.data_mean = DataMean(diffusion.num_classes, (diffusion.channels, diffusion.image_size, diffusion.image_size),
                                  self.device)
        self.stepper = TrainStep(self.diffusion, self.ema, config=config, device=self.device,
                                 precision=self.precision, world_size=self.dist.world_size,
                                 batch_size=getattr(batches, "batch_size", 0), announce=self.dist.is_main)
        self.optimizer = self.stepper.optimizer
        if config.compile:
            self.diffusion.model.compile()
        self.sampler = EMASampler(self.ema, config, device=self.device, precision=self.precision,
                                  classes=self.run.classes)
        self._loss_sum, self._loss_count = torch.zeros((), device=self.device), 0
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)

    @property
    def classes(self) -> tuple[str, ...]:
        """A class-conditional model's class names, by label (none for an unconditional one)."""
        return self.run.classes

    def lr_at(self, step: int) -> float:
        return learning_rate(self.config, step)

    def ema_decay_at(self, step: int) -> float:
        return ema_decay(step, self.config.ema_decay, self.config.ema_sigma_rel)

    def train_step(self) -> torch.Tensor:
        """Algorithm 1 on ``grad_accum`` batches, one optimizer step, one EMA update; returns the loss (no sync)."""
        batches = [next(self.data_iter) for _ in range(self.config.grad_accum)]
        for batch in batches:
            self.data_mean.add(batch.images, batch.labels)
        self.ema.set_data_mean(self.data_mean.means())  # in place, on the device: no host read
        loss = self.stepper.step(batches, lr=self.lr_at(self.step), ema_weight=1.0 - self.ema_decay_at(self.step))
        self.step += 1
        return loss

    def train(self) -> None:
        """Train until ``train_steps``, saving and sampling every ``save_and_sample_every`` steps."""
        from tqdm.auto import tqdm

        cfg, main_rank = self.config, self.dist.is_main
        if self.step >= cfg.train_steps:
            if main_rank:
                print(f"checkpoint is already at step {self.step} >= --train_steps {cfg.train_steps}; nothing to train")
            return
        bar = tqdm(total=cfg.train_steps, initial=self.step, desc="training", dynamic_ncols=True, disable=not main_rank)
        start, first_step = time.perf_counter(), self.step
        last_time, last_step, periodic, fid = start, self.step, 0.0, 0.0
        with StopSignals() as signals:
            try:
                while self.step < cfg.train_steps:
                    loss = self.train_step()
                    self._loss_sum += loss
                    self._loss_count += 1
                    self._nonfinite |= ~torch.isfinite(loss)
                    bar.update(1)
                    at_log = self.step % cfg.log_every == 0 or self.step == cfg.train_steps
                    at_save = self.step % cfg.save_and_sample_every == 0 or self.step == cfg.train_steps
                    # The NaN flag is read (a host sync) only at log and save points; ranks agree on a stop there
                    # too, while a single process acts on Ctrl-C at once.
                    stop = signals.received is not None and not self.dist.enabled
                    if at_log or at_save or stop:
                        stop = self._agree_on_flags(signals)
                    if at_log:
                        now = time.perf_counter()
                        images_per_sec = (self.step - last_step) * self._images_per_step() / max(now - last_time, 1e-9)
                        last_time, last_step = now, self.step
                        mean_loss = self._flush_loss()
                        bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{images_per_sec:.0f}")
                        self._log({"step": self.step, "loss": mean_loss, "lr": self.lr_at(self.step - 1),
                                   "images_per_sec": images_per_sec})
                    if at_save:
                        started = time.perf_counter()
                        fid += self.save_and_sample()
                        periodic += time.perf_counter() - started
                    if stop:
                        path = self.save()
                        raise TrainingInterrupted(f"{signals.received} at step {self.step}: saved {path}; "
                                                  f"resume with --load_path {path}")
            finally:
                bar.close()
        if not distributed.parameters_agree(self.diffusion.model, self.dist):
            raise RuntimeError("the ranks' weights differ after training; DistributedDataParallel lost sync")
        if main_rank:
            total = time.perf_counter() - start
            same = f"; weights identical on all {self.dist.world_size} ranks" if self.dist.enabled else ""
            print(f"trained: {self.step - first_step} steps in {total:.1f} s: training {total - periodic:.1f} s, "
                  f"checkpoints and sample grids {periodic - fid:.1f} s, FID {fid:.1f} s{same}")

    def _agree_on_flags(self, signals: StopSignals) -> bool:
        """Share the NaN flag and a pending stop signal between ranks; raise on a NaN anywhere, else say whether to stop."""
        stop = torch.tensor(signals.received is not None, device=self.device)
        flags = distributed.any_rank(torch.stack([self._nonfinite, stop]), self.dist).tolist()
        if flags[0]:
            last = self.save_folder / "model.pt"
            kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
            raise TrainingDiverged(f"the loss became NaN or infinite by step {self.step}; stopped without saving; "
                                   f"{kept}; lower --learning_rate or keep --grad_clip on")
        if flags[1] and signals.received is None:
            signals.received = "a stop signal on another rank"
        return bool(flags[1])

    def _images_per_step(self) -> int:
        return getattr(self.batches, "batch_size", 0) * self.config.grad_accum * getattr(self.batches, "world_size", 1)

    def _flush_loss(self) -> float:
        """The mean loss since the last call, over all ranks."""
        mean = self._loss_sum / max(self._loss_count, 1)
        if self.dist.enabled:
            torch.distributed.all_reduce(mean)
            mean = mean / self.dist.world_size
        self._loss_sum.zero_()
        self._loss_count = 0
        return mean.item()

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.logger is not None:
            self.logger.log(record)

    def save_and_sample(self) -> float:
        """The periodic job: a checkpoint, a sample grid, the curves, and FID when an evaluator is set; returns
        the seconds FID took. Rank 0 does it alone while the other ranks wait at a barrier."""
        fid_seconds = 0.0
        if self.dist.is_main:
            self.save()
            images, per_row = self.sampler.preview(self.config.num_samples)
            grid = save_grid(images, self.save_folder / f"sample-{self.step}.png", nrow=per_row)
            if self.logger is not None:
                self.logger.log_image("samples", grid, self.step, caption=f"step {self.step}")
            if self.evaluator is not None:
                started = time.perf_counter()
                self.evaluate()
                fid_seconds = time.perf_counter() - started
                self.save()  # the FID point and the best score belong in the checkpoint too
            if self.logger is not None:
                self.logger.plot()
        distributed.barrier(self.dist)
        return fid_seconds

    def evaluate(self) -> dict | None:
        """Score the EMA model with the FID evaluator; keeps ``model_best.pt`` at the best FID so far.

        The evaluator warns once and returns None when it cannot score (no Inception weights): training goes on.
        """
        result = self.evaluator.evaluate_or_warn(self.sampler.fid_sample_fn())
        if result is None:
            return None
        self._log({"step": self.step, **{k: v for k, v in result.items() if isinstance(v, (int, float))}})
        if result["fid"] < self.best_fid:
            self.best_fid = result["fid"]
            self.save(self.save_folder / "model_best.pt")
        return result

    def state_dict(self) -> dict:
        return {
            "format": ckpt_io.FORMAT,
            "step": self.step,
            "config": self.config.to_dict(),
            "run": self.run.to_dict(),
            "model": self.diffusion.model.state_dict(),
            "ema": self.ema.model.state_dict(),
            **self.stepper.state_dict(),
            "rng": ckpt_io.rng_state(),
            "data": self.batches.state_dict() if hasattr(self.batches, "state_dict") else {},
            "history": [dict(r) for r in self.history],
            "data_mean": self.data_mean.state_dict(),
            "best_fid": self.best_fid,
            "wandb_run_id": self.logger.wandb_run_id if self.logger is not None else None,
            **({"examples": self.examples.cpu()} if self.examples is not None else {}),
        }

    def save(self, path: str | Path | None = None) -> Path:
        """Write the checkpoint (rank 0 only; the path is returned on every rank)."""
        path = Path(path) if path is not None else self.save_folder / "model.pt"
        if self.dist.is_main:
            ckpt_io.save_checkpoint(self.state_dict(), path)
        return path

    def load(self, path: str | Path, *, resume: bool = True) -> dict:
        """Load weights (and, with ``resume``, optimizer, scaler, step, RNG, data position and history)."""
        ckpt = ckpt_io.load_checkpoint(path, map_location=self.device)
        ckpt_io.check_architecture(ckpt["config"], self.config, path)
        grows = ckpt_io.grows_mask_conditioning(ckpt["config"], self.config)
        for module, state, what in ((self.diffusion.model, ckpt["model"], "model"),
                                    (self.ema.model, ckpt.get("ema", ckpt["model"]), "EMA model")):
            ckpt_io.load_state_strict(module, ckpt_io.add_kept_channels(state, module) if grows else state, what, path)
        self.step = int(ckpt["step"])
        self.history = list(ckpt.get("history", []))
        self.best_fid = float(ckpt.get("best_fid", math.inf))
        self.examples = ckpt.get("examples")
        data_mean = ckpt.get("data_mean")
        if data_mean is not None:
            self.ema.set_data_mean(means_from_state(data_mean))
            if resume:
                self.data_mean.load_state_dict(data_mean)
        if resume:
            self.stepper.load_state_dict(ckpt)
            if grows:  # the widened input convolution's moments start afresh (Adam's own first steps)
                self.stepper.forget_moments(self.diffusion.model.input_conv.weight)
            if ckpt.get("rng"):
                ckpt_io.set_rng_state(ckpt["rng"])
            if ckpt.get("data") and hasattr(self.batches, "load_state_dict"):
                self.batches.load_state_dict(ckpt["data"])
                self.data_iter = iter(self.batches)
        return ckpt
