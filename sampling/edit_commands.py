"""The ``--inpaint`` and ``--img2img`` commands: read the input images and the mask, edit them with the EMA model
in batches, and write a grid, a figure and every result as an image of its own.

Inputs are cropped and resized as training images are (``imagedata.files.decode_image``, at the model's size and
channels). A mask is a named region (``settings.config.MASKS``; ``strokes`` draws random thick strokes, other ones per
result) or a mask image, white where the model fills; a mask image must be square or the size of every input,
and is cropped and resized as they are. Outputs, in ``--save_folder``:

- ``inpaint-<step>.png`` / ``img2img-<step>-s<strength>.png``: a row per input: the input, the masked input
  (inpainting), then ``--edits`` results.
- ``inpaint-<step>/`` / ``img2img-<step>-s<strength>/``: each result as ``<input name>-<k>.png``.
- ``img2img-strengths-<step>.png``: the first inputs redrawn at strengths 0 to 1 (a class-conditional model
  with ``--sample_class``: also a row per class for the first input).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from evaluation.figures import save_grid, save_table
from imagedata.files import IMAGE_EXTENSIONS, UnreadableImage, decode_image, scan
from runtime.errors import UserError
from sampling.editing import pull_applies
from settings.config import MASKS

STRENGTHS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # the columns of the strengths figure
BATCH = 64  # images per chain


def input_files(path: str, flag: str) -> list[Path]:
    """The image ``path`` names, or every image in the folder ``path``; one-line errors otherwise."""
    source = Path(path).expanduser()
    if source.is_dir():
        return list(scan(source, "all").files)
    if not source.exists():
        raise UserError(f"--{flag} {source} does not exist; pass an image or a folder of images")
    if source.suffix.lower() not in IMAGE_EXTENSIONS:
        raise UserError(f"--{flag} {source} is not an image ({', '.join(IMAGE_EXTENSIONS)}); pass an image or a folder")
    return [source]


def read_inputs(files: list[Path], size: int, channels: int, flag: str) -> torch.Tensor:
    """The images in [0, 1], [N, C, S, S], decoded as training images are."""
    out = []
    for path in files:
        try:
            pixels, _ = decode_image(path, size, channels=channels)
        except UnreadableImage as e:
            raise UserError(f"--{flag}: {path} cannot be used ({e}); replace it or leave it out") from None
        out.append(torch.from_numpy(pixels.transpose(2, 0, 1).copy()))
    return torch.stack(out).float() / 255


def named_mask(name: str, size: int, *, generator: torch.Generator) -> torch.Tensor:
    """A named region as a float [1, S, S] mask, 1 where the model fills."""
    mask = torch.zeros(1, size, size)
    half, quarter = size // 2, size // 4
    if name == "centre":
        mask[:, quarter:size - quarter, quarter:size - quarter] = 1
    elif name in ("left", "right"):
        mask[:, :, :half] = 1
        mask = mask if name == "left" else mask.flip(2)
    elif name in ("top", "bottom"):
        mask[:, :half] = 1
        mask = mask if name == "top" else mask.flip(1)
    else:  # strokes: four thick random lines
        picture = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(picture)
        points = (torch.rand(4, 4, generator=generator) * size).tolist()
        for x0, y0, x1, y1 in points:
            draw.line((x0, y0, x1, y1), fill=255, width=max(2, size // 8))
        mask = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255)[None].round()
    return mask


def mask_image(path: Path, files: list[Path], size: int) -> torch.Tensor:
    """A mask image as a float [1, S, S] mask (white: fill), after checking that it fits the inputs."""
    try:
        with Image.open(path) as im:
            shape = im.size
        sizes = set()
        for file in files:
            with Image.open(file) as im:
                sizes.add(im.size)
        pixels, _ = decode_image(path, size, channels=1)
    except (OSError, UnreadableImage) as e:
        raise UserError(f"--mask {path} cannot be read ({e}); pass a mask image or one of {', '.join(MASKS)}") from None
    if shape[0] != shape[1] and sizes != {shape}:
        raise UserError(f"--mask {path} is {shape[0]} x {shape[1]} pixels and the images are "
                        f"{', '.join(f'{w} x {h}' for w, h in sorted(sizes)[:3])}; pass a square mask or one of the "
                        f"images' size")
    return torch.from_numpy((pixels[:, :, 0] > 127).astype(np.float32))[None]


def masks_for(config, files: list[Path], count: int, size: int) -> torch.Tensor:
    """``count`` masks [count, 1, S, S] (1: fill): the same for every result, or fresh strokes for each one, drawn
    on the CPU from ``--seed`` (whatever device the model is on)."""
    generator = torch.Generator().manual_seed(config.seed)
    if config.mask in MASKS:
        if config.mask == "strokes":
            return torch.stack([named_mask("strokes", size, generator=generator) for _ in range(count)])
        masks = named_mask(config.mask, size, generator=generator)[None].expand(count, -1, -1, -1)
    else:
        path = Path(config.mask).expanduser()
        if not path.is_file():
            raise UserError(f"--mask {config.mask} is neither a mask image nor one of {', '.join(MASKS)}")
        masks = mask_image(path, files, size)[None].expand(count, -1, -1, -1)
    fill = float(masks[0].mean())
    if fill == 0.0 or fill == 1.0:
        what = "nothing" if fill == 0.0 else "every pixel"
        raise UserError(f"--mask {config.mask} hides {what} at {size}px, so there is nothing to fill; pass a mask "
                        f"with both white (fill) and black (keep) pixels")
    return masks


def in_batches(fn, count: int, per_image: int = 1):
    """``fn(start, stop)`` over ``range(count)`` in chunks of ``BATCH`` chains (``per_image`` of each image),
    results concatenated."""
    size = max(1, BATCH // per_image)
    return torch.cat([fn(start, min(start + size, count)) for start in range(0, count, size)])


def _write_each(results: torch.Tensor, files: list[Path], edits: int, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for n, image in enumerate(results):
        save_grid(image[None], folder / f"{files[n // edits].stem}-{n % edits}.png", nrow=1)
    return folder


def inpaint_command(model, label: int | None) -> list[Path]:
    """``--inpaint`` with the loaded model (``sampling.model.LoadedModel``), towards the class ``label`` if given;
    returns the grid, the figure and the folder of single results."""
    config, diffusion, step = model.config, model.diffusion, model.step
    files = input_files(config.inpaint, "inpaint")
    inputs = read_inputs(files, diffusion.image_size, diffusion.channels, "inpaint")
    repeated = inputs.repeat_interleave(config.edits, dim=0)
    masks = masks_for(config, files, len(repeated), diffusion.image_size)
    generator = model.sampler.generator(2)
    classes = None if label is None else torch.full((len(repeated),), label)
    with model.sampler.progress(len(repeated), "inpainting"):
        results = in_batches(lambda a, b: model.sampler.edit(
            repeated[a:b], keep=1 - masks[a:b], classes=None if classes is None else classes[a:b],
            generator=generator).cpu(), len(repeated), config.candidates)
    masked = torch.where(masks.bool(), torch.full_like(repeated, 0.5), repeated)
    name = f"inpaint-{step}"
    rows = torch.cat([torch.stack([inputs[i], masked[i * config.edits], *results[i * config.edits:(i + 1) *
                                                                                 config.edits]])
                      for i in range(len(inputs))])
    grid = save_grid(rows, Path(config.save_folder) / f"{name}.png", nrow=config.edits + 2)
    shown = min(len(inputs), config.num_vis)
    pull = f", pulled at {config.kept_guidance:g}" if pull_applies(config.kept_guidance, config.resample) else ""
    pull += f", the consensus of {config.candidates}" if config.candidates > 1 else ""
    columns = {"input": inputs[:shown], "masked": masked[::config.edits][:shown]}
    columns.update({f"result {k + 1}": results[k::config.edits][:shown] for k in range(config.edits)})
    figure = save_table(columns, Path(config.save_folder) / f"{name}-figure.png",
                        title=f"inpainting ({config.mask}, {config.resample} resampling(s) per step{pull}, "
                              f"{config.sampler_name}), after {step} training steps")
    return [grid, figure, _write_each(results, files, config.edits, Path(config.save_folder) / name)]


def img2img_command(model, label: int | None) -> list[Path]:
    """``--img2img`` with the loaded model (``sampling.model.LoadedModel``), towards the class ``label`` if given;
    returns the grid, the strengths figure and the folder of single results."""
    config, diffusion, step, classes_of = model.config, model.diffusion, model.step, model.classes
    files = input_files(config.img2img, "img2img")
    inputs = read_inputs(files, diffusion.image_size, diffusion.channels, "img2img")
    repeated = inputs.repeat_interleave(config.edits, dim=0)
    generator = model.sampler.generator(2)

    def redraw(images, strength, classes):
        return in_batches(lambda a, b: model.sampler.edit(
            images[a:b], strength=strength, classes=None if classes is None else classes[a:b],
            generator=generator).cpu(), len(images))

    classes = None if label is None else torch.full((len(repeated),), label)
    shown = inputs[:min(len(inputs), config.num_vis)]
    row_names = [path.stem for path in files[:len(shown)]]
    row_classes = None if label is None else torch.full((len(shown),), label)
    if label is not None and classes_of:  # the first input turned into each class
        shown = torch.cat([shown, inputs[:1].expand(len(classes_of), -1, -1, -1)])
        row_names += [f"to {name}" for name in classes_of]
        row_classes = torch.cat([row_classes, torch.arange(len(classes_of))])
    chains = len(repeated) * (config.strength > 0) + len(shown) * sum(s > 0 for s in STRENGTHS)
    with model.sampler.progress(chains, "redrawing"):
        results = redraw(repeated, config.strength, classes)
        columns = {f"s = {s:g}": redraw(shown, s, row_classes) for s in STRENGTHS}
    name = f"img2img-{step}-s{config.strength:g}"
    rows = torch.cat([torch.stack([inputs[i], *results[i * config.edits:(i + 1) * config.edits]])
                      for i in range(len(inputs))])
    grid = save_grid(rows, Path(config.save_folder) / f"{name}.png", nrow=config.edits + 1)
    target = f" towards {classes_of[label]} at w = {config.guidance:g}" if label is not None else ""
    figure = save_table(columns, Path(config.save_folder) / f"img2img-strengths-{step}.png",
                        row_names=row_names, title=f"image-to-image at each strength{target} ({config.sampler_name}), "
                                                   f"after {step} training steps")
    return [grid, figure, _write_each(results, files, config.edits, Path(config.save_folder) / name)]
