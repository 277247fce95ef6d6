"""Finding a run's images on disk and decoding one file into a square uint8 array.

Layouts (``scan``): any folder of images, with the images lying in it directly (flat) or in sub-folders at any
depth (nested); ``--data_class NAME`` reads the sub-folder NAME only, as with AFHQ's ``<data_path>/cat/``
(``./data/train/cat/flickr_cat_000002.jpg``), and ``--data_class all`` reads everything. Files ending in .jpg,
.jpeg, .png, .webp, .bmp, .gif (its first frame), .tif or .tiff (any case) are images; every other file is
counted as "not an image", and every name starting with a dot (such as the ``.cache`` folder) is ignored.
Symlinked folders are followed, each real folder read once.

Decoding conventions (``decode_image``):
- The result is uint8, shape [S, S, C] (height, width, channel), values 0 ... 255: RGB (C = 3), or grey
  (C = 1, ITU-R 601 luma of the RGB image) for a grayscale run.
- EXIF orientation is applied; the image is center-cropped to a square (short side kept) and resized to
  S x S with the LANCZOS filter (antialiased). JPEGs are first decoded at a reduced scale by the JPEG
  decoder itself, never below twice the target size, which keeps the quality and saves most of the work.
- An image smaller than S is upsampled up to 2x; one whose short side is below S / 2 is refused as too small
  (``TooSmall``): upsampled further it would teach the model blur.
- Grayscale, palette, CMYK and 1-bit images are converted to RGB; 16-bit grayscale is scaled by
  255 / 65535; transparent pixels (RGBA, LA, palette or colour-key transparency) are composited onto white.
- A file that cannot be decoded, or that claims more than ``max_pixels`` pixels (a decompression bomb:
  a tiny file declaring an enormous image), raises ``UnreadableImage`` before any pixel memory is spent.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from runtime.errors import UserError

CLASSES = ("cat", "dog", "wild")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_PIXELS = 64 * 1024 * 1024  # 8192 x 8192; AFHQ images are 512 x 512
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class UnreadableImage(Exception):
    """A file that is corrupt, truncated, not really an image, or too large to decode safely."""


class TooSmall(UnreadableImage):
    """An image whose short side is below half the training size: upsampling it more than 2x gives mostly blur."""


@dataclass(frozen=True)
class Found:
    """The image files a run reads: ``files`` (sorted) under ``folder`` (``root`` or its sub-folder ``selection``),
    and how many other visible files lay there (``others``: not images by their extension)."""

    root: Path
    selection: str
    files: tuple[Path, ...]
    others: int = 0

    @property
    def folder(self) -> Path:
        return self.root if self.selection == "all" else self.root / self.selection

    def folder_counts(self, files: Sequence[Path] | None = None) -> dict[str, int]:
        """Images (``files``, default all found) per first folder under ``folder`` ("." for the images lying in it
        directly), in sorted order."""
        counts: dict[str, int] = {}
        for path in self.files if files is None else files:
            parts = path.relative_to(self.folder).parts
            counts[parts[0] if len(parts) > 1 else "."] = counts.get(parts[0] if len(parts) > 1 else ".", 0) + 1
        return dict(sorted(counts.items(), key=lambda item: (item[0] != ".", item[0])))

    @property
    def layout(self) -> str:
        """"flat" (every image directly in ``folder``) or "nested" (in sub-folders, with or without loose ones)."""
        return "flat" if set(self.folder_counts()) == {"."} else "nested"

    def where(self, files: Sequence[Path] | None = None, most: int = 4) -> str:
        """The folders and their image counts (of ``files``, default all found), for one line: ``./ (5,153)``, or
        ``./ (20), roses/ (40), ...``."""
        counts = self.folder_counts(files)
        shown = [f"{name}/ ({count:,})" for name, count in list(counts.items())[:most]]
        if len(counts) > most:
            shown.append(f"and {len(counts) - most} more folders")
        return ", ".join(shown)


def find_images(data_path: str | Path, data_class: str) -> list[Path]:
    """All image files of ``data_class`` under ``data_path``, sorted by path (see ``scan``)."""
    return list(scan(data_path, data_class).files)


def scan(data_path: str | Path, data_class: str) -> Found:
    """The images a run with ``--data_path data_path --data_class data_class`` reads.

    ``data_class`` is the name of a sub-folder of ``data_path`` (``cat``), or ``"all"``: every image under
    ``data_path``, lying in it directly or in sub-folders at any depth. Raises ``UserError`` (one line) for a
    missing path, a missing sub-folder (listing the folders there), or a folder without images (saying what it
    holds instead).
    """
    root = Path(data_path).expanduser()
    if not root.exists():
        raise UserError(f"--data_path {root} does not exist; pass the folder that holds your images (e.g. "
                        f"--data_path ~/pictures), or --data_path ./data/train --download always to fetch AFHQ there")
    if not root.is_dir():
        raise UserError(f"--data_path {root} is a file, not a folder; pass the folder that holds the images")
    if not data_class or data_class.startswith((".", "/")) or ".." in Path(data_class).parts:
        raise UserError(f"--data_class {data_class!r} is not a folder name; pass the name of a sub-folder of "
                        f"--data_path, or all")
    folder = root if data_class == "all" else root / data_class
    if not folder.is_dir():
        raise UserError(_missing_folder(root, data_class))
    files, others = _images_in(folder)
    if not files:
        raise UserError(_no_images(folder, others))
    return Found(root, data_class, tuple(sorted(files)), len(others))


def has_images(folder: str | Path) -> bool:
    """Whether ``folder`` holds at least one image file, at any depth."""
    folder = Path(folder).expanduser()
    return folder.is_dir() and next(_walk_images(folder), None) is not None


def sub_folders(folder: Path) -> list[str]:
    """The visible sub-folders of ``folder``, by name."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _missing_folder(root: Path, name: str) -> str:
    if root.name == name and has_images(root):
        return f"--data_path {root} is the {name} folder itself; pass its parent: --data_path {root.parent}"
    afhq = " or --download always to fetch AFHQ there" if name in CLASSES else ""
    folders = sub_folders(root)
    if folders:
        listed = ", ".join(f"{f}/" for f in folders[:8]) + (f" and {len(folders) - 8} more" if len(folders) > 8 else "")
        return (f"--data_path {root} has no {name}/ folder; its folders are {listed}: pass one of them as "
                f"--data_class, or --data_class all to train on every image under it{afhq}")
    return (f"--data_path {root} has no {name}/ folder and no sub-folders; --data_class all trains on the images "
            f"in it{afhq}")


