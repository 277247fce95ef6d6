"""Choosing the EMA length after training, from averages of the raw weights saved along the run.

With ``--snapshot_every N`` the trainer keeps the mean of the raw (not averaged) weights over each block of
N steps and writes it to ``<save_folder>/snapshots/avg-<last step>.pt``; it also closes a block at every
checkpoint, so a run resumed from any checkpoint continues its snapshots without a gap. Any average of the weights over
the run whose per-step weights are nearly constant within a block can then be rebuilt from those files
as a weighted sum of block means, without training again:

- a power-function average (Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion
  Models", 2024): the weights at step s proportional to s^gamma up to the last step S, described by its
  relative width sigma_rel (the standard deviation of s / S under those weights);
- an EMA with any per-step decay, such as the trainer's own, so the rebuilt weights can be checked against
  the EMA the run kept.

Each snapshot holds fp32 means of the parameters (the size of one set of weights: 16 MB at the
recommended flags), the first and last step it covers, and the buffers as of its last step.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterable

import torch

import checkpoint as ckpt_io
from errors import UserError

SNAPSHOT_FORMAT = "ddpm-weight-snapshot-1"


class SnapshotWriter:
    """Accumulates the raw weights after each optimizer step and writes the block's mean every ``every`` steps."""

    def __init__(self, model: torch.nn.Module, folder: str | Path, every: int):
        if every < 1:
            raise ValueError(f"snapshot interval must be at least 1 step, got {every}")
        self.model, self.folder, self.every = model, Path(folder), every
        self._params = list(model.parameters())
        self._sum: list[torch.Tensor] | None = None
        self._count = 0
        self._first_step = 0
        self._started = False

    def _drop_abandoned(self, step: int) -> None:
        """Remove snapshots reaching step ``step`` or later: a run resumed from an earlier checkpoint retrains those
        steps, so they describe weights that no longer lead to this run's."""
        self._started = True
        for path in self.folder.glob("avg-*.pt"):
            try:
                last = int(path.stem.split("-")[1])
            except ValueError:
                continue
            if last >= step:
                path.unlink()

    def add(self, step: int) -> None:
        """Add the weights after optimizer step ``step`` (1-based: the number of steps taken)."""
        with torch.no_grad():
            if self._sum is None:
                self._sum = [p.detach().float().clone() for p in self._params]
                self._first_step = step
                if not self._started:
                    self._drop_abandoned(step)
            else:
                torch._foreach_add_(self._sum, [p.detach().float() for p in self._params])
        self._count += 1
        if step % self.every == 0:
            self.write(step)

    def write(self, step: int) -> Path | None:
        """Write the mean of the weights added since the last write (nothing if none were); returns the path."""
        if self._sum is None:
            return None
        names = [name for name, _ in self.model.named_parameters()]
        state = {name: value.detach().cpu().clone() for name, value in self.model.state_dict().items()}  # buffers
        state.update({name: (total / self._count).cpu() for name, total in zip(names, self._sum)})
        path = self.folder / f"avg-{step:07d}.pt"
        ckpt_io.atomic_save({"format": SNAPSHOT_FORMAT, "first_step": self._first_step, "last_step": step,
                             "steps": self._count, "model": state}, path)
        self._sum, self._count = None, 0
        return path


