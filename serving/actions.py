"""What the page (``--serve``) does with a loaded model, without Gradio: sample, inpaint and redraw for one request
at a time, each with its own settings, seed, progress and cancel.

``Actions`` wraps a ``sampling.model.LoadedModel``. Every request runs its chains through the model's own
``EMASampler`` (``using`` gives it the request's sampler, steps, resamplings and fills to choose from), so the page
has no sampling or editing of its own. A lock lets one chain run at a time on the model's device, whatever the web
server does; ``progress(f)`` hears the fraction done after every network pass, and ``cancelled()``, asked at the
same moments, stops the chain with ``Cancelled``. Inputs arrive as files the web server has stored and are decoded
as training images are (``imagedata.files.decode_image``); a mask arrives as a picture whose painted pixels (alpha
above zero) are the region to fill. Results are PNG files at the model's size, written only under ``folder``. Bad
input raises ``PageError`` with a one-line message for the page.
"""
from __future__ import annotations

import io
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from evaluation.figures import save_grid
from imagedata.files import TooSmall, UnreadableImage, decode_image
from sampling.model import LoadedModel
from settings.config import EVERY_TIMESTEP, SAMPLERS

MAX_IMAGES = 64  # images a request may ask for: one chain's batch


def whole(value):
    """A page's number as an int where it is a whole float (a slider sends 4.0), else unchanged."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


class PageError(Exception):
    """Input the page refuses; the message says what is wrong and how to fix it, in one line."""


class Cancelled(Exception):
    """A request's chain stopped between two network passes because its caller cancelled it."""


