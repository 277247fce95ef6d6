"""Where the numbers go: a JSON-lines file and PNG curves in the save folder, and wandb when it is on.

Every record is a flat dict with a ``step``; the same records go to ``metrics.jsonl`` and to wandb, so a
run with wandb off loses nothing. The history travels inside checkpoints, so a resumed run continues its
curves (records past the resumed step are dropped, never duplicated).
"""
from __future__ import annotations

import json
import math
import netrc
import os
import warnings
from pathlib import Path
from typing import Any

from runtime.atomic import atomic_write, atomic_write_text
from settings.config import WANDB_MODES


def resolve_wandb_mode(mode: str) -> str:
    """``auto`` becomes ``online`` when a wandb login is available (env key or ~/.netrc), else ``offline``."""
    if mode not in WANDB_MODES:
        raise ValueError(f"wandb mode must be one of {WANDB_MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "online"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        auth = netrc.netrc().authenticators("api.wandb.ai")
    except (OSError, netrc.NetrcParseError):
        auth = None
    return "online" if auth else "offline"


class MetricsLogger:
    """Append-only metrics for one run: ``log(record)``, ``log_image(name, path, step)``, ``plot()``, ``close()``.

    ``history`` is the run's record so far (from its checkpoint; empty for a new run): ``metrics.jsonl`` is
    rewritten to hold exactly it, records past ``resume_step`` dropped. ``history=None`` (visualizing or
    sampling a saved model) leaves the file as it is and only appends.
    """

    def __init__(self, save_folder: str | os.PathLike, *, config: dict, wandb_mode: str = "disabled",
                 project: str = "ddpm-afhq", run_name: str | None = None, history: list[dict] | None = None,
                 resume_step: int = 0, wandb_run_id: str | None = None):
        self.folder = Path(save_folder)
        self.path = self.folder / "metrics.jsonl"
        self.folder.mkdir(parents=True, exist_ok=True)
        if history is None:
            self.history = []
        else:
            self.history = [r for r in history if r.get("step", 0) <= resume_step]
            self._rewrite()
        self.wandb_mode = resolve_wandb_mode(wandb_mode)
        self.run = None
        if self.wandb_mode != "disabled":
            self.run = self._start_wandb(config, project, run_name, wandb_run_id)

    @property
    def wandb_run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def _rewrite(self) -> None:
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.history))

    def _start_wandb(self, config, project, run_name, run_id):
        try:
            import wandb
        except ImportError:
            warnings.warn("wandb is not installed; metrics go to metrics.jsonl only (pip install wandb)")
            return None
        try:
            return wandb.init(project=project, name=run_name, config=config, dir=str(self.folder),
                              mode=self.wandb_mode, id=run_id, resume="allow" if run_id else None,
                              settings=wandb.Settings(init_timeout=60, silent=True))
        except Exception as e:  # wandb raises its own error types for login and network problems
            warnings.warn(f"wandb could not start in {self.wandb_mode} mode ({str(e).splitlines()[0][:160]}); "
                          f"metrics go to {self.path} only; pass --wandb offline to keep a local wandb log")
            return None

    def log(self, record: dict[str, Any]) -> None:
        record = {k: (float(v) if hasattr(v, "__float__") and not isinstance(v, int) else v) for k, v in record.items()}
        self.history.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def log_image(self, name: str, path: str | os.PathLike, step: int, caption: str | None = None) -> None:
        if self.run is not None:
            import wandb
            self.run.log({name: wandb.Image(str(path), caption=caption)}, step=step)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        points = [(r["step"], r[key]) for r in self.history if key in r and r[key] is not None]
        return [s for s, _ in points], [v for _, v in points]

    def curves(self) -> dict[str, dict[str, list[tuple[int, float]]]]:
        """What ``plot`` draws: for loss.png, and for fid.png once there are FID points, each line's name and its
        finite (step, value) points; a class-conditional run's FID has a line per class beside all classes."""
        per_class = sorted({k for r in self.history for k in r if k.startswith("fid/")})
        curves = {}
        for keys, name in ((["loss"], "loss.png"), (["fid", *per_class], "fid.png")):
            lines = {}
            for key in keys:
                points = [(s, v) for s, v in zip(*self.series(key)) if math.isfinite(v)]
                if points:
                    lines["all classes" if key == "fid" and per_class else key.removeprefix("fid/")] = points
            if lines:
                curves[name] = lines
        return curves

    def plot(self) -> list[Path]:
        """Draw ``curves`` (loss.png, fid.png) in the save folder; returns the paths."""
        labels = {"loss.png": "training loss (L1 on the noise)", "fid.png": "FID"}
        return [self._plot(lines, self.folder / name, labels[name]) for name, lines in self.curves().items()]

    def _plot(self, lines: dict[str, list[tuple[int, float]]], path: Path, ylabel: str) -> Path:
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for label, points in lines.items():
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(values) <= 30 else None, markersize=3, label=label)
        if len(lines) > 1:
            ax.legend(fontsize=8)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        atomic_write(path, lambda f: fig.savefig(f, format="png"))
        plt.close(fig)
        return path

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
