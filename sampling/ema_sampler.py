"""Drawing images from a run's EMA model, as its settings say: the sampler and its steps, the precision, the
guidance scale, fixed noise for previews and a noise stream of its own for FID, a row per class, the reverse
step captured as a CUDA graph where ``runtime.graphs`` allows it, and a progress bar over the chains a command
runs.
"""
from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from pathlib import Path

import torch

from diffusion import Diffusion
from evaluation.figures import save_guidance_figure
from runtime.graphs import sample_with_graphs
from runtime.precision import autocast
from sampling.captured_step import ChainStep, ChainSteps
from sampling.editing import edit, pull_applies

GUIDANCE_SCALES = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0)  # the columns of the guidance figure


class EMASampler:
    """Samples ``ema`` (the run's EMA ``Diffusion``) with ``config``'s sampler in ``precision``; ``classes`` are a
    class-conditional model's class names by label (none for an unconditional one)."""

    def __init__(self, ema: Diffusion, config, *, device: torch.device, precision: str,
                 classes: tuple[str, ...] = ()):
        self.ema, self.config, self.device, self.precision, self.classes = ema, config, device, precision, classes
        self.seed = config.seed + 1_000_003  # previews use fixed noise, apart from the training RNG
        # the reverse step as a CUDA graph, or None to sample eagerly
        self.chain_steps = ChainSteps(ema) if sample_with_graphs(config.cuda_graph, device) else None
        self._bar = None  # the progress bar of ``progress``, while one is shown

    @contextlib.contextmanager
    def progress(self, images: int, desc: str):
        """Show a bar over the ``images`` that the chains run inside this context draw or edit, advanced after
        every network pass; a command wraps its work in one."""
        from tqdm.auto import tqdm

        bar = tqdm(total=images, desc=desc, unit="img", dynamic_ncols=True,
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total} images [{elapsed}<{remaining}]")
        self._bar = bar
        try:
            yield bar
        finally:
            self._bar = None
            bar.close()

    def chain_progress(self, batch_size: int):
        """The ``progress`` callback of a chain over ``batch_size`` images, advancing the shown bar (None without
        one)."""
        bar = self._bar
        if bar is None:
            return None
        start = bar.n
        return lambda done: bar.update(start + done * batch_size - bar.n)

    def using(self, **settings) -> EMASampler:
        """This sampler with other sampling settings (``sampler``, ``sample_steps``, ``resample``, ...; checked as
        ``Config.replace`` checks them): the same model, noise streams and captured steps."""
        other = copy.copy(self)
        other.config = self.config.replace(**settings)
        return other

    def chain_step(self, batch_size: int, sampler: str, guidance: float = 0.0) -> ChainStep | None:
        """The captured reverse step for these batches, or None to run the chain eagerly."""
        return self.chain_steps.get(batch_size, sampler, guidance) if self.chain_steps is not None else None

    def generator(self, offset: int = 0) -> torch.Generator:
        """A fresh noise stream: offset 0 is the previews' fixed noise, 1 the FID samples'."""
        return torch.Generator(self.device).manual_seed(self.seed + offset)

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, classes: torch.Tensor | None = None,
               guidance: float | None = None, progress: Callable[[float], None] | None = None) -> torch.Tensor:
        """``n`` images in [0, 1]; a class-conditional model draws the labels ``classes`` ([n]; None: "no class",
        unguided) at ``guidance`` (default ``--guidance``). ``progress`` (as in ``Diffusion.run_chain``) replaces
        the shown bar's.

        Defaults to the fixed noise of the previews, so that grids are comparable across steps and sampling never
        shifts the training RNG.
        """
        cfg = self.config
        w = 0.0 if classes is None else cfg.guidance if guidance is None else guidance
        with autocast(self.device, self.precision):
            images = self.ema.sample(n, sampler=cfg.sampler, steps=cfg.chain_length,
                                     generator=generator or self.generator(), classes=classes, guidance=w,
                                     step=self.chain_step(n, cfg.sampler, w),
                                     progress=progress or self.chain_progress(n))
        return images.float()

    @torch.no_grad()
    def edit(self, images: torch.Tensor, *, keep: torch.Tensor | None = None, strength: float = 1.0,
             classes: torch.Tensor | None = None, guidance: float | None = None,
             generator: torch.Generator | None = None, progress: Callable[[float], None] | None = None
             ) -> torch.Tensor:
        """``sampling.editing.edit`` with this run's sampler, precision, ``--resample``, ``--kept_guidance``,
        ``--candidates`` (inpainting) and ``guidance`` (default ``--guidance``) towards ``classes`` (None: "no
        class", unguided); the noise of offset 2 unless ``generator`` is given; ``progress`` as in ``sample``."""
        cfg = self.config
        w = 0.0 if classes is None else cfg.guidance if guidance is None else guidance
        candidates = 1 if keep is None else cfg.candidates
        # backward passes, or steps that see the kept pixels: no captured graph
        eager = keep is not None and (pull_applies(cfg.kept_guidance, cfg.resample) or self.ema.mask_conditional)
        with autocast(self.device, self.precision):
            return edit(self.ema, images, keep=keep, strength=strength, resample=cfg.resample, sampler=cfg.sampler,
                        steps=cfg.chain_length, generator=generator or self.generator(2), classes=classes,
                        guidance=w, kept_guidance=cfg.kept_guidance, candidates=candidates,
                        step=None if eager else self.chain_step(len(images) * candidates, cfg.sampler, w),
                        progress=progress or self.chain_progress(len(images)))

    def fid_sample_fn(self):
        """``(n, labels) -> n images in [0, 1]``, of the classes ``labels`` ([n], or None for an unconditional
        model); each call continues one noise stream."""
        generator = self.generator(1)
        return lambda n, labels=None: self.sample(n, generator=generator, classes=labels)

    def class_rows(self, per_class: int) -> torch.Tensor:
        """Labels for a row of ``per_class`` images of each class, in label order: [0, 0, ..., 1, 1, ...]."""
        return torch.arange(len(self.classes)).repeat_interleave(per_class)

    def preview(self, count: int) -> tuple[torch.Tensor, int | None]:
        """A grid's ``count`` images, and its images per row (None: a square-ish grid). A class-conditional model's
        grid has a row per class, of ``ceil(count / classes)`` images."""
        if not self.classes:
            return self.sample(count), None
        labels = self.class_rows(math.ceil(count / len(self.classes)))
        return self.sample(len(labels), classes=labels), len(labels) // len(self.classes)

    def guidance_figure(self, path: Path, *, step: int) -> Path:
        """Each class (``--num_vis // classes`` rows of it, at least one) drawn at each of ``GUIDANCE_SCALES``,
        every row from the same noise at every scale."""
        labels = self.class_rows(max(1, self.config.num_vis // len(self.classes)))
        images = {w: self.sample(len(labels), classes=labels, guidance=w) for w in GUIDANCE_SCALES}
        names = [self.classes[label] for label in labels.tolist()]
        cfg = self.config
        return save_guidance_figure(images, names, path,
                                    title=f"classifier-free guidance scale w ({cfg.sampler_name}), after {step} training "
                                          f"steps")
