"""The training loop: Algorithm 1 with Adam, EMA, mixed precision, checkpoints, samples, FID and figures.

``Trainer`` receives built objects (the diffusion model, an infinite iterator of batches in [-1, 1] on the
device, a config) and keeps each job in a small method: ``train_step``, ``train``, ``sample``, ``save``,
``load``, ``evaluate``, ``visualize``. Samples, figures and FID always use the EMA weights.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import checkpoint as ckpt_io
import distributed
import posthoc_ema
from diffusion import Diffusion
from errors import UserError
from metrics import MetricsLogger
from visualize import diffusion_processes, save_gif, save_grid, save_process_figure

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
LR_DECAYS = ("none", "cosine", "linear")
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}  # fp32 runs without autocast


class TrainingInterrupted(Exception):
    """Raised after a SIGINT or SIGTERM once the checkpoint is saved; ``main.py`` exits 130."""


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last checkpoint on disk is from before that."""

    exit_code = 1


@dataclass
class TrainConfig:
    """How ``Trainer`` trains. The defaults are plain Algorithm 1 (one batch per step, no weight decay);
    ``main.py``'s flags default to the settings measured best at the recommended command (two batches per
    step and weight decay 0.1, with a self-conditioned U-Net), and pass them here."""

    train_steps: int = 10000
    learning_rate: float = 1e-3
    save_and_sample_every: int = 1000
    grad_accum: int = 1  # batches per optimizer step
    adam_beta2: float = 0.999
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off
    weight_decay: float = 0.0  # decoupled (AdamW) decay of the convolution and linear weights; 0 = off
    lr_warmup: int = 0  # steps of linear learning-rate warmup
    lr_decay: str = "none"  # "cosine" or "linear": from the peak down to 0 at train_steps
    lr_decay_start: float = 0.0  # fraction of train_steps held at the peak before the decay begins (after warmup)
    ema_decay: float = 0.999
    ema_warmup: bool = True  # decay min(ema_decay, (1 + step) / (gamma + 2 + step)), so short runs benefit
    ema_sigma_rel: float = 0.05  # the warm-up's relative width, which sets gamma (see ``ema_decay``)
    snapshot_every: int = 0  # write the mean raw weights of every block of this many steps (posthoc_ema.py); 0 = off
    precision: str = "auto"
    compile: bool = False
    cuda_graph: bool = False  # capture the whole step (forward, backward, clipping, Adam, EMA) in one CUDA graph
    num_samples: int = 16  # images in each periodic sample grid
    sampler: str = "ddpm"  # sampler of the periodic grids: the full chain, or DDIM over sample_steps
    sample_steps: int = 50
    fid_sampler: str = "ddpm"  # sampler of the FID samples
    fid_sample_steps: int = 50
    log_every: int = 10
    seed: int = 0


