"""The holes a mask-conditional model trains on (``--mask_conditional``): one random region per image.

A fifth of the images are given nothing (the whole image is the hole), so that the network keeps drawing images
from noise alone; the rest lose half the image (one side), a box of a quarter to three quarters of each side, or
a blob (coarse noise, smoothly upsampled and thresholded), so that it learns to fill the named masks of
``--inpaint`` and the free strokes drawn on the page from what is kept. Drawn on the images' device from torch's
generator, without reading anything back to the host, so that a captured training step can hold the draw.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Cumulative shares of the kinds of hole: nothing kept, a half, a box; the rest are blobs.
NOTHING_KEPT, HALF, BOX = 0.2, 0.5, 0.75
BLOB_CELLS = 4  # the coarse noise's side: a blob is a few cells wide
BLOB_LEVEL = 0.25  # the coarse noise's threshold: about a third of the image is hidden


def random_keep(count: int, size: int, *, device: torch.device | str = "cpu",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep masks for ``count`` images of ``size`` x ``size`` pixels: float [count, 1, size, size], 1 where kept."""
    u = torch.rand(count, 6, 1, 1, device=device, generator=generator)
    coarse = torch.randn(count, 1, BLOB_CELLS, BLOB_CELLS, device=device, generator=generator)
    centres = (torch.arange(size, device=device) + 0.5) / size
    rows, cols = centres.view(1, 1, size, 1), centres.view(1, 1, 1, size)
    side = (u[:, 1:2] * 4).floor()  # top, bottom, left, right
    half = torch.where(side < 2, torch.where(side == 0, rows < 0.5, rows > 0.5),
                       torch.where(side == 2, cols < 0.5, cols > 0.5))
    height, width = 0.25 + 0.5 * u[:, 2:3], 0.25 + 0.5 * u[:, 3:4]
    top, left = u[:, 4:5] * (1 - height), u[:, 5:6] * (1 - width)
    box = (rows > top) & (rows < top + height) & (cols > left) & (cols < left + width)
    blob = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False) > BLOB_LEVEL
    kind = u[:, :1]
    hole = torch.where(kind < NOTHING_KEPT, torch.ones_like(blob),
                       torch.where(kind < HALF, half, torch.where(kind < BOX, box, blob)))
    return (~hole).float()