class Actions:
    """The page's requests on ``model``, writing results under ``folder``."""

    def __init__(self, model: LoadedModel, folder: str | Path):
        self.model = model
        self.folder = Path(folder)
        self.lock = threading.Lock()
        self.count = 0  # requests served, for unique file names

    # what the page shows of the model
    @property
    def size(self) -> int:
        return self.model.diffusion.image_size

    @property
    def channels(self) -> int:
        return self.model.diffusion.channels

    @property
    def classes(self) -> tuple[str, ...]:
        return self.model.classes

    @property
    def timesteps(self) -> int:
        return self.model.diffusion.num_timesteps

    def describe(self) -> str:
        """One line on the model: size, channels, classes, training step and default sampler."""
        colour = "grey" if self.channels == 1 else "colour"
        classes = f"classes {', '.join(self.classes)}" if self.classes else "unconditional"
        params = sum(p.numel() for p in self.model.diffusion.model.parameters())
        return (f"{self.size} x {self.size} px, {colour}, {classes}; trained {self.model.step:,} steps; "
                f"T = {self.timesteps}; sampler {self.model.config.sampler_name} by default; {params:,} parameters "
                f"on {self.model.device} in {self.model.precision}")

    # the three requests
    def sample(self, count: int, seed: int, sampler: str, steps: int | None, class_name: str | None = None,
               guidance: float | None = None, *, progress: Callable[[float], None] | None = None,
               cancelled: Callable[[], bool] | None = None) -> tuple[Path, list[Path]]:
        """``count`` new images from ``seed``: the grid and each image, as PNG files."""
        count = self.checked_count(count, "images")
        runner = self.runner(sampler, steps)
        labels = self.labels(class_name, count)
        generator = self.generator(seed)
        images = self.run(lambda report: runner.sample(count, generator=generator, classes=labels,
                                                       guidance=self.guidance(guidance, labels), progress=report),
                          progress, cancelled)
        return self.write(images, "sample", seed, grid=True)

    def inpaint(self, image: str | Path, mask: np.ndarray | None, results: int, seed: int, resample: int,
                candidates: int, sampler: str, steps: int | None, class_name: str | None = None,
                guidance: float | None = None, *, progress: Callable[[float], None] | None = None,
                cancelled: Callable[[], bool] | None = None) -> tuple[Path, list[Path]]:
        """Fill the painted region of ``image`` ``results`` times, each the consensus of ``candidates`` fills
        (``--candidates``): the input with its hole grey, then the results, as one grid and each result as a PNG
        file. Outside the region the results are the input's pixels (at the model's size) exactly."""
        results = self.checked_count(results, "results")
        resample, candidates = whole(resample), whole(candidates)
        if not isinstance(resample, int) or resample < 1:
            raise PageError(f"resamplings must be a whole number of at least 1, got {resample}")
        if not isinstance(candidates, int) or not 1 <= candidates <= MAX_IMAGES // results:
            raise PageError(f"fills to choose from must be a whole number from 1 to {MAX_IMAGES // results} for "
                            f"{results} results ({MAX_IMAGES} fills at most), got {candidates}")
        runner = self.runner(sampler, steps, resample=resample, candidates=candidates)
        x = self.read(image)
        keep = 1 - self.mask(mask, image)
        labels = self.labels(class_name, results)
        generator = self.generator(seed)
        repeated = x.expand(results, -1, -1, -1)
        out = self.run(lambda report: runner.edit(repeated, keep=keep[None], classes=labels,
                                                  guidance=self.guidance(guidance, labels), generator=generator,
                                                  progress=report), progress, cancelled)
        masked = torch.where(keep.bool(), x[0], torch.full_like(x[0], 0.5))
        return self.write(out, "inpaint", seed, grid=True, first=[x[0], masked])

    def redraw(self, image: str | Path, strength: float, results: int, seed: int, sampler: str, steps: int | None,
               class_name: str | None = None, guidance: float | None = None, *,
               progress: Callable[[float], None] | None = None,
               cancelled: Callable[[], bool] | None = None) -> tuple[Path, list[Path]]:
        """Redraw ``image`` from ``strength`` (0 returns it, 1 draws anew) ``results`` times, towards
        ``class_name`` on a class-conditional model: the input and the results as one grid, and each result."""
        results = self.checked_count(results, "results")
        if not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
            raise PageError(f"strength must be in [0, 1], got {strength}")
        runner = self.runner(sampler, steps)
        x = self.read(image)
        labels = self.labels(class_name, results)
        generator = self.generator(seed)
        repeated = x.expand(results, -1, -1, -1)
        out = self.run(lambda report: runner.edit(repeated, strength=float(strength), classes=labels,
                                                  guidance=self.guidance(guidance, labels), generator=generator,
                                                  progress=report), progress, cancelled)
        return self.write(out, "redraw", seed, grid=True, first=[x[0]])

    # checks and conversions
    @staticmethod
    def checked_count(value, what: str) -> int:
        value = whole(value)
        if not isinstance(value, int) or not 1 <= value <= MAX_IMAGES:
            raise PageError(f"the number of {what} must be a whole number from 1 to {MAX_IMAGES}, got {value}")
        return value

    def runner(self, sampler: str, steps: int | None, **settings):
        """The model's sampler with this request's sampler, steps and ``settings``, or ``PageError`` saying why
        they cannot be."""
        if sampler not in SAMPLERS:
            raise PageError(f"there is no sampler {sampler!r}; pick one of {', '.join(SAMPLERS)}")
        steps = whole(steps)
        if sampler in EVERY_TIMESTEP:
            if steps not in (None, self.timesteps):
                raise PageError(f"the {sampler} sampler visits every one of the T = {self.timesteps} timesteps, so "
                                f"it cannot take {steps} steps; pick another sampler for fewer")
            steps = None
        try:  # the settings' own checks: a step count of at least 1 and at most T
            return self.model.sampler.using(sampler=sampler, sample_steps=steps, **settings)
        except ValueError as e:
            raise PageError(str(e)) from None

    def labels(self, class_name: str | None, count: int) -> torch.Tensor | None:
        """``count`` labels of ``class_name`` (None or empty: no class)."""
        if not class_name:
            return None
        if not self.classes:
            raise PageError(f"this model is unconditional: it knows no class, so it cannot draw {class_name!r}")
        if class_name not in self.classes:
            raise PageError(f"this model knows the classes {', '.join(self.classes)}, not {class_name!r}")
        return torch.full((count,), self.classes.index(class_name), dtype=torch.long)

    def guidance(self, guidance: float | None, labels: torch.Tensor | None) -> float | None:
        if labels is None or guidance is None:
            return None
        if not isinstance(guidance, (int, float)) or guidance < 0:
            raise PageError(f"the guidance scale must be a number of at least 0, got {guidance}")
        return float(guidance)

    def generator(self, seed) -> torch.Generator:
        seed = whole(seed)
        if not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
            raise PageError(f"the seed must be a whole number from 0, got {seed}")
        return torch.Generator(self.model.device).manual_seed(seed)

    def read(self, image: str | Path | None) -> torch.Tensor:
        """An uploaded image as [1, C, S, S] in [0, 1], cropped and resized as training images are."""
        if image is None or image == "":
            raise PageError("no image: upload one first")
        try:
            pixels, _ = decode_image(image, self.size, channels=self.channels)
        except TooSmall as e:
            raise PageError(f"the image is too small: {e}; upload one at least {(self.size + 1) // 2} pixels on its "
                            f"short side") from None
        except (UnreadableImage, FileNotFoundError) as e:
            raise PageError(f"the file cannot be read as an image ({e}); upload a PNG, JPEG or WebP image") from None
        return torch.from_numpy(pixels.transpose(2, 0, 1).copy())[None].float() / 255

    def mask(self, painted: np.ndarray | None, image: str | Path) -> torch.Tensor:
        """The painted region (a bool [H, W] array, True where painted) as a [1, S, S] mask (1: fill), cropped and
        resized with the image it was painted on; refused when it is empty or covers the whole image at the
        model's size."""
        if painted is None:
            raise PageError("no mask: paint over the region to fill")
        region = Image.fromarray(np.where(painted, 255, 0).astype(np.uint8), "L")
        with Image.open(image) as im:
            if region.size != im.size:  # painted on a canvas of another size: back onto the image's pixels
                region = region.resize(im.size, Image.Resampling.NEAREST)
        buffer = io.BytesIO()
        region.save(buffer, format="png")
        buffer.seek(0)
        pixels, _ = decode_image(buffer, self.size, channels=1)
        mask = torch.from_numpy((pixels[:, :, 0] > 127).astype(np.float32))[None]
        fill = float(mask.mean())
        if fill == 0.0:
            raise PageError(f"the mask is empty at {self.size} px: paint over the region to fill")
        if fill == 1.0:
            raise PageError(f"the mask covers the whole image at {self.size} px: leave some of it unpainted to keep, "
                            f"or use Sample for a new image")
        return mask

    # running and writing
    def run(self, chain: Callable[[Callable[[float], None]], torch.Tensor], progress, cancelled) -> torch.Tensor:
        """``chain(report)`` alone on the device; ``report`` passes progress on and raises ``Cancelled`` when the
        caller has cancelled."""
        def report(fraction: float) -> None:
            if progress is not None:
                progress(fraction)
            if cancelled is not None and cancelled():
                raise Cancelled

        with self.lock:
            if cancelled is not None and cancelled():
                raise Cancelled
            return chain(report).cpu()

    def write(self, images: torch.Tensor, kind: str, seed: int, *, grid: bool,
              first: list[torch.Tensor] = ()) -> tuple[Path, list[Path]]:
        """Each image as ``<folder>/<kind>-<n>-seed<seed>-<k>.png`` and a grid of ``first`` and them."""
        with self.lock:
            self.count += 1
            n = self.count
        stem = f"{kind}-{n}-seed{seed}"
        singles = [save_grid(image[None], self.folder / f"{stem}-{k}.png", nrow=1) for k, image in enumerate(images)]
        shown = torch.cat([torch.stack(list(first)), images]) if len(first) else images
        nrow = len(shown) if len(first) else None
        return save_grid(shown, self.folder / f"{stem}.png", nrow=nrow), singles

