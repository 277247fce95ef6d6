"""Endless, resumable streams of training batches (``Batch``: float32 images [B, C, S, S] in [-1, 1] on the
training device, and their class labels or None; C is 3, or 1 for grayscale data).

Both sources share one sampling rule. Epoch ``e`` shuffles the N images with a CPU ``torch.Generator``
seeded from ``(seed, e)`` and draws one flip coin per image from the same generator; rank ``r`` of
``world_size`` takes ``perm[r::world_size]`` (shards are disjoint and together cover the data) and cuts it
into batches, dropping the last incomplete one. A rank with fewer images than a batch sees each of its images
``repeats`` times per epoch (an epoch then orders N * repeats draws, image ``i % N`` for draw ``i``), so that a
handful of images still trains. So ``(epoch, position)`` pins down every later batch, which
is what ``state_dict`` saves: ``position`` counts the batches already served in ``epoch``.

``DeviceBatches`` serves from a uint8 tensor kept on the device (or on the CPU, copied per batch through
pinned memory, when it would take more than ``memory_fraction`` of the free GPU memory); the conversion
to float and the flips run on the device. ``StreamingBatches`` decodes files in DataLoader workers.

Given ``labels`` (long [N], the class of each image), each ``Batch`` carries its images' labels for
class-conditional training: the labels travel with the indices, so the resumable order carries them too.
Without labels a batch's ``labels`` is None.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from imagedata.files import MAX_PIXELS, UnreadableImage, decode_image
from runtime.errors import UserError
from runtime.memory import fits


class Batch(NamedTuple):
    """One training batch: images in [-1, 1] on the training device, and their class labels (long [B]) for a
    class-conditional model, None for an unconditional one."""

    images: torch.Tensor
    labels: torch.Tensor | None = None


class DataWarning(UserWarning):
    """Something odd about the data that the run can go on with (skipped files, upsampled images, ...)."""


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_num_workers() -> int:
    """DataLoader workers for decoding: one per core up to 8; none (decode in the main process) on one core."""
    cores = available_cores()
    return min(cores, 8) if cores > 1 else 0


def epoch_order(num_images: int, *, seed: int, epoch: int, rank: int = 0,
                world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's image indices for ``epoch`` in serving order, and a bool flip flag for each."""
    state = np.random.SeedSequence([seed & (2**64 - 1), epoch]).generate_state(1, np.uint64)[0]
    generator = torch.Generator().manual_seed(int(state) >> 1)
    perm = torch.randperm(num_images, generator=generator)
    flips = torch.rand(num_images, generator=generator) < 0.5
    return perm[rank::world_size], flips[rank::world_size]


def to_model_range(x: torch.Tensor, flips: torch.Tensor | None) -> torch.Tensor:
    """uint8 [B, C, S, S] -> float32 in [-1, 1], mirrored left-right where ``flips`` (bool [B]) is set."""
    x = x.to(torch.float32).div_(127.5).sub_(1.0)
    if flips is not None:
        mask = flips.to(x.device, non_blocking=True).view(-1, 1, 1, 1)
        x = torch.where(mask, x.flip(3), x)
    return x


