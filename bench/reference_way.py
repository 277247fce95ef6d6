"""The reference solutions' way of doing things, rebuilt for the benchmarks to measure against.

- ``ReferenceFolder``/``reference_loader``: an image-folder Dataset that opens, decodes and transforms
  every JPEG at every step (Resize, CenterCrop, RandomHorizontalFlip, ToTensor, Normalize), in a
  shuffling DataLoader with the 16 workers they ask for;
- ``ReferenceStep``: their training step: ``grad_accum`` batches (the handout trainer's
  ``gradient_accumulate_every``, 2), fp32, cuDNN autotuning off, plain Adam, no EMA, no clipping, and
  ``loss.item()`` at every step (a host-device synchronisation).
"""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset


class ReferenceFolder(Dataset):
    """Every sample is opened, decoded in full and transformed when asked for."""

    def __init__(self, root: Path, image_size: int):
        from torchvision import transforms as T

        self.files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        self.transform = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.RandomHorizontalFlip(),
                                    T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        with Image.open(self.files[index]) as im:
            return self.transform(im.convert("RGB"))


def reference_loader(folder: Path, image_size: int, batch_size: int, workers: int, device: torch.device):
    """An endless iterator over the reference DataLoader's batches (epoch after epoch)."""
    loader = DataLoader(ReferenceFolder(folder, image_size), batch_size=batch_size, shuffle=True, drop_last=True,
                        num_workers=workers, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(0))
    while True:
        yield from loader


class ReferenceStep:
    """One training step as the reference solutions take it, on the same ``Diffusion`` as the package."""

    def __init__(self, diffusion, batches, *, learning_rate: float, device: torch.device, grad_accum: int = 2):
        torch.backends.cudnn.benchmark = False
        self.diffusion = diffusion.to(device)
        self.batches, self.device, self.grad_accum = batches, device, grad_accum
        self.optimizer = torch.optim.Adam(self.diffusion.parameters(), lr=learning_rate)
        self.losses: list[float] = []

    def __call__(self) -> None:
        total = 0.0
        for _ in range(self.grad_accum):
            batch = next(self.batches).to(self.device)
            loss = self.diffusion(batch) / self.grad_accum
            loss.backward()
            total += loss.item()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.losses.append(total)
