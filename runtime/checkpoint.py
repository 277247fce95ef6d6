"""Checkpoint files: written atomically, read with ``torch.load(weights_only=True)``, checked against the model.

A checkpoint is a dict of tensors and plain Python values only (no pickled objects), so loading one that
came from somewhere else cannot run code. It holds everything a resumed run needs to continue exactly:

    {"format": 2, "step": int, "config": {setting: value}, "run": {...},
     "model": state_dict, "ema": state_dict, "optimizer": state_dict, "scaler": state_dict | None,
     "rng": {"torch": ByteTensor, "cuda": [ByteTensor, ...]}, "data": {...}, "history": [{...}, ...],
     "wandb_run_id": str | None, "examples": uint8 [K, C, S, S] (a few training images, for --visualize),
     "data_mean": {"sum": float [K' + 1, C, S, S], "count": float [K' + 1]} (the images trained on, per class and
     over all, for the chain's first step; ``training.data_mean``)}
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from runtime.atomic import atomic_write, stale_temporaries
from runtime.errors import UserError
from settings.config import Config, comparable, names, recorded, show

FORMAT = 2
# The last commit that reads each older format, named when such a checkpoint is refused.
READERS = {1: "41f33d3"}


def save_checkpoint(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through ``runtime.atomic.atomic_write``: the file at ``path`` is the old one or the new one,
    whole.

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
        # str: torch 2.1 maps only a file named by a str
        ckpt = torch.load(str(path), map_location=map_location, weights_only=True, mmap=mmap)
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
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("format"), int) or "model" not in ckpt:
        raise UserError(f"--load_path {path} is not a checkpoint of this package (no format number and model state); "
                        f"pass a model.pt written by main.py")
    if ckpt["format"] != FORMAT:
        reader = READERS.get(ckpt["format"])
        use = f"use it with the code of commit {reader} (git checkout {reader})" if reader else "update this code"
        raise UserError(f"--load_path {path} is a checkpoint of format {ckpt['format']}, and this code reads format "
                        f"{FORMAT}; {use}")
    return ckpt


def check_architecture(saved: dict, config: Config, path: str | os.PathLike) -> None:
    """Raise UserError naming every network setting in which the checkpoint's recorded config differs from
    ``config`` (the tensors themselves are compared by ``load_state_strict``)."""
    grows = grows_mask_conditioning(saved, config)  # training grows a model without it: ``add_kept_channels``
    saved = {"mask_conditional": False, **recorded(saved, training=False)}  # earlier checkpoints have none
    differ = [k for k in names("network") if k in saved and saved[k] != comparable(getattr(config, k))
              and not (k == "mask_conditional" and grows)]
    if differ:
        diffs = "; ".join(f"{k}={show(saved[k])} in the checkpoint but {show(getattr(config, k))} here" for k in differ)
        flags = " ".join(f"--{k} {show(saved[k])}" for k in differ)
        raise UserError(f"checkpoint {path} has a different architecture: {diffs}; rerun with {flags} or load "
                        f"another checkpoint")


def grows_mask_conditioning(saved: dict, config: Config) -> bool:
    """Whether training goes on with ``--mask_conditional`` from a checkpoint (its recorded config ``saved``) of a
    model without it."""
    return bool(config.mask_conditional and config.trains and not saved.get("mask_conditional", False))


def add_kept_channels(state: dict, module: torch.nn.Module) -> dict:
    """A state dict of a U-Net without mask conditioning made to fit ``module``, the same U-Net with it: the input
    convolution's new channels (the kept pixels and their mask) start at zero, so the network predicts what the
    checkpoint's did until training moves them."""
    key = "input_conv.weight"
    own, old = module.state_dict()[key], state[key]
    if own.shape[0] != old.shape[0] or own.shape[1] < old.shape[1] or own.shape[2:] != old.shape[2:]:
        return state  # not a narrower copy of this input convolution: load_state_strict names the mismatch
    widened = own.new_zeros(own.shape)
    widened[:, :old.shape[1]] = old
    return {**state, key: widened}


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