class _BatchStream:
    """Bookkeeping both sources share: validation, epochs, positions, state_dict, labels."""

    def __init__(self, num_images: int, batch_size: int, *, device, flip: bool, seed: int, rank: int,
                 world_size: int, labels: torch.Tensor | None = None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0 ... world_size - 1 = {world_size - 1}")
        if batch_size < 1 or num_images < 1:
            raise UserError(f"--batch_size {batch_size} must be at least 1, and there must be images to batch")
        self.repeats = 1  # the same on every rank, so that the ranks' shards still split one order
        while len(range(world_size - 1, num_images * self.repeats, world_size)) < batch_size:
            self.repeats += 1
        self.num_images, self.batch_size, self.device = num_images, batch_size, torch.device(device)
        self.flip, self.seed, self.rank, self.world_size = flip, seed, rank, world_size
        if labels is not None and (labels.dim() != 1 or len(labels) != num_images):
            raise ValueError(f"labels must be one per image ({num_images}), got shape {list(labels.shape)}")
        self.labels = None if labels is None else labels.to(torch.long)
        self.epoch, self.position = 0, 0
        self._order: tuple[int, tuple[torch.Tensor, torch.Tensor]] | None = None

    def __len__(self) -> int:
        """Batches per epoch for this rank (the incomplete last batch is dropped)."""
        return len(range(self.rank, self.num_images * self.repeats, self.world_size)) // self.batch_size

    def __iter__(self) -> Iterator[Batch]:
        return self

    def _next_indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance by one batch; returns its image indices and flip flags (where ``_place_order`` put them)."""
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        if self._order is None or self._order[0] != self.epoch:
            order = epoch_order(self.num_images * self.repeats, seed=self.seed, epoch=self.epoch, rank=self.rank,
                                world_size=self.world_size)
            self._order = (self.epoch, self._place_order(*order))
        indices, flips = self._order[1]
        start = self.position * self.batch_size
        self.position += 1
        indices = indices[start:start + self.batch_size]
        return indices % self.num_images if self.repeats > 1 else indices, flips[start:start + self.batch_size]

    def _place_order(self, indices: torch.Tensor, flips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Where an epoch's order is kept (the CPU here); called once per epoch."""
        return indices, flips

    def _batch(self, x: torch.Tensor, indices: torch.Tensor) -> Batch:
        """The batch of images ``x``, with the labels of the images it holds (``indices``) when there are labels."""
        if self.labels is None:
            return Batch(x)
        return Batch(x, self.labels.index_select(0, indices.to(self.labels.device)).to(self.device, non_blocking=True))

    def state_dict(self) -> dict:
        """Plain values that let ``load_state_dict`` continue with exactly the next batch."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "batch_size": self.batch_size,
                "num_images": self.num_images, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; warns when it was saved for other data or settings."""
        mine = self.state_dict()
        changed = [k for k in ("seed", "batch_size", "num_images", "world_size") if k in state and state[k] != mine[k]]
        if changed:
            warnings.warn(f"the saved data position was made with other {', '.join(changed)}; the batch order "
                          f"after resuming differs from an uninterrupted run", DataWarning, stacklevel=2)
        self.epoch = int(state["epoch"])
        self.position = min(int(state["position"]), len(self))
        self._order = None


class DeviceBatches(_BatchStream):
    """Batches from a uint8 [N, C, S, S] tensor (C = 3, or 1 for grayscale); see the module docstring for the order
    and the state."""

    def __init__(self, images_uint8: torch.Tensor, batch_size: int, *, device, flip: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, memory_fraction: float = 0.25,
                 labels: torch.Tensor | None = None):
        if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4 or images_uint8.shape[1] not in (1, 3):
            raise ValueError(f"images must be uint8 [N, C, S, S] with C 1 or 3, got {images_uint8.dtype} "
                             f"{list(images_uint8.shape)}")
        super().__init__(images_uint8.shape[0], batch_size, device=device, flip=flip, seed=seed, rank=rank,
                         world_size=world_size, labels=labels)
        nbytes = images_uint8.numel()
        on_device = self.device.type != "cuda" or fits(nbytes, self.device, memory_fraction=memory_fraction)
        self.images = images_uint8.to(self.device) if on_device else images_uint8
        if on_device and self.labels is not None:
            self.labels = self.labels.to(self.device)
        self.on_device = on_device
        self.image_size = images_uint8.shape[-1]

    def _place_order(self, indices: torch.Tensor, flips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.on_device:  # one copy per epoch instead of one per batch
            return indices.to(self.device), flips.to(self.device)
        return indices, flips

    def __next__(self) -> Batch:
        indices, flips = self._next_indices()
        if self.on_device:
            x = self.images.index_select(0, indices)
        else:  # too large for the GPU: gather on the CPU, copy through pinned memory
            x = self.images.index_select(0, indices).pin_memory().to(self.device, non_blocking=True)
        return self._batch(to_model_range(x, flips if self.flip else None), indices)


class FileImages(Dataset):
    """Decodes file i on demand into (uint8 [C, S, S], files skipped, upsampled flag).

    An unreadable file is replaced by the next readable one (wrapping around) and counted, so that every
    batch stays full; all N unreadable gives a zero image with ``skipped == N``.
    """

    def __init__(self, files: Sequence[Path], image_size: int, *, max_pixels: int = MAX_PIXELS, channels: int = 3):
        self.files, self.image_size, self.max_pixels = list(files), image_size, max_pixels
        self.channels = channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, bool]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            for skipped in range(len(self.files)):
                path = self.files[(index + skipped) % len(self.files)]
                try:
                    pixels, upsampled = decode_image(path, self.image_size, channels=self.channels,
                                                     max_pixels=self.max_pixels)
                except UnreadableImage:
                    continue
                return torch.from_numpy(pixels.transpose(2, 0, 1).copy()), skipped, upsampled
        return torch.zeros(self.channels, self.image_size, self.image_size, dtype=torch.uint8), len(self.files), False


class _EpochBatchSampler:
    """Index lists of one epoch from batch ``start`` on, in ``epoch_order``; the stream sets epoch and start.

    It holds plain copies of the stream's settings, not the stream: a reference cycle through the
    DataLoader would leave its workers to the garbage collector, which shuts them down slowly.
    """

    def __init__(self, num_images: int, batch_size: int, *, seed: int, rank: int, world_size: int, repeats: int = 1):
        self.num_images, self.batch_size, self.seed, self.repeats = num_images, batch_size, seed, repeats
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def __iter__(self) -> Iterator[list[int]]:
        indices, _ = epoch_order(self.num_images * self.repeats, seed=self.seed, epoch=self.epoch, rank=self.rank,
                                 world_size=self.world_size)
        for b in range(self.start, len(indices) // self.batch_size):
            yield (indices[b * self.batch_size:(b + 1) * self.batch_size] % self.num_images).tolist()

    def __len__(self) -> int:
        return len(range(self.rank, self.num_images * self.repeats, self.world_size)) // self.batch_size - self.start


class StreamingBatches(_BatchStream):
    """The same batches as ``DeviceBatches`` would serve, decoded per sample by DataLoader workers.

    ``skipped`` and ``upsampled`` count the unreadable and small files met so far (each time one is
    drawn); each kind is warned about once. ``num_workers`` defaults to ``default_num_workers()``.
    """

    def __init__(self, files: Sequence[Path], image_size: int, batch_size: int, *, device, flip: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int | None = None,
                 max_pixels: int = MAX_PIXELS, labels: torch.Tensor | None = None, channels: int = 3):
        super().__init__(len(files), batch_size, device=device, flip=flip, seed=seed, rank=rank,
                         world_size=world_size, labels=labels)
        self.image_size, self.skipped, self.upsampled = image_size, 0, 0
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self._sampler = _EpochBatchSampler(len(files), batch_size, seed=seed, rank=rank, world_size=world_size,
                                           repeats=self.repeats)
        self._loader = DataLoader(FileImages(files, image_size, max_pixels=max_pixels, channels=channels),
                                  batch_sampler=self._sampler,
                                  num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                                  pin_memory=self.device.type == "cuda")
        self._iterator: Iterator | None = None
        self._iterator_epoch: int | None = None

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._iterator_epoch = None

    def __next__(self) -> Batch:
        indices, flips = self._next_indices()
        if self._iterator_epoch != self.epoch:
            self._sampler.epoch, self._sampler.start = self.epoch, self.position - 1
            self._iterator, self._iterator_epoch = iter(self._loader), self.epoch
        x, skipped, upsampled = next(self._iterator)
        if int(skipped.max()) >= self.num_images:
            raise UserError(f"none of the {self.num_images} images could be read; replace them or pass another "
                            f"--data_path")
        self._count(int(skipped.sum()), int(upsampled.sum()))
        x = x.to(self.device, non_blocking=True)
        served = (indices + skipped) % self.num_images  # an unreadable file's place goes to the next readable one
        return self._batch(to_model_range(x, flips if self.flip else None), served)

    def _count(self, skipped: int, upsampled: int) -> None:
        if skipped and not self.skipped:
            warnings.warn("met an unreadable image file and served the next readable one in its place; "
                          "StreamingBatches.skipped keeps the count", DataWarning, stacklevel=3)
        if upsampled and not self.upsampled:
            warnings.warn(f"some images are smaller than {self.image_size}px and are upsampled; a smaller "
                          f"--image_size keeps them sharp", DataWarning, stacklevel=3)
        self.skipped += skipped
        self.upsampled += upsampled
