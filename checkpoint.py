"""Checkpoint files: written atomically, read with ``torch.load(weights_only=True)``, checked against the model.

A checkpoint is a dict of tensors and plain Python values only (no pickled objects), so loading one that
came from somewhere else cannot run code. It holds everything a resumed run needs to continue exactly:

    {"format": 1, "step": int, "architecture": {...}, "config": {...},
     "model": state_dict, "ema": state_dict, "optimizer": state_dict, "scaler": state_dict | None,
     "rng": {"torch": ByteTensor, "cuda": [ByteTensor, ...]}, "data": {...}, "history": [{...}, ...],
     "wandb_run_id": str | None}
"""
from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from atomic import atomic_write, stale_temporaries
from errors import UserError

FORMAT = 1
# The settings that decide the network's shape and the meaning of its timesteps.
ARCHITECTURE_KEYS = ("image_size", "channels", "time_steps", "unet_dim", "dim_mults", "num_res_blocks",
                     "attention_levels", "self_condition")
# The flags that say how a network was being trained: a resumed run keeps the checkpoint's values of those the
# command line does not name, so that it goes on as it started, whatever the defaults are now.
TRAINING_KEYS = ("batch_size", "learning_rate", "grad_accum", "loss", "dropout", "grad_clip", "weight_decay",
                 "lr_warmup", "lr_decay", "ema_decay", "ema_sigma_rel", "flip")
# What a checkpoint written before one of these flags existed was made with, which is not today's default:
# self_condition, grad_accum and weight_decay came on 2026-11-25, ema_sigma_rel on 2026-11-29 (before it the
# warm-up was (1 + step) / (10 + step)). Checkpoints of those days exist, and resume as they were trained.
BEFORE_THE_FLAG = {"self_condition": False, "grad_accum": 1, "weight_decay": 0.0, "ema_sigma_rel": math.sqrt(9 / 1100)}
# Options that were measured, did not pay and were removed (BENCHMARKS.md, "Tried and removed"), with the value
# that meant "off", and the last commit that has their code. A checkpoint made with one of them on is refused:
# the architectural ones (the network computes something else without them) always, the training ones when a
# run would resume with them silently off.
REMOVED_ARCHITECTURE = {"rescale_timesteps": False, "weight_standardization": False, "residual_scaling": False,
                        "network_output": "eps"}
REMOVED_TRAINING = {"timestep_sampling": "uniform", "timestep_gamma": 0.0, "min_snr_gamma": 0.0,
                    "lr_decay_start": 0.0, "adam_beta2": 0.999, "ema_warmup": True, "snapshot_every": 0,
                    "lr_decay": ("linear",)}  # for lr_decay: the removed values, not the "off" one
LAST_COMMIT_WITH_REMOVED = "a172cf6"


def save_checkpoint(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through ``atomic.atomic_write``: the file at ``path`` is the old one or the new one, whole.

    Raises UserError (with the previous file intact) when the folder cannot be written. Temporary files left
    behind by an earlier process that was killed while saving ``path`` are removed after a success.
    """
    path = Path(path)

    def write(f) -> None:
        sink = _WriteErrorKeeper(f)
        try:
            torch.save(obj, sink)
        except RuntimeError:
            # torch's zip writer reports a failed write (full disk, file size limit) as a vague RuntimeError;
            # the OSError underneath says what happened.
            if sink.error is not None:
                raise sink.error from None
            raise

    try:
        atomic_write(path, write)
    except OSError as e:
        raise UserError(f"could not write {path} ({e.strerror or e}); the previous file there is intact; "
                        f"free some disk space or pass a writable --save_folder") from e
    for stale in stale_temporaries(path):
        stale.unlink(missing_ok=True)


class _WriteErrorKeeper:
    """The file object handed to ``torch.save``, keeping the first OSError a write raised."""

    def __init__(self, f):
        self.f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """Read a checkpoint safely; a missing, truncated, foreign or non-checkpoint file raises one-line UserError.
    With ``mmap`` the tensors are mapped, not read, so looking at the plain values (config, step) costs no I/O."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"--load_path {path} does not exist; pass the model.pt that training wrote into its --save_folder")
    if path.is_dir():
        raise UserError(f"--load_path {path} is a folder; pass the checkpoint file inside it, such as {path / 'model.pt'}")
    if path.stat().st_size == 0:
        raise UserError(f"--load_path {path} is empty (0 bytes); pass a complete checkpoint such as results/model.pt")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises many types here: UnpicklingError, RuntimeError, EOFError, ...
        with open(path, "rb") as f:
            starts_like_a_zip = f.read(4) == b"PK\x03\x04"
        if not starts_like_a_zip:
            reason = "it is not a PyTorch checkpoint file at all"
        elif not zipfile.is_zipfile(path):
            reason = "it is truncated or damaged: its zip archive has no end, as when a copy or download stopped early"
        elif "Unsupported global" in str(e) or "weights_only" in str(e):
            reason = "it contains Python objects other than tensors, which this package refuses to unpickle"
        else:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--load_path {path} is not a readable checkpoint of this package ({reason[:200]}); "
                        f"pass a model.pt written by main.py") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "model" not in ckpt:
        raise UserError(f"--load_path {path} is not a checkpoint of this package (no format-{FORMAT} model state); "
                        f"pass a model.pt written by main.py")
    return ckpt


