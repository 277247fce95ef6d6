"""The mean of the images a run has trained on, kept in its checkpoints for the chain's first step.

``Diffusion.predict_start`` takes the data's mean as its x_0 estimate at the last timestep, where the network's
own estimate is its noise error multiplied about a thousandfold. ``DataMean`` sums every training batch as the
step sees it (after flips), over all images and per class, on the training device; the checkpoint keeps the
sums and counts (``state_dict``), so a resumed run goes on counting and a loaded model reads its mean
(``means_from_state``) without the data.
"""
from __future__ import annotations

import torch


def means_of(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The means [K + 1, C, S, S] of the sums [K + 1, C, S, S] of ``counts`` [K + 1] images: each class's by label,
    all images' last; a class not seen yet takes the mean of all (zeros before any image). No host read."""
    means = sums.float() / counts.float().clamp(min=1).view(-1, *((1,) * (sums.dim() - 1)))
    unseen = (counts <= 0).view(-1, *((1,) * (sums.dim() - 1)))
    return torch.where(unseen, means[-1:], means)


def means_from_state(state: dict) -> torch.Tensor | None:
    """The means of a ``DataMean.state_dict`` (a checkpoint's), as ``means_of`` gives them; None before any image."""
    if state["count"][-1] <= 0:
        return None
    return means_of(state["sum"], state["count"])


class DataMean:
    """Sums of the training images ([-1, 1]) over all of them and per class: ``add`` each batch, ``means`` when
    sampling. ``num_classes`` K is 0 for an unconditional model; ``shape`` is (C, S, S)."""

    def __init__(self, num_classes: int, shape: tuple[int, int, int], device: torch.device | str):
        self.sums = torch.zeros(num_classes + 1, *shape, device=device)
        self.counts = torch.zeros(num_classes + 1, device=device)

    @torch.no_grad()
    def add(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Count a batch [B, C, S, S]; ``labels`` (long [B]) also into their classes' sums."""
        images = images.detach().float()
        self.sums[-1] += images.sum(dim=0)
        self.counts[-1] += images.shape[0]
        if labels is not None and len(self.counts) > 1:
            self.sums.index_add_(0, labels, images)
            self.counts.index_add_(0, labels, torch.ones_like(labels, dtype=self.counts.dtype))

    def means(self) -> torch.Tensor:
        """The means so far, on the training device, as ``means_of`` gives them."""
        return means_of(self.sums, self.counts)

    def state_dict(self) -> dict:
        return {"sum": self.sums.cpu(), "count": self.counts.cpu()}

    def load_state_dict(self, state: dict) -> None:
        """Go on from a checkpoint's sums; one of another shape (another size, channels or classes) is ignored."""
        if tuple(state["sum"].shape) == tuple(self.sums.shape) and state["count"].shape == self.counts.shape:
            self.sums.copy_(state["sum"])
            self.counts.copy_(state["count"])
