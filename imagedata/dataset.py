"""The decoded images and the batches the trainer draws from them.

Each image is decoded once (``imagedata.files.decode_image``) into one uint8 tensor [N, C, S, S] (values 0 ... 255; C is
3, or 1 for grayscale data), kept in the disk cache of ``image_cache`` beside the data, so a later run loads it
in a moment. A second key hashes the decoded pixels; the FID statistics are named by it, so they survive a
folder that is copied or re-extracted with the same images. ``DeviceBatches`` keeps that tensor on the training
device and serves float32 batches in [-1, 1] with random horizontal flips applied there; ``StreamingBatches``
decodes per sample through a DataLoader when the tensor would not fit in memory. ``make_batches`` picks between
the two and writes the one-line ``summary`` of what the folder held.

A file's class is the class folder it lies in (its first folder under the data path); labels number the class
names in sorted order, so they are the same on every run. The cache's file list gives each row's class.
"""
from __future__ import annotations

import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from imagedata.batches import DataWarning, DeviceBatches, StreamingBatches, available_cores, default_num_workers
from imagedata.cache import (
    CACHE_FORMAT,
    PREPROCESSING,
    cache_dir_candidates,
    cache_key,
    cache_name,
    pixels_key,
    read_cache,
    resolve_cache_dir,
    write_cache,
)
from imagedata.files import CLASSES, MAX_PIXELS, Found, TooSmall, UnreadableImage, decode_image, find_images, scan
from runtime.errors import UserError
from runtime.memory import available_memory_bytes

__all__ = ["CLASSES", "DataWarning", "DeviceBatches", "ImageSet", "StreamingBatches", "TrainingData",
           "cache_dir_candidates", "cache_key", "class_labels", "find_images", "load_images", "make_batches",
           "pixels_key", "resolve_cache_dir"]



@dataclass
class ImageSet:
    """The decoded images of one (folder, selection, size, channels).

    ``images`` is uint8 [N, C, S, S] on the CPU; row i is ``files[i]`` (files that could not be read are
    left out and counted in ``skipped``, those too small in ``too_small``; ``found`` is what the folder held). ``key`` fingerprints the files (names, sizes, modification times)
    and names the cache; ``pixels_key`` fingerprints the decoded pixels themselves and names what is derived
    from them (the FID statistics), so that a copied or touched folder with the same images reuses it.
    ``classes`` are the class folders' names, sorted, and ``labels`` (long [N]) the class of each row.
    """

    images: torch.Tensor
    key: str
    files: list[Path]
    skipped: int
    upsampled: int = 0
    cache_path: Path | None = None
    from_cache: bool = False
    pixels_key: str = ""
    classes: tuple[str, ...] = ()
    labels: torch.Tensor | None = None
    too_small: int = 0
    found: Found | None = None

    def __post_init__(self):
        if not self.pixels_key:
            self.pixels_key = pixels_key(self.images.numpy())

    def of_class(self, label: int) -> torch.Tensor:
        """The images of one class, uint8 [N_c, C, S, S]."""
        return self.images[self.labels == label]

    def class_keys(self) -> dict[str, str]:
        """Each class's ``pixels_key``: the fingerprint of its own images, naming its FID statistics."""
        return {name: pixels_key(self.of_class(label).numpy()) for label, name in enumerate(self.classes)}


def class_labels(files: list[Path], root: Path) -> tuple[tuple[str, ...], torch.Tensor]:
    """The sorted class names of ``files`` (each file's first folder under ``root``) and each file's label."""
    folders = [path.relative_to(root).parts[0] for path in files]
    classes = tuple(sorted(set(folders)))
    index = {name: label for label, name in enumerate(classes)}
    return classes, torch.tensor([index[folder] for folder in folders], dtype=torch.long)