def check_architecture(saved: dict, current: dict, path: str | os.PathLike) -> None:
    """Raise UserError naming every setting in which the checkpoint's network differs from this run's (settings
    a checkpoint does not record are left to ``load_state_strict``, which compares the tensors themselves)."""
    saved = {**{k: v for k, v in BEFORE_THE_FLAG.items() if k in ARCHITECTURE_KEYS}, **saved}
    differ = [key for key in ARCHITECTURE_KEYS if key in saved and comparable(saved[key]) != comparable(current.get(key))]
    if differ:
        diffs = "; ".join(f"{k}={show(saved[k])} in the checkpoint but {show(current.get(k))} here" for k in differ)
        flags = " ".join(f"--{k} {show(saved[k])}" for k in differ)
        raise UserError(f"checkpoint {path} has a different architecture: {diffs}; rerun with {flags} or load "
                        f"another checkpoint")


def check_removed_options(ckpt: dict, path: str | os.PathLike, *, training: bool) -> None:
    """Refuse, in one line, a checkpoint made with an option this package no longer has (see ``REMOVED_*``)."""
    recorded = {**ckpt.get("config", {}), **ckpt.get("architecture", {})}
    removed = dict(REMOVED_ARCHITECTURE, **(REMOVED_TRAINING if training else {}))
    for key, off in removed.items():
        value = recorded.get(key)
        used = value in off if isinstance(off, tuple) else value is not None and value != off
        if used:
            use = "sample or resume it" if key in REMOVED_ARCHITECTURE else "resume it"
            raise UserError(f"checkpoint {path} was made with --{key} {show(value)}, an option this package no "
                            f"longer has (BENCHMARKS.md, 'Tried and removed'); {use} with the code of commit "
                            f"{LAST_COMMIT_WITH_REMOVED} (git checkout {LAST_COMMIT_WITH_REMOVED})")


def saved_flags(ckpt: dict, *, training: bool) -> dict:
    """The flag values a checkpoint was made with: its architecture (``channels`` aside, which is no flag) and,
    with ``training``, the ``TRAINING_KEYS``; as it records them, or as ``BEFORE_THE_FLAG`` says."""
    def recorded(source: dict, keys: tuple[str, ...]) -> dict:
        source = {**BEFORE_THE_FLAG, **{k: v for k, v in source.items() if v is not None or k == "attention_levels"}}
        return {k: source[k] for k in keys if k in source and k != "channels"}

    flags = recorded(ckpt.get("architecture", {}), ARCHITECTURE_KEYS)
    if training:
        flags.update(recorded(ckpt.get("config", {}), TRAINING_KEYS))
    return flags


def load_state_strict(module: torch.nn.Module, state: dict, what: str, path: str | os.PathLike) -> None:
    """``load_state_dict`` that names the first mismatching tensor in a one-line UserError."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        if shapes:
            k = shapes[0]
            detail = f"{k} has shape {list(state[k].shape)} in the checkpoint but {list(own[k].shape)} here"
        elif missing:
            detail = f"{len(missing)} tensors missing, such as {missing[0]}"
        else:
            detail = f"{len(unexpected)} unexpected tensors, such as {unexpected[0]}"
        raise UserError(f"checkpoint {path} does not fit this {what}: {detail}; "
                        f"rerun with the architecture flags it was trained with")
    module.load_state_dict(state)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state.get("cuda"):
        cuda_states = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda_states)


def comparable(value):
    """A flag value in a form that compares equal whether it came from JSON (lists) or from code (tuples)."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


def show(value) -> str:
    """A flag value as it is written on the command line (``1 2 4 8`` for a list)."""
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)