def choose_precision(requested: str, device: torch.device) -> str:
    """``auto``: bf16 on CUDA GPUs with bf16 tensor cores (Ampere and newer), fp16 on older GPUs (T4), bf16 on
    CPUs with bf16 instructions (AVX512-BF16 or AMX), fp32 elsewhere (other CPUs, where bf16 is emulated and
    slower, and MPS)."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return "bf16" if major >= 8 else "fp16"
    if device.type == "cpu" and cpu_has_bf16():
        return "bf16"
    return "fp32"


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX tiles), which makes bf16 autocast pay on it."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in checks)


# The warm-up's width before --ema_sigma_rel existed: (1 + step) / (10 + step), gamma 8.
LEGACY_EMA_SIGMA_REL = ckpt_io.TRAINING_DEFAULTS["ema_sigma_rel"]


@functools.lru_cache(maxsize=16)
def ema_gamma(sigma_rel: float) -> float:
    """The exponent gamma of the EMA warm-up of relative width ``sigma_rel`` (``LEGACY_EMA_SIGMA_REL`` gives 8)."""
    return posthoc_ema.sigma_rel_to_gamma(sigma_rel)


def ema_decay(step: int, decay: float, warmup: bool, sigma_rel: float) -> float:
    """The EMA's decay after ``step`` steps: ``decay``, or with the warm-up min(decay, (1 + step) / (gamma + 2 + step)).

    With that warm-up the EMA after S steps weighs step s in proportion to about s ** gamma: the power-function
    average of Karras et al. (2024), whose relative width ``sigma_rel`` (the standard deviation of s / S under
    those weights) stays the same at every step count until ``decay`` caps it. gamma 8 (sigma_rel 0.090), the
    former fixed warm-up (1 + step) / (10 + step), averages over about the last ninth of the run; sigma_rel 0.05
    (gamma 17) over about the last twentieth.
    """
    if not warmup:
        return decay
    return min(decay, (1 + step) / (ema_gamma(sigma_rel) + 2 + step))


class Trainer:
    def __init__(self, diffusion: Diffusion, batches, *, config: TrainConfig, device: torch.device | str,
                 save_folder: str | Path, run_config: dict | None = None, logger: MetricsLogger | None = None,
                 evaluator=None, dist_ctx: distributed.Context = distributed.Context()):
        if config.lr_decay not in LR_DECAYS:
            raise ValueError(f"lr_decay must be one of {LR_DECAYS}, got {config.lr_decay!r}")
        self.config = config
        self.dist = dist_ctx
        self.device = torch.device(device)
        self.diffusion = diffusion.to(self.device)
        self.batches = batches
        self.data_iter = iter(batches)
        self.save_folder = Path(save_folder)
        self.run_config = dict(run_config or {})
        self.logger = logger
        self.evaluator = evaluator
        self.step = 0
        self.best_fid = math.inf
        self._periodic_seconds = self._fid_seconds = 0.0  # time spent in save_and_sample and in FID by train()
        self.history: list[dict] = []

        self.precision = choose_precision(config.precision, self.device)
        self.autocast_dtype = AUTOCAST_DTYPES.get(self.precision)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        if config.cuda_graph:
            self._check_graph_capture()
        params = list(self.diffusion.model.parameters())
        fused = self.device.type == "cuda"
        # a captured step reads the learning rate and Adam's step count from device tensors
        self.optimizer = torch.optim.Adam(params, lr=config.learning_rate, betas=(0.9, config.adam_beta2), fused=fused, capturable=config.cuda_graph)
        self._set_optimizer_for_capture()
        if not 0.0 <= config.weight_decay <= 1.0:
            raise ValueError(f"weight_decay must be in [0, 1], got {config.weight_decay}")
        if config.ema_warmup and not 0.0 < config.ema_sigma_rel < math.sqrt(1 / 12):
            raise ValueError(f"ema_sigma_rel must be in (0, {math.sqrt(1 / 12):.4f}) (a power-function average is never "
                             f"wider), got {config.ema_sigma_rel}")
        # decoupled weight decay touches the kernels of the convolutions and linear layers, not the biases and
        # GroupNorm gains (the usual split); kept out of the optimizer so that its state and checkpoints stay
        # those of plain Adam whatever the decay (see ``decay_weights``)
        self._decayed = [p for p in params if p.dim() >= 2] if config.weight_decay > 0 else []
        self.ema = copy.deepcopy(self.diffusion).eval().requires_grad_(False)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_eager_steps = 3  # eager steps on a side stream before the capture, as CUDA graphs need
        self._static_batch: torch.Tensor | None = None
        self._static_loss = torch.zeros((), device=self.device)
        self._ema_weight = torch.zeros((), device=self.device)  # 1 - decay, read by the captured EMA update
        self._graph_values: tuple[float, float] | None = None  # (lr, 1 - decay) last written to the device
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        if config.compile:
            self.diffusion.model.compile()
        self.train_module = self.diffusion  # what the training forward pass calls
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_module = DistributedDataParallel(self.diffusion, device_ids=device_ids, broadcast_buffers=False)
        self._sample_seed = config.seed + 1_000_003  # previews use fixed noise, apart from the training RNG
        self._stop_signal: str | None = None
        self._loss_sum = torch.zeros((), device=self.device)
        self._loss_count = 0
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        self._snapshots = None
        if config.snapshot_every and self.dist.is_main:
            self._snapshots = posthoc_ema.SnapshotWriter(self.diffusion.model, self.save_folder / "snapshots",
                                                         config.snapshot_every)

    # ----------------------------------------------------------------------------------------------
    # One optimisation step

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-indexed): linear warmup, then the peak, held until
        ``lr_decay_start`` of the run, then constant or a cosine or linear decay to 0 at ``train_steps``."""
        cfg = self.config
        if cfg.lr_warmup > 0 and step < cfg.lr_warmup:
            return cfg.learning_rate * (step + 1) / cfg.lr_warmup
        if cfg.lr_decay == "none":
            return cfg.learning_rate
        start = max(cfg.lr_warmup, round(cfg.lr_decay_start * cfg.train_steps))
        progress = min(1.0, max(0.0, (step - start) / max(1, cfg.train_steps - start)))
        if cfg.lr_decay == "cosine":
            return cfg.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))
        return cfg.learning_rate * (1.0 - progress)

    def _check_graph_capture(self) -> None:
        """--cuda_graph captures one whole step; say which setting rules that out."""
        cfg, why = self.config, None
        if self.device.type != "cuda":
            why = f"needs a CUDA GPU, and this run is on {self.device.type}; leave it off"
        elif self.precision == "fp16":
            why = ("cannot capture fp16 loss scaling (its overflow check reads the GPU every step); "
                   "pass --precision bf16 or fp32 with it")
        elif self.dist.enabled:
            why = "runs in a single process; leave it off under torchrun"
        elif cfg.compile:
            why = "and --compile both take over the step; choose one"
        if why:
            raise UserError(f"--cuda_graph {why}")

    def _set_optimizer_for_capture(self) -> None:
        """With --cuda_graph, the learning rate lives on the device and Adam is capturable (also after loading a
        checkpoint written without it); without, a plain float as usual."""
        for group in self.optimizer.param_groups:
            lr = float(group["lr"])
            group["lr"] = torch.tensor(lr, device=self.device) if self.config.cuda_graph else lr
            group["capturable"] = self.config.cuda_graph
        self._graph_values = None

    def train_step(self) -> torch.Tensor:
        """Algorithm 1 on ``grad_accum`` batches, one optimizer step, one EMA update; returns the loss (no sync)."""
        if self.config.cuda_graph:
            return self._graph_step()
        self.diffusion.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        total = torch.zeros((), device=self.device)
        for micro in range(self.config.grad_accum):
            batch = next(self.data_iter)
            last = micro == self.config.grad_accum - 1
            # with DDP, gradients are averaged across ranks once, on the last micro-batch
            sync = contextlib.nullcontext() if last or not self.dist.enabled else self.train_module.no_sync()
            with sync, torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                      enabled=self.autocast_dtype is not None):
                loss = self.train_module(batch) / self.config.grad_accum
                self.scaler.scale(loss).backward()
            total += loss.detach().float()
        if self.config.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.diffusion.model.parameters(), self.config.grad_clip)
        self.decay_weights()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.update_ema()
        self.step += 1
        return total

    def _graph_step(self) -> torch.Tensor:
        """``train_step`` as one replay of a captured CUDA graph: the same work, launched at once.

        The first steps run the same code eagerly on a side stream (the warm-up capture needs); then one
        capture, replayed at every later step with the step's ``grad_accum`` batches copied into the static
        input, one slice each.
        """
        values = (self.lr_at(self.step), 1.0 - self.ema_decay_at(self.step))
        if values != self._graph_values:  # learning-rate warm-up and EMA warm-up: one tiny fill each
            for group in self.optimizer.param_groups:
                group["lr"].fill_(values[0])
            self._ema_weight.fill_(values[1])
            self._graph_values = values
        self._load_static_batch()
        if self._graph is not None:
            self._graph.replay()
        elif self._graph_eager_steps > 0:
            self._graph_eager_steps -= 1
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self.optimizer.zero_grad(set_to_none=True)
                self._captured_step()
            torch.cuda.current_stream(self.device).wait_stream(side)
        else:
            self.optimizer.zero_grad(set_to_none=True)  # the gradients are then allocated inside the graph
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._captured_step()
            self._graph.replay()
        self.step += 1
        return self._static_loss.clone()

    def _load_static_batch(self) -> None:
        """Copy the step's ``grad_accum`` batches into the graph's input, [grad_accum, B, C, H, W], in place."""
        for micro in range(self.config.grad_accum):
            batch = next(self.data_iter)
            if self._static_batch is None:
                self._static_batch = torch.empty((self.config.grad_accum, *batch.shape), dtype=batch.dtype,
                                                 device=batch.device)
            self._static_batch[micro].copy_(batch)

    def _captured_step(self) -> None:
        """What the graph holds: forward and backward of each micro-batch, clipping, Adam and the EMA, reading
        only static tensors. The first backward writes the gradients the capture allocates, the others add to them."""
        self.diffusion.train()
        total = torch.zeros((), device=self.device)
        for batch in self._static_batch.unbind(0):
            with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                enabled=self.autocast_dtype is not None, cache_enabled=False):
                loss = self.diffusion(batch) / self.config.grad_accum
            loss.backward()
            total += loss.detach().float()
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.diffusion.model.parameters(), self.config.grad_clip, foreach=True)
        self.decay_weights()
        self.optimizer.step()
        self.update_ema(self._ema_weight)
        self._static_loss.copy_(total)

    @torch.no_grad()
    def decay_weights(self) -> None:
        """w *= 1 - lr * weight_decay for every kernel, at the step's learning rate, just before Adam's step:
        with Adam's update independent of w, the pair is AdamW's step (Loshchilov & Hutter 2019) on those weights.

        Without it Adam lets the kernels grow: after 10,000 steps of the recommended command the first
        convolution of each residual block, which GroupNorm follows, is about three times its initial size,
        which shrinks the angle each step turns it through as a learning-rate decay would. The captured CUDA
        graph's learning rate, a device tensor, is read when the kernels run. In fp16, the steps the loss
        scaler skips still apply the decay (a factor of 1 - 1e-4 each at the recommended settings and weight
        decay 0.1).
        """
        if self._decayed:
            lr = self.optimizer.param_groups[0]["lr"]
            torch._foreach_mul_(self._decayed, 1.0 - lr * self.config.weight_decay)

    def ema_decay_at(self, step: int) -> float:
        return ema_decay(step, self.config.ema_decay, self.config.ema_warmup, self.config.ema_sigma_rel)

    @torch.no_grad()
    def update_ema(self, weight: float | torch.Tensor | None = None) -> None:
        """ema += weight * (model - ema), weight = 1 - decay (by default the decay of the current step).

        A 0-dim device tensor as ``weight`` is read when the kernels run, not when they are queued, which
        is what the captured CUDA graph needs: its replays see each step's value without a new capture.
        """
        ema_params = list(self.ema.model.parameters())
        params = [p.detach() for p in self.diffusion.model.parameters()]
        if isinstance(weight, torch.Tensor):
            torch._foreach_add_(ema_params, torch._foreach_mul(torch._foreach_sub(params, ema_params), weight))
        else:
            torch._foreach_lerp_(ema_params, params, 1.0 - self.ema_decay_at(self.step) if weight is None else weight)
        for ema_buf, buf in zip(self.ema.model.buffers(), self.diffusion.model.buffers()):
            ema_buf.copy_(buf)

    # ----------------------------------------------------------------------------------------------
    # The loop

    def train(self) -> None:
        """Train until ``train_steps``, saving and sampling every ``save_and_sample_every`` steps."""
        from tqdm.auto import tqdm

        cfg, main_rank = self.config, self.dist.is_main
        if self.step >= cfg.train_steps:
            if main_rank:
                print(f"checkpoint is already at step {self.step} >= --train_steps {cfg.train_steps}; nothing to train")
            return
        previous = self._install_signal_handlers()
        bar = tqdm(total=cfg.train_steps, initial=self.step, desc="training", dynamic_ncols=True, disable=not main_rank)
        last_time, last_step = time.perf_counter(), self.step
        start_time, start_step, self._periodic_seconds, self._fid_seconds = last_time, self.step, 0.0, 0.0
        try:
            while self.step < cfg.train_steps:
                loss = self.train_step()
                if self._snapshots is not None:
                    self._snapshots.add(self.step)
                self._loss_sum += loss
                self._loss_count += 1
                self._nonfinite |= ~torch.isfinite(loss)
                bar.update(1)
                at_log = self.step % cfg.log_every == 0 or self.step == cfg.train_steps
                at_save = self.step % cfg.save_and_sample_every == 0 or self.step == cfg.train_steps
                # The NaN flag is read (a host sync) only at log and save points; ranks agree on a stop there too,
                # while a single process acts on Ctrl-C at once.
                stop = self._stop_signal is not None and not self.dist.enabled
                if at_log or at_save or stop:
                    stop = self._agree_on_flags()
                if at_log:
                    now = time.perf_counter()
                    images_per_sec = (self.step - last_step) * self._images_per_step() / max(now - last_time, 1e-9)
                    last_time, last_step = now, self.step
                    mean_loss = self._flush_loss()
                    bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{images_per_sec:.0f}")
                    self._log({"step": self.step, "loss": mean_loss, "lr": self.lr_at(self.step - 1),
                               "images_per_sec": images_per_sec})
                if at_save:
                    self.save_and_sample()
                if stop:
                    path = self.save()
                    if self._snapshots is not None:
                        self._snapshots.write(self.step)
                    raise TrainingInterrupted(f"{self._stop_signal} at step {self.step}: saved {path}; "
                                              f"resume with --load_path {path}")
            if not distributed.parameters_agree(self.diffusion.model, self.dist):
                raise RuntimeError("the ranks' weights differ after training; DistributedDataParallel lost sync")
            if self.dist.enabled and main_rank:
                print(f"weights identical on all {self.dist.world_size} ranks")
        finally:
            bar.close()
            self._restore_signal_handlers(previous)
        if main_rank:
            total = time.perf_counter() - start_time
            periodic = self._periodic_seconds - self._fid_seconds
            print(f"trained: {self.step - start_step} steps in {total:.1f} s: training {total - self._periodic_seconds:.1f} s, "
                  f"checkpoints and sample grids {periodic:.1f} s, FID {self._fid_seconds:.1f} s")

    def _agree_on_flags(self) -> bool:
        """Share the NaN flag and a pending stop signal between ranks; raise on a NaN anywhere, else say whether to stop."""
        stop = torch.tensor(self._stop_signal is not None, device=self.device)
        flags = distributed.any_rank(torch.stack([self._nonfinite, stop]), self.dist).tolist()
        if flags[0]:
            self._raise_diverged()
        if flags[1] and self._stop_signal is None:
            self._stop_signal = "a stop signal on another rank"
        return bool(flags[1])

    def _images_per_step(self) -> int:
        batch_size = getattr(self.batches, "batch_size", 0)
        world_size = getattr(self.batches, "world_size", 1)
        return batch_size * self.config.grad_accum * world_size

    def _flush_loss(self) -> float:
        """The mean loss since the last call, over all ranks."""
        mean = self._loss_sum / max(self._loss_count, 1)
        if self.dist.enabled:
            torch.distributed.all_reduce(mean)
            mean = mean / self.dist.world_size
        mean = mean.item()
        self._loss_sum.zero_()
        self._loss_count = 0
        return mean

    def _raise_diverged(self):
        last = self.save_folder / "model.pt"
        kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
        raise TrainingDiverged(f"the loss became NaN or infinite by step {self.step}; stopped without saving; {kept}; "
                               f"lower --learning_rate or keep --grad_clip on")

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.logger is not None:
            self.logger.log(record)

    def save_and_sample(self) -> None:
        """The periodic job: a checkpoint, a sample grid, the curves, and FID when an evaluator is set.

        Rank 0 does it alone while the other ranks wait at a barrier.
        """
        started = time.perf_counter()
        if not self.dist.is_main:
            distributed.barrier(self.dist)
            self._periodic_seconds += time.perf_counter() - started
            return
        self.save()
        if self._snapshots is not None:  # so that a run resumed from this checkpoint leaves no gap in them
            self._snapshots.write(self.step)
        grid = self.save_folder / f"sample-{self.step}.png"
        save_grid(self.sample(self.config.num_samples), grid)
        if self.logger is not None:
            self.logger.log_image("samples", grid, self.step, caption=f"step {self.step}")
        if self.evaluator is not None:
            fid_started = time.perf_counter()
            self.evaluate()
            self._fid_seconds += time.perf_counter() - fid_started
            self.save()  # the FID point and the best score belong in the checkpoint too
        if self.logger is not None:
            self.logger.plot()
        distributed.barrier(self.dist)
        self._periodic_seconds += time.perf_counter() - started

    def evaluate(self) -> dict | None:
        """Score the EMA model with the FID evaluator; keeps ``model_best.pt`` at the best FID so far.

        The evaluator warns once and returns None when it cannot score (no Inception weights): training goes on.
        """
        result = self.evaluator.evaluate_or_warn(self.fid_sample_fn())
        if result is None:
            return None
        record = {"step": self.step, **{k: v for k, v in result.items() if isinstance(v, (int, float))}}
        self._log(record)
        if result["fid"] < self.best_fid:
            self.best_fid = result["fid"]
            ckpt_io.atomic_save(self.state_dict(), self.save_folder / "model_best.pt")
        return result

    # ----------------------------------------------------------------------------------------------
    # Sampling and figures (EMA weights)

    def fid_sample_fn(self):
        """``n -> n images in [0, 1]`` from the EMA model with the FID sampler; each call continues one noise stream."""
        generator = torch.Generator(self.device).manual_seed(self._sample_seed + 1)
        return lambda n: self.sample(n, sampler=self.config.fid_sampler, steps=self.config.fid_sample_steps,
                                     generator=generator)

    @torch.no_grad()
    def sample(self, n: int, *, sampler: str | None = None, steps: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` images in [0, 1] from the EMA model.

        Defaults to the preview sampler of the config, and to fixed noise (a generator seeded apart from the
        training RNG) so that grids are comparable across steps and sampling never shifts the training RNG.
        """
        if generator is None:
            generator = torch.Generator(self.device).manual_seed(self._sample_seed)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            images = self.ema.sample(n, sampler=sampler or self.config.sampler,
                                     steps=steps or self.config.sample_steps, generator=generator)
        return images.float()

    @torch.no_grad()
    def visualize(self, x_start: torch.Tensor) -> list[Path]:
        """Figures of the forward and backward processes on ``x_start`` ([B, C, H, W] in [-1, 1]), and a GIF."""
        generator = torch.Generator(self.device).manual_seed(self._sample_seed)
        steps, forward, backward, frames = diffusion_processes(self.ema, x_start, generator=generator)
        T = self.diffusion.num_timesteps
        paths = [
            save_process_figure(forward, self.save_folder / "forward_process.png",
                                title=f"forward process q(x_t | x_0), T = {T}"),
            save_process_figure(backward, self.save_folder / "backward_process.png",
                                title=f"backward process from t = {steps[-1]}, after {self.step} training steps"),
            save_gif(frames, self.save_folder / "backward_process.gif", nrow=min(8, x_start.shape[0])),
        ]
        if self.logger is not None:
            for path in paths:
                self.logger.log_image(path.stem, path, self.step)
        return paths

    # ----------------------------------------------------------------------------------------------
    # Checkpoints

    def state_dict(self) -> dict:
        data_state = self.batches.state_dict() if hasattr(self.batches, "state_dict") else {}
        return {
            "format": ckpt_io.FORMAT,
            "step": self.step,
            "architecture": {k: self.run_config.get(k) for k in ckpt_io.ARCHITECTURE_KEYS},
            "config": {**self.run_config, "trainer": asdict(self.config)},
            "model": self.diffusion.model.state_dict(),
            "ema": self.ema.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": ckpt_io.rng_state(),
            "data": data_state,
            "history": [dict(r) for r in self.history],
            "best_fid": self.best_fid,
            "wandb_run_id": self.logger.wandb_run_id if self.logger is not None else None,
        }

    def save(self, path: str | Path | None = None) -> Path:
        """Write the checkpoint (rank 0 only; the path is returned on every rank)."""
        path = Path(path) if path is not None else self.save_folder / "model.pt"
        if self.dist.is_main:
            ckpt_io.atomic_save(self.state_dict(), path)
        return path

    def load(self, path: str | Path, *, resume: bool = True) -> dict:
        """Load weights (and, with ``resume``, optimizer, scaler, step, RNG, data position and history)."""
        ckpt = ckpt_io.load_checkpoint(path, map_location=self.device)
        ckpt_io.check_architecture(ckpt.get("architecture", {}),
                                   {k: self.run_config.get(k) for k in ckpt_io.ARCHITECTURE_KEYS}, path)
        ckpt_io.load_state_strict(self.diffusion.model, ckpt["model"], "model", path)
        ckpt_io.load_state_strict(self.ema.model, ckpt.get("ema", ckpt["model"]), "EMA model", path)
        self.step = int(ckpt["step"])
        self.history = list(ckpt.get("history", []))
        self.best_fid = float(ckpt.get("best_fid", math.inf))
        if resume:
            if ckpt.get("optimizer"):
                self.optimizer.load_state_dict(ckpt["optimizer"])
                self._set_optimizer_for_capture()
            if ckpt.get("scaler") and self.scaler.is_enabled():
                self.scaler.load_state_dict(ckpt["scaler"])
            if ckpt.get("rng"):
                ckpt_io.set_rng_state(ckpt["rng"])
            if ckpt.get("data") and hasattr(self.batches, "load_state_dict"):
                self.batches.load_state_dict(ckpt["data"])
                self.data_iter = iter(self.batches)
        return ckpt

    # ----------------------------------------------------------------------------------------------
    # Signals: Ctrl-C (SIGINT) and SIGTERM (Colab, schedulers) save a checkpoint, then stop

    def _install_signal_handlers(self) -> dict:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            if self._stop_signal is not None:  # a second Ctrl-C stops at once
                raise KeyboardInterrupt
            self._stop_signal = signal.Signals(signum).name

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict) -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)