def list_snapshots(folder: str | Path) -> list[tuple[int, int, Path]]:
    """(first step, last step, path) of every snapshot in ``folder``, in order; raises UserError if there are none."""
    folder = Path(folder)
    paths = sorted(folder.glob("avg-*.pt"))
    if not paths:
        raise UserError(f"no weight snapshots (avg-*.pt) in {folder}; train with --snapshot_every N to write them")
    found = []
    for path in paths:
        meta = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if meta.get("format") != SNAPSHOT_FORMAT:
            raise UserError(f"{path} is not a weight snapshot of this package (format {meta.get('format')!r})")
        found.append((int(meta["first_step"]), int(meta["last_step"]), path))
    for (_, last, prev), (first, _, path) in zip(found, found[1:]):
        if first != last + 1:
            raise UserError(f"the snapshots leave a gap: {prev.name} ends at step {last}, {path.name} starts at step "
                            f"{first}; rebuild from a run whose snapshots cover every step")
    if found[0][0] != 1:
        raise UserError(f"the first snapshot {found[0][2].name} starts at step {found[0][0]}, not 1: the run's early "
                        f"weights are missing")
    return found


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of the power-function average whose relative width is ``sigma_rel``.

    Under weights proportional to x^gamma on [0, 1], x has variance (gamma + 1) / ((gamma + 2)^2 (gamma + 3)),
    which falls from 1/12 (gamma = 0, the plain mean: sigma_rel 0.289) towards 0; solved by bisection.
    """
    if not 0 < sigma_rel < math.sqrt(1 / 12):
        raise ValueError(f"sigma_rel must lie in (0, {math.sqrt(1 / 12):.4f}), got {sigma_rel}")

    def width(gamma: float) -> float:
        return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))

    low, high = 0.0, 1.0
    while width(high) > sigma_rel:
        high *= 2
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if width(mid) > sigma_rel else (low, mid)
    return (low + high) / 2


def power_step_weights(gamma: float, last_step: int) -> torch.Tensor:
    """Per-step weights of the power-function average at ``last_step``: index s - 1 holds step s's weight."""
    steps = torch.arange(1, last_step + 1, dtype=torch.float64)
    weights = (steps / last_step) ** gamma
    return weights / weights.sum()


def ema_step_weights(last_step: int, decay_at: Callable[[int], float]) -> torch.Tensor:
    """Per-step weights at ``last_step`` of an EMA whose decay after ``count`` steps is ``decay_at(count)``
    (``Trainer.ema_decay_at``, or ``trainer.ema_decay`` with a run's settings); its initial weights, step 0,
    are left out.

    The trainer updates ema = decay_s * ema + (1 - decay_s) * weights_s after each step s (1-based, with
    decay_s = decay_at(s - 1)), so step s weighs (1 - decay_s) times the product of the later decays.
    """
    decays = torch.tensor([decay_at(count) for count in range(last_step)], dtype=torch.float64)
    later_products = torch.flip(torch.cumprod(torch.flip(decays[1:], [0]), 0), [0])  # decays after each step
    later = torch.cat([later_products, torch.ones(1, dtype=torch.float64)])
    weights = (1 - decays) * later
    return weights / weights.sum()


def rebuild(snapshots: Iterable[tuple[int, int, Path]], step_weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """The weighted average of the weights over steps 1 ... len(step_weights), from block means.

    Each block's mean enters with the summed weight of its steps; that is exact where the weights are
    constant within each block, and close where they vary little over one.
    """
    last_step = len(step_weights)
    total: dict[str, torch.Tensor] | None = None
    buffers: dict[str, torch.Tensor] = {}
    covered = 0
    for first, last, path in snapshots:
        if first > last_step:
            break
        if last > last_step:
            raise UserError(f"step {last_step} falls inside the snapshot {path.name} (steps {first} to {last}); "
                            f"pick the last step of a snapshot")
        weight = float(step_weights[first - 1:last].sum())
        state = torch.load(path, map_location="cpu", weights_only=True)["model"]
        params = {k: v for k, v in state.items() if v.is_floating_point()}
        if total is None:
            total = {k: v.double() * weight for k, v in params.items()}
        else:
            for k, v in params.items():
                total[k].add_(v.double(), alpha=weight)
        buffers = state
        covered = last
    if total is None or covered != last_step:
        raise UserError(f"the snapshots cover steps up to {covered}, not {last_step}")
    out = {k: v.float() for k, v in total.items()}
    out.update({k: v for k, v in buffers.items() if k not in out})
    return out


def rebuild_into(model: torch.nn.Module, snapshots: list[tuple[int, int, Path]], step_weights: torch.Tensor) -> None:
    """Load into ``model`` the average with per-step weights ``step_weights``, rebuilt from ``snapshots``."""
    state = rebuild(snapshots, step_weights)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise UserError(f"the snapshots in {snapshots[0][2].parent} lack {missing[0]} (and {len(missing) - 1} more): "
                        f"they come from another network")
    model.load_state_dict({k: state[k].to(dtype=v.dtype) for k, v in own.items()})
