"""Finding the AFHQ images on disk and decoding one file into a square uint8 array.

Layout: ``<data_path>/<class>/...`` with classes ``cat``, ``dog`` and ``wild``, as in the AFHQ archive
(``./data/train/cat/flickr_cat_000002.jpg``). Files ending in .jpg, .jpeg, .png, .webp, .bmp, .gif (its first
frame), .tif or .tiff (any case) are images; every other file, and every name starting with a dot (such as the
``.cache`` folder), is ignored. Symlinked folders are followed, each real folder read once.

Decoding conventions (``decode_image``):
- The result is uint8 RGB, shape [S, S, 3] (height, width, channel), values 0 ... 255.
- EXIF orientation is applied; the image is center-cropped to a square (short side kept) and resized to
  S x S with the LANCZOS filter (antialiased). JPEGs are first decoded at a reduced scale by the JPEG
  decoder itself, never below twice the target size, which keeps the quality and saves most of the work.
- Grayscale, palette, CMYK and 1-bit images are converted to RGB; 16-bit grayscale is scaled by
  255 / 65535; transparent pixels (RGBA, LA, palette or colour-key transparency) are composited onto white.
- A file that cannot be decoded, or that claims more than ``max_pixels`` pixels (a decompression bomb:
  a tiny file declaring an enormous image), raises ``UnreadableImage`` before any pixel memory is spent.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from errors import UserError

CLASSES = ("cat", "dog", "wild")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_PIXELS = 64 * 1024 * 1024  # 8192 x 8192; AFHQ images are 512 x 512
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class UnreadableImage(Exception):
    """A file that is corrupt, truncated, not really an image, or too large to decode safely."""


def find_images(data_path: str | Path, data_class: str) -> list[Path]:
    """All image files of ``data_class`` under ``data_path``, sorted by path.

    ``data_class`` is one of ``CLASSES`` or ``"all"``, which means every class folder present (every
    non-hidden sub-folder of ``data_path``). Class folders are searched recursively. Raises ``UserError``
    (one line) for a missing path, a missing class folder, or a class folder without images.
    """
    root = Path(data_path).expanduser()
    if data_class not in (*CLASSES, "all"):
        raise UserError(f"--data_class {data_class!r} is not one of {', '.join(CLASSES)}, all; pick one of those")
    if not root.exists():
        raise UserError(f"--data_path {root} does not exist; pass the folder that holds cat/, dog/ or wild/ "
                        f"(e.g. --data_path ./data/train), or run with --download always to fetch AFHQ there")
    if not root.is_dir():
        raise UserError(f"--data_path {root} is a file, not a folder; pass the folder that holds cat/, dog/ or "
                        f"wild/ (e.g. --data_path ./data/train)")
    files: list[Path] = []
    for folder in _class_folders(root, data_class):
        found = _images_in(folder)
        if not found:
            others = sum(1 for p in folder.rglob("*") if p.is_file())
            what = f" (only {others} other file{'s' * (others != 1)})" if others else ""
            raise UserError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}){what}; put the images "
                            f"there, or pass another --data_path, or delete the folder and run with --download always")
        files.extend(found)
    return sorted(files)


def _class_folders(root: Path, data_class: str) -> list[Path]:
    """The class folders to read: ``root/data_class``, or every visible sub-folder for ``"all"``."""
    if data_class == "all":
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise UserError(f"{root} has no class folders (cat/, dog/, wild/); pass the folder that holds them "
                            f"as --data_path (e.g. ./data/train), or run with --download always")
        return folders
    folder = root / data_class
    if folder.is_dir():
        return [folder]
    if root.name == data_class and _images_in(root):
        raise UserError(f"--data_path {root} is the {data_class} folder itself; pass its parent: "
                        f"--data_path {root.parent}")
    raise UserError(f"{root} has no {data_class}/ folder; pass the folder that holds {data_class}/ as --data_path "
                    f"(e.g. ./data/train), or run with --download always to fetch AFHQ there")


def _images_in(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive), skipping hidden files and folders. A symlinked folder is
    followed; each real folder is read once, so a link back up the tree ends there."""
    found, seen = [], set()
    for current, folders, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(current)
        if real in seen:
            folders[:] = []
            continue
        seen.add(real)
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        for name in names:
            path = Path(current) / name
            if not name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                found.append(path)
    return found


def decode_image(path: str | Path, image_size: int, *, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, bool]:
    """Decode one file to a uint8 [S, S, 3] RGB array (see the module docstring for every step).

    Returns ``(pixels, upsampled)``, where ``upsampled`` says the short side was below ``image_size``.
    Raises ``UnreadableImage`` with the reason when the file cannot be used. Callers that decode in
    threads should silence ``PIL.Image.DecompressionBombWarning`` once, around the whole pool.
    """
    try:
        with Image.open(path) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise UnreadableImage(f"{width} x {height} pixels is over the limit of {max_pixels} "
                                      f"(a decompression bomb, or far larger than needed)")
            upsampled = min(width, height) < image_size
            if im.format == "JPEG":
                im.draft(im.mode, (2 * image_size, 2 * image_size))  # DCT-domain downscale, >= 2x the target
            im.load()
            rgb = to_rgb(ImageOps.exif_transpose(im))
            square = rgb.crop(center_square(rgb.size))  # crop first: the filter must not reach past the square
            out = square.resize((image_size, image_size), Image.Resampling.LANCZOS, reducing_gap=3.0)
            return np.asarray(out, dtype=np.uint8), upsampled
    except UnreadableImage:
        raise
    except Image.DecompressionBombError as e:
        raise UnreadableImage(f"refused as a decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        reason = (str(e) or type(e).__name__).replace(str(path), Path(path).name)  # keep messages short
        raise UnreadableImage(reason) from None


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: 16-bit scaled down, transparency composited onto white."""
    if im.mode in _SIXTEEN_BIT_MODES or im.mode == "I":
        gray = np.asarray(im).astype(np.float64)
        if im.mode in _SIXTEEN_BIT_MODES or gray.max(initial=0) > 255:  # "I" holds 16-bit PNGs in older Pillow
            gray = gray * (255.0 / 65535.0)
        return Image.fromarray(np.clip(np.rint(gray), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def center_square(size: Sequence[int]) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) box of the largest centered square in an image of ``(width, height)``."""
    width, height = size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side
