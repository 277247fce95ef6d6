"""Figures of the assignment's 5.3 and 5.4: the forward and backward processes at fixed fractions of T.

The forward figure shows q_sample(x_0, t) for t at 0, 25, 50, 75 and 99 % of T; the backward figure starts
the reverse chain from the forward figure's last (noisiest) image and shows the chain's x_t at the same t.
Each figure has a row per image and a column per timestep, labelled with t (0-indexed, as in the code).
"""
from __future__ import annotations

import os
import textwrap
from pathlib import Path

import torch
from PIL import Image

from diffusion import Diffusion
from runtime.atomic import atomic_write

FRACTIONS = (0.0, 0.25, 0.5, 0.75, 0.99)


def timesteps_at(num_timesteps: int, fractions=FRACTIONS) -> list[int]:
    """0-indexed timesteps at the given fractions of T: int(fraction * T), kept inside [0, T-1]."""
    return [min(num_timesteps - 1, int(f * num_timesteps)) for f in fractions]


@torch.no_grad()
def diffusion_processes(diffusion: Diffusion, x_start: torch.Tensor, *, generator: torch.Generator | None = None,
                        chain_step=None, progress=None):
    """Run both processes on x_start ([B, C, H, W] in [-1, 1]).

    Returns ``(steps, forward, backward, frames)``: ``forward[t]`` and ``backward[t]`` are [B, C, H, W]
    images in [0, 1] at each t in ``steps``; ``frames`` is every state of the backward chain, noisiest first,
    ending with its output. ``chain_step`` is the backward chain's step, as ``Diffusion.run_chain`` takes it
    (a ``sampling.captured_step.ChainStep``; default: the eager step); ``progress`` as ``run_chain`` takes it.
    """
    steps = timesteps_at(diffusion.num_timesteps)
    x_start = x_start.to(diffusion.device)
    noise = torch.randn(x_start.shape, device=x_start.device, generator=generator)
    forward = {}
    for t in steps:
        t_batch = torch.full((x_start.shape[0],), t, device=x_start.device, dtype=torch.long)
        forward[t] = ((diffusion.q_sample(x_start, t_batch, noise) + 1) / 2).clamp(0, 1)
    start = steps[-1]
    x_noisy = forward[start] * 2 - 1
    every = list(range(start, -1, -1))
    final, states = diffusion.p_sample_loop(x_noisy, start_t=start, return_steps=every, generator=generator,
                                            step=chain_step, progress=progress)
    backward = {t: states[t] for t in reversed(steps)}  # noisiest first, as the chain runs
    frames = [states[t] for t in every] + [final]
    return steps, forward, backward, frames


def write_process_figures(diffusion: Diffusion, x_start: torch.Tensor, folder: str | os.PathLike, *, step: int,
                          generator: torch.Generator | None = None, chain_step=None, progress=None) -> list[Path]:
    """``forward_process.png``, ``backward_process.png`` and ``backward_process.gif`` in ``folder``, from
    ``diffusion_processes`` on ``x_start`` with a model trained for ``step`` steps; returns their paths."""
    steps, forward, backward, frames = diffusion_processes(diffusion, x_start, generator=generator,
                                                           chain_step=chain_step, progress=progress)
    folder = Path(folder)
    return [
        save_process_figure(forward, folder / "forward_process.png",
                            title=f"forward process q(x_t | x_0), T = {diffusion.num_timesteps}"),
        save_process_figure(backward, folder / "backward_process.png",
                            title=f"backward process from t = {steps[-1]}, after {step} training steps"),
        save_gif(frames, folder / "backward_process.gif", nrow=min(8, x_start.shape[0])),
    ]


def save_process_figure(images: dict[int, torch.Tensor], path: str | os.PathLike, *, title: str) -> Path:
    """A grid with a row per image and a column per timestep, columns labelled ``t = ...``."""
    return save_table({f"t = {t}": batch for t, batch in images.items()}, path, title=title)