def load_images(data_path: str | Path, data_class: str, image_size: int, *, cache_dir: str | Path | None = None,
                progress: bool = True, max_pixels: int = MAX_PIXELS, channels: int = 3,
                found: Found | None = None) -> ImageSet:
    """Decode every image ``scan(data_path, data_class)`` finds (or ``found``) once, or load them from the disk
    cache; ``channels`` 1 decodes them grey.

    Unreadable files are skipped with one ``DataWarning`` giving their count, and so are images too small to
    upsample (below half of ``image_size``); images smaller than ``image_size`` are upsampled, with another.
    Raises ``UserError`` when there is nothing to load.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise UserError(f"--image_size {image_size!r} is not a positive whole number; pass e.g. --image_size 32")
    root = Path(data_path).expanduser()
    found = found or scan(root, data_class)
    files = list(found.files)
    key = cache_key(files, image_size, root=root, max_pixels=max_pixels, channels=channels)
    folder = resolve_cache_dir(root, cache_dir)
    stem = f"{cache_name(found.selection)}_{image_size}px{'_grey' if channels == 1 else ''}_{key}"
    cached = read_cache(folder, stem, key) if folder is not None else None
    if cached is not None:
        array, meta = cached
        kept = [root / name for name in meta["files"]]
        too_small = sum(entry[2] == "too small" for entry in meta["skipped"])
        image_set = ImageSet(torch.from_numpy(array), key, kept, len(meta["skipped"]) - too_small, meta["upsampled"],
                             folder / f"{stem}.npy", from_cache=True, pixels_key=meta.get("pixels_key", ""),
                             too_small=too_small, found=found, **_classes_of(kept, root))
        _warn_about_files(root, image_size, meta["skipped"], meta["upsampled"])
        return image_set
    array, kept, skipped, upsampled = _decode_all(files, image_size, channels=channels, progress=progress,
                                                  max_pixels=max_pixels)
    if not kept:
        raise UserError(_nothing_readable(root, files, skipped, image_size))
    meta = {"format": CACHE_FORMAT, "key": key, "shape": list(array.shape), "crc32": zlib.crc32(array),
            "pixels_key": pixels_key(array),
            "image_size": image_size, "preprocessing": PREPROCESSING, "upsampled": len(upsampled),
            "root": str(root.resolve()),
            "files": [p.relative_to(root).as_posix() for p in kept],
            "skipped": [[p.relative_to(root).as_posix(), reason, kind] for p, reason, kind in skipped]}
    path = write_cache(folder, stem, array, meta) if folder is not None else None
    _warn_about_files(root, image_size, meta["skipped"], len(upsampled), example=upsampled[:1])
    too_small = sum(kind == "too small" for _, _, kind in skipped)
    return ImageSet(torch.from_numpy(array), key, kept, len(skipped) - too_small, len(upsampled), path,
                    from_cache=False, pixels_key=meta["pixels_key"], too_small=too_small, found=found,
                    **_classes_of(kept, root))


def _nothing_readable(root: Path, files: list[Path], skipped: list, image_size: int) -> str:
    """Why none of ``files`` could be used, in one line: all too small (and the size that takes them), or not."""
    small = [reason for _, reason, kind in skipped if kind == "too small"]
    if len(small) == len(files):
        largest = max(int(min(reason.split(" pixels")[0].split(" x "))) for reason in small)
        many = f"all {len(files)} images under {root} are" if len(files) > 1 else f"the 1 image under {root} is"
        return (f"{many} smaller than half of {image_size}px (the largest has a "
                f"short side of {largest}px), too small to upsample; pass --image_size {2 * largest} or less "
                f"(images up to 2x smaller are upsampled)")
    path, reason, _ = next(entry for entry in skipped if entry[2] != "too small")
    return (f"none of the {len(files)} images under {root} could be read (e.g. {path.relative_to(root)}: {reason}); "
            f"replace them or pass another --data_path")


def _classes_of(files: list[Path], root: Path) -> dict:
    classes, labels = class_labels(files, root)
    return {"classes": classes, "labels": labels}


def _decode_all(files: list[Path], image_size: int, *, channels: int, progress: bool, max_pixels: int):
    """Decode ``files`` with a thread pool (PIL releases the GIL); returns (array, kept, skipped, upsampled), each
    skipped file as (path, reason, "unreadable" or "too small")."""
    out = np.empty((len(files), channels, image_size, image_size), dtype=np.uint8)
    kept: list[Path] = []
    skipped: list[tuple[Path, str, str]] = []
    upsampled: list[Path] = []

    def decode(path: Path):
        try:
            return decode_image(path, image_size, channels=channels, max_pixels=max_pixels)
        except UnreadableImage as e:
            return str(e), "too small" if isinstance(e, TooSmall) else "unreadable"

    with warnings.catch_warnings(), ThreadPoolExecutor(min(available_cores(), 8)) as pool:
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        results = pool.map(decode, files)
        bar = tqdm(zip(files, results), total=len(files), desc=f"decoding images to {image_size}px", unit="img",
                   disable=not progress, dynamic_ncols=True)
        for path, result in bar:
            if isinstance(result[0], str):
                skipped.append((path, *result))
                continue
            pixels, small = result
            out[len(kept)] = pixels.transpose(2, 0, 1)  # [S, S, C] -> [C, S, S]
            kept.append(path)
            if small:
                upsampled.append(path)
    return out[: len(kept)], kept, skipped, upsampled


def _warn_about_files(root: Path, image_size: int, skipped: list, upsampled: int, *, example=()) -> None:
    """One warning for unreadable files, one for those too small and one for upsampled ones, each with the count."""
    for kind, advice in (("unreadable", "delete or replace them to silence this"),
                         ("too small", "a smaller --image_size takes them")):
        of_kind = [entry for entry in skipped if entry[2] == kind]
        if of_kind:
            name, reason, _ = of_kind[0]
            warnings.warn(f"skipped {len(of_kind)} {kind} image file(s) under {root} (e.g. {name}: {reason}); "
                          f"{advice}", DataWarning, stacklevel=3)
    if upsampled:
        where = f" (e.g. {example[0].name})" if example else ""
        warnings.warn(f"{upsampled} image(s) under {root} are smaller than {image_size}px{where} and were "
                      f"upsampled; a smaller --image_size keeps them sharp", DataWarning, stacklevel=3)


@dataclass
class TrainingData:
    """What a run trains on: the endless ``batches``, the decoded images (``image_set``; None when they are
    streamed from disk), for class-conditional training the class names by label and each class's image count
    (empty otherwise), what the folder held (``found``) and ``summary``, the line that says it all at start."""

    batches: DeviceBatches | StreamingBatches
    image_set: ImageSet | None
    classes: tuple[str, ...] = ()
    class_sizes: tuple[int, ...] = ()
    found: Found | None = None
    summary: str = ""

    def description(self, config) -> dict:
        """What the data was, as a checkpoint records it: layout, folder (and the data path it lies in, resolved, which
        a resume without ``--data_path`` reads), classes, image count, size, channels, the fingerprint of the
        decoded pixels (when they were decoded at once) and how many of them the checkpoint keeps as examples for
        ``--visualize`` (``config.num_vis``)."""
        found = self.found
        out = {"layout": "class folders" if self.classes else found.layout if found else "unknown",
               "folder": found.selection if found else "", "path": str(found.root.resolve()) if found else "",
               "images": len(self.image_set.images) if self.image_set is not None else self.batches.num_images,
               "image_size": config.image_size, "channels": config.channels}
        if self.classes:
            out["classes"] = list(self.classes)
        if self.image_set is not None:
            out["key"] = self.image_set.pixels_key
            out["examples"] = min(config.num_vis, len(self.image_set.images))
        return out

    def examples(self, config):
        """The first ``config.num_vis`` decoded images (uint8 [K, C, S, S]) that the checkpoint keeps, so that
        ``--visualize`` needs no data; None when the images are streamed."""
        return None if self.image_set is None else self.image_set.images[: config.num_vis].clone()


def make_batches(data_path: str | Path, data_class: str, image_size: int, batch_size: int, *,
                 device: torch.device | str, flip: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 cache_dir: str | Path | None = None, memory_fraction: float = 0.25, progress: bool = True,
                 labelled: bool = False, channels: int = 3) -> TrainingData:
    """The training data: ``DeviceBatches`` over the decoded images when their uint8 pixels take at most
    ``memory_fraction`` of the available memory, else ``StreamingBatches`` (and no ``image_set``).

    ``labelled``: class-conditional training on every class folder under ``data_path`` (``data_class`` must be
    ``"all"``); each batch carries its labels, and the data names the classes. A folder with fewer images than a
    batch still trains: each batch then holds some images more than once."""
    root = Path(data_path).expanduser()
    found = scan(root, data_class)
    files = list(found.files)
    classes, labels = class_labels(files, root) if labelled else ((), None)
    if labelled:
        loose = found.folder_counts().get(".", 0)
        if loose:
            lie = f"{loose} images lie" if loose > 1 else "1 image lies"
            raise UserError(f"--class_conditional takes each image's class from its folder, and {lie} directly in "
                            f"{root}; move them into a folder named after their class")
        if len(classes) < 2:
            found_text = f"only {classes[0]}/" if classes else "none"
            raise UserError(f"--class_conditional needs at least two class folders under {root}, and it has "
                            f"{found_text}; put each class's images in a folder of its own there")
    needed = len(files) * channels * image_size * image_size
    free = available_memory_bytes()
    if free is None or needed <= memory_fraction * free:
        image_set = load_images(root, data_class, image_size, cache_dir=cache_dir, progress=progress,
                                channels=channels, found=found)
        batches = DeviceBatches(image_set.images, batch_size, device=device, flip=flip, seed=seed, rank=rank,
                                world_size=world_size, memory_fraction=memory_fraction,
                                labels=image_set.labels if labelled else None)
        data = TrainingData(batches, image_set, *_class_counts(image_set.classes, image_set.labels, labelled),
                            found=found)
    else:
        workers = default_num_workers()
        warnings.warn(f"the {len(files)} images at {image_size}px need {needed / 2**30:.1f} GiB, more than "
                      f"{memory_fraction:.0%} of the {free / 2**30:.1f} GiB of free memory; decoding them from disk "
                      f"with {workers} DataLoader worker(s) instead (slower)", DataWarning, stacklevel=2)
        batches = StreamingBatches(files, image_size, batch_size, device=device, flip=flip, seed=seed, rank=rank,
                                   world_size=world_size, num_workers=workers, labels=labels, channels=channels)
        data = TrainingData(batches, None, *_class_counts(classes, labels, labelled), found=found)
    data.summary = summary(data, image_size, channels, batch_size)
    return data


def summary(data: TrainingData, image_size: int, channels: int, batch_size: int) -> str:
    """One line saying what the run found and reads: how many images in which folders, what was skipped and why."""
    found, image_set = data.found, data.image_set
    layout = "class folders" if data.classes else found.layout
    where = found.where(image_set.files if image_set is not None else None)
    line = (f"data: {data.batches.num_images:,} images in {found.folder} ({layout}: {where}), "
            f"{image_size}px {'grey' if channels == 1 else 'RGB'}")
    if image_set is not None:
        kinds = [(found.others, "not an image"), (image_set.skipped, "unreadable"), (image_set.too_small, "too small")]
    else:
        kinds = [(found.others, "not an image")]
    skipped = [f"{count:,} {kind}" for count, kind in kinds if count]
    if skipped:
        line += f"; skipped {sum(count for count, _ in kinds):,} files ({', '.join(skipped)})"
    if image_set is not None and image_set.upsampled:
        line += f"; {image_set.upsampled:,} upsampled (smaller than {image_size}px)"
    if image_set is None:
        line += "; decoded from disk as it trains"
    if data.batches.repeats > 1:
        line += f"; fewer images than --batch_size {batch_size}, so each batch holds some twice or more"
    return line


def _class_counts(classes: tuple[str, ...], labels: torch.Tensor | None, labelled: bool) -> tuple[tuple, tuple]:
    """The class names and each class's image count of class-conditional data; nothing for unconditional data."""
    if not labelled:
        return (), ()
    return classes, tuple(labels.bincount(minlength=len(classes)).tolist())