def _no_images(folder: Path, others: list[Path]) -> str:
    if not others:
        return f"{folder} holds no files; put the images there ({', '.join(IMAGE_EXTENSIONS)}) or pass another folder"
    names = ", ".join(p.name for p in others[:3])
    return (f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}), only {len(others)} other "
            f"file{'s' * (len(others) != 1)} (such as {names}); put the images there or pass another folder")


def _walk_images(folder: Path, others: list[Path] | None = None):
    """Image files under ``folder`` (recursive, in os.walk order), skipping hidden files and folders; visible files
    that are not images go to ``others``. A symlinked folder is followed; each real folder is read once, so a
    link back up the tree ends there."""
    seen = set()
    for current, folders, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(current)
        if real in seen:
            folders[:] = []
            continue
        seen.add(real)
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        for name in sorted(names):
            path = Path(current) / name
            if name.startswith(".") or not path.is_file():
                continue
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                yield path
            elif others is not None:
                others.append(path)


def _images_in(folder: Path) -> tuple[list[Path], list[Path]]:
    """The image files under ``folder`` and the other visible files (see ``_walk_images``)."""
    others: list[Path] = []
    return list(_walk_images(folder, others)), others


def decode_image(path: str | Path, image_size: int, *, channels: int = 3,
                 max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, bool]:
    """Decode one file to a uint8 [S, S, C] array, RGB for ``channels`` 3 and grey for 1 (see the module
    docstring for every step).

    Returns ``(pixels, upsampled)``, where ``upsampled`` says the short side was below ``image_size``.
    Raises ``UnreadableImage`` with the reason when the file cannot be used, ``TooSmall`` when its short side is
    below half of ``image_size``. Callers that decode in
    threads should silence ``PIL.Image.DecompressionBombWarning`` once, around the whole pool.
    """
    try:
        with Image.open(path) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise UnreadableImage(f"{width} x {height} pixels is over the limit of {max_pixels} "
                                      f"(a decompression bomb, or far larger than needed)")
            if 2 * min(width, height) < image_size:
                raise TooSmall(f"{width} x {height} pixels, less than half of {image_size}px")
            upsampled = min(width, height) < image_size
            if im.format == "JPEG":
                im.draft(im.mode, (2 * image_size, 2 * image_size))  # DCT-domain downscale, >= 2x the target
            im.load()
            rgb = to_rgb(ImageOps.exif_transpose(im))
            if channels == 1:
                rgb = rgb.convert("L")  # ITU-R 601 luma
            square = rgb.crop(center_square(rgb.size))  # crop first: the filter must not reach past the square
            out = square.resize((image_size, image_size), Image.Resampling.LANCZOS, reducing_gap=3.0)
            pixels = np.asarray(out, dtype=np.uint8)
            return (pixels[:, :, None] if channels == 1 else pixels), upsampled
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