def save_guidance_figure(images: dict[float, torch.Tensor], row_names: list[str], path: str | os.PathLike, *,
                         title: str) -> Path:
    """A grid with a row per image (labelled with its class) and a column per guidance scale ``w``."""
    return save_table({f"w = {w:g}": batch for w, batch in images.items()}, path, title=title, row_names=row_names)


def save_table(images: dict[str, torch.Tensor], path: str | os.PathLike, *, title: str,
               row_names: list[str] | None = None) -> Path:
    """A figure of images in [0, 1]: a column per entry of ``images`` (headed by its key), a row per image of
    each entry's batch (named by ``row_names``, if given), under ``title``."""
    import matplotlib.pyplot as plt

    fig = table_figure(images, title=title, row_names=row_names)
    path = atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return path


def table_figure(images: dict[str, torch.Tensor], *, title: str, row_names: list[str] | None = None):
    """The matplotlib figure of ``save_table``. The title is wrapped to the figure's width (a figure of few columns
    is narrow), and the top of the figure is kept for its lines, however many rows there are."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    columns = list(images)
    rows = images[columns[0]].shape[0]
    width = 1.4 * len(columns) + 0.6 * bool(row_names)
    fontsize = 10
    # a character of the title's font is about 0.55 of its size wide; 72 points to the inch
    lines = textwrap.wrap(title, width=max(12, int(width * 72 / (0.55 * fontsize)) - 2)) or [""]
    title_height = 0.18 * len(lines) + 0.12
    height = 1.4 * rows + title_height + 0.2
    fig, axes = plt.subplots(rows, len(columns), figsize=(width, height), squeeze=False)
    for col, heading in enumerate(columns):
        for row in range(rows):
            ax = axes[row][col]
            pixels = images[heading][row].permute(1, 2, 0).cpu().float().numpy()
            ax.imshow(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels, cmap="gray", vmin=0.0, vmax=1.0,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(heading, fontsize=9)
            if col == 0 and row_names:
                ax.set_ylabel(row_names[row], fontsize=9)
    fig.suptitle("\n".join(lines), fontsize=fontsize)
    fig.tight_layout(rect=(0, 0, 1, 1 - title_height / height))
    return fig


def save_grid(images: torch.Tensor, path: str | os.PathLike, *, nrow: int | None = None) -> Path:
    """A grid of images in [0, 1], ``nrow`` to a row (None: square-ish), as one PNG (grey for 1-channel images),
    written whole or not at all."""
    picture = grid_picture(images, nrow=nrow or max(1, int(len(images) ** 0.5)), pad_value=0.0)
    return atomic_write(path, lambda f: picture.save(f, format="png"))


def grid_picture(images: torch.Tensor, *, nrow: int, pad_value: float) -> Image.Image:
    """Images in [0, 1] ([B, C, H, W]) as one picture, 2-pixel gaps, with ``torchvision.utils.save_image``'s
    rounding; mode L for 1-channel images, RGB otherwise."""
    from torchvision.utils import make_grid

    grid = make_grid(images.detach().float().cpu(), nrow=nrow, padding=2, pad_value=pad_value)
    array = grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array[:, :, 0] if images.shape[1] == 1 else array)


def save_gif(frames: list[torch.Tensor], path: str | os.PathLike, *, nrow: int = 8, scale: int = 2,
             frame_ms: int = 80) -> Path:
    """An animated GIF of a chain: each frame a grid of the batch, the last frame held for a second."""
    pictures = []
    for frame in frames:
        picture = grid_picture(frame, nrow=nrow, pad_value=1.0)
        if scale > 1:
            picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
        pictures.append(picture)
    durations = [frame_ms] * (len(pictures) - 1) + [1000]
    return atomic_write(path, lambda f: pictures[0].save(f, format="GIF", save_all=True, append_images=pictures[1:],
                                                         duration=durations, loop=0))
