"""The decoded-image cache and the batches the trainer draws from it.

Each image is decoded once (``images.decode_image``) into one uint8 tensor [N, 3, S, S] (values 0 ... 255),
saved beside the data as ``<tag>_<S>px_<key>.npy`` plus a JSON file holding the key, shape and CRC-32 of
the array. The key (16 hex digits) hashes the file list with sizes and modification times, the image size
and the preprocessing, so a changed folder gets a new cache, and a truncated or edited cache fails its
check and is rebuilt. A second key hashes the decoded pixels; the FID statistics are named by it, so they
survive a folder that is copied or re-extracted with the same images. ``DeviceBatches`` keeps that tensor on the training device and serves float32
batches in [-1, 1] with random horizontal flips applied there; ``StreamingBatches`` decodes per sample
through a DataLoader when the tensor would not fit in memory. ``make_batches`` picks between the two.

A file's class is the class folder it lies in (its first folder under the data path); labels number the class
names in sorted order, so they are the same on every run. The cache's file list gives each row's class.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from atomic import atomic_write, atomic_write_text
from batches import DataWarning, DeviceBatches, StreamingBatches, available_cores, default_num_workers
from errors import UserError
from images import CLASSES, MAX_PIXELS, UnreadableImage, decode_image, find_images
from memory import available_memory_bytes

__all__ = ["CLASSES", "DataWarning", "DeviceBatches", "ImageSet", "StreamingBatches", "TrainingData",
           "cache_dir_candidates", "cache_key", "class_labels", "find_images", "load_images", "make_batches",
           "pixels_key", "resolve_cache_dir"]

PREPROCESSING = "exif/rgb-on-white/center-square/lanczos/jpeg-draft-2x"
CACHE_FORMAT = 1


@dataclass
class ImageSet:
    """The decoded images of one (folder, class, size).

    ``images`` is uint8 [N, 3, S, S] on the CPU; row i is ``files[i]`` (files that could not be read are
    left out and counted in ``skipped``). ``key`` fingerprints the files (names, sizes, modification times)
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

    def __post_init__(self):
        if not self.pixels_key:
            self.pixels_key = pixels_key(self.images.numpy())

    def of_class(self, label: int) -> torch.Tensor:
        """The images of one class, uint8 [N_c, 3, S, S]."""
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


def pixels_key(array: np.ndarray) -> str:
    """16 hex digits hashing the decoded images (their shape and every byte)."""
    digest = hashlib.blake2b(str(array.shape).encode(), digest_size=8)
    digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def cache_key(files: list[Path], image_size: int, *, root: Path, max_pixels: int = MAX_PIXELS) -> str:
    """16 hex digits hashing each file's path (relative to ``root``), size and mtime, and the preprocessing."""
    entries = []
    for path in files:
        stat = path.stat()
        entries.append([path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns])
    blob = json.dumps({"files": entries, "image_size": image_size, "preprocessing": PREPROCESSING,
                       "max_pixels": max_pixels, "format": CACHE_FORMAT}, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_dir_candidates(data_path: str | Path) -> tuple[Path, Path]:
    """Where caches go without ``--cache_dir``, in order: beside the data, else in the user's cache folder."""
    return Path(data_path).expanduser() / ".cache", Path.home() / ".cache" / "ddpm_afhq"


def resolve_cache_dir(data_path: str | Path, cache_dir: str | Path | None = None) -> Path | None:
    """``cache_dir`` if given, else the first writable of ``cache_dir_candidates``, else None."""
    if cache_dir is not None:
        folder = Path(cache_dir).expanduser()
        if not _writable(folder):
            raise UserError(f"--cache_dir {folder} cannot be created or written; pass a folder you can write to")
        return folder
    return next((folder for folder in cache_dir_candidates(data_path) if _writable(folder)), None)


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def load_images(data_path: str | Path, data_class: str, image_size: int, *, cache_dir: str | Path | None = None,
                progress: bool = True, max_pixels: int = MAX_PIXELS) -> ImageSet:
    """Decode every image of ``data_class`` under ``data_path`` once, or load them from the disk cache.

    Unreadable files are skipped with one ``DataWarning`` giving their count; so are images smaller than
    ``image_size`` (upsampled). Raises ``UserError`` when there is nothing to load.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise UserError(f"--image_size {image_size!r} is not a positive whole number; pass e.g. --image_size 32")
    root = Path(data_path).expanduser()
    files = find_images(root, data_class)
    key = cache_key(files, image_size, root=root, max_pixels=max_pixels)
    folder = resolve_cache_dir(root, cache_dir)
    stem = f"{data_class}_{image_size}px_{key}"
    cached = _read_cache(folder, stem, key) if folder is not None else None
    if cached is not None:
        array, meta = cached
        kept = [root / name for name in meta["files"]]
        image_set = ImageSet(torch.from_numpy(array), key, kept, len(meta["skipped"]), meta["upsampled"],
                             folder / f"{stem}.npy", from_cache=True, pixels_key=meta.get("pixels_key", ""),
                             **_classes_of(kept, root))
        _warn_about_files(root, image_size, meta["skipped"], meta["upsampled"])
        return image_set
    array, kept, skipped, upsampled = _decode_all(files, image_size, progress=progress, max_pixels=max_pixels)
    if not kept:
        path, reason = skipped[0]
        raise UserError(f"none of the {len(files)} images under {root} could be read "
                        f"(e.g. {path.relative_to(root)}: {reason}); "
                        f"replace them or pass another --data_path")
    meta = {"format": CACHE_FORMAT, "key": key, "shape": list(array.shape), "crc32": zlib.crc32(array),
            "pixels_key": pixels_key(array),
            "image_size": image_size, "preprocessing": PREPROCESSING, "upsampled": len(upsampled),
            "root": str(root.resolve()),
            "files": [p.relative_to(root).as_posix() for p in kept],
            "skipped": [[p.relative_to(root).as_posix(), reason] for p, reason in skipped]}
    path = _write_cache(folder, stem, array, meta) if folder is not None else None
    _warn_about_files(root, image_size, meta["skipped"], len(upsampled), example=upsampled[:1])
    return ImageSet(torch.from_numpy(array), key, kept, len(skipped), len(upsampled), path, from_cache=False,
                    pixels_key=meta["pixels_key"], **_classes_of(kept, root))


def _classes_of(files: list[Path], root: Path) -> dict:
    classes, labels = class_labels(files, root)
    return {"classes": classes, "labels": labels}


def _decode_all(files: list[Path], image_size: int, *, progress: bool, max_pixels: int):
    """Decode ``files`` with a thread pool (PIL releases the GIL); returns (array, kept, skipped, upsampled)."""
    out = np.empty((len(files), 3, image_size, image_size), dtype=np.uint8)
    kept: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    upsampled: list[Path] = []

    def decode(path: Path):
        try:
            return decode_image(path, image_size, max_pixels=max_pixels)
        except UnreadableImage as e:
            return str(e)

    with warnings.catch_warnings(), ThreadPoolExecutor(min(available_cores(), 8)) as pool:
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        results = pool.map(decode, files)
        bar = tqdm(zip(files, results), total=len(files), desc=f"decoding images to {image_size}px", unit="img",
                   disable=not progress, dynamic_ncols=True)
        for path, result in bar:
            if isinstance(result, str):
                skipped.append((path, result))
                continue
            pixels, small = result
            out[len(kept)] = pixels.transpose(2, 0, 1)  # [S, S, 3] -> [3, S, S]
            kept.append(path)
            if small:
                upsampled.append(path)
    return out[: len(kept)], kept, skipped, upsampled


def _warn_about_files(root: Path, image_size: int, skipped: list, upsampled: int, *, example=()) -> None:
    """One warning for unreadable files and one for upsampled ones, each with the count."""
    if skipped:
        name, reason = skipped[0]
        warnings.warn(f"skipped {len(skipped)} unreadable image file(s) under {root} (e.g. {name}: {reason}); "
                      f"delete or replace them to silence this", DataWarning, stacklevel=3)
    if upsampled:
        where = f" (e.g. {example[0].name})" if example else ""
        warnings.warn(f"{upsampled} image(s) under {root} are smaller than {image_size}px{where} and were "
                      f"upsampled; a smaller --image_size keeps them sharp", DataWarning, stacklevel=3)


def _read_cache(folder: Path, stem: str, key: str):
    """(array, meta) from a cache that passes every check, or None (with a warning if it exists but fails)."""
    array_path, meta_path = folder / f"{stem}.npy", folder / f"{stem}.json"
    if not array_path.exists() and not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
            raise ValueError("its key does not match the images")
        array = np.load(array_path, allow_pickle=False)
        if array.dtype != np.uint8 or list(array.shape) != meta["shape"]:
            raise ValueError(f"shape {list(array.shape)} instead of {meta['shape']}")
        if zlib.crc32(array) != meta["crc32"]:
            raise ValueError("its checksum does not match")
        return array, meta
    except (OSError, ValueError, EOFError, KeyError, TypeError) as e:
        warnings.warn(f"the image cache {array_path} is damaged or stale ({e}); rebuilding it", DataWarning,
                      stacklevel=3)
        return None


def _write_cache(folder: Path, stem: str, array: np.ndarray, meta: dict) -> Path | None:
    """Write the array and its JSON atomically (temporary file, then rename); drop older caches of this size
    made from the same folder (caches of other folders sharing ``folder`` stay)."""
    array_path = folder / f"{stem}.npy"
    try:
        atomic_write(array_path, lambda f: np.save(f, array, allow_pickle=False))
        atomic_write_text(folder / f"{stem}.json", json.dumps(meta))
    except OSError as e:
        warnings.warn(f"could not write the image cache to {folder} ({e}); the next run decodes the images "
                      f"again (pass --cache_dir to put it elsewhere)", DataWarning, stacklevel=3)
        return None
    prefix = stem.rsplit("_", 1)[0] + "_"
    for old_meta in folder.glob(f"{prefix}*.json"):
        if old_meta.stem != stem and _cache_root(old_meta) in (meta["root"], None):
            old_meta.with_suffix(".npy").unlink(missing_ok=True)
            old_meta.unlink(missing_ok=True)
    return array_path


def _cache_root(meta_path: Path) -> str | None:
    """The data folder a cache was made from, or None when its JSON cannot be read."""
    try:
        return json.loads(meta_path.read_text()).get("root")
    except (OSError, ValueError, AttributeError):
        return None


@dataclass
class TrainingData:
    """What a run trains on: the endless ``batches``, the decoded images (``image_set``; None when they are
    streamed from disk), and for class-conditional training the class names by label and each class's image
    count (empty otherwise)."""

    batches: DeviceBatches | StreamingBatches
    image_set: ImageSet | None
    classes: tuple[str, ...] = ()
    class_sizes: tuple[int, ...] = ()


def make_batches(data_path: str | Path, data_class: str, image_size: int, batch_size: int, *,
                 device: torch.device | str, flip: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 cache_dir: str | Path | None = None, memory_fraction: float = 0.25, progress: bool = True,
                 labelled: bool = False) -> TrainingData:
    """The training data: ``DeviceBatches`` over the decoded images when their uint8 pixels take at most
    ``memory_fraction`` of the available memory, else ``StreamingBatches`` (and no ``image_set``).

    ``labelled``: class-conditional training on every class folder under ``data_path`` (``data_class`` must be
    ``"all"``); each batch carries its labels, and the data names the classes."""
    root = Path(data_path).expanduser()
    files = find_images(root, data_class)
    classes, labels = class_labels(files, root) if labelled else ((), None)
    if labelled and len(classes) < 2:
        found = f"only {classes[0]}/" if classes else "none"
        raise UserError(f"--class_conditional needs at least two class folders under {root}, and it has {found}; "
                        f"put each class's images in a folder of its own there")
    per_rank = len(range(rank, len(files), world_size))
    if batch_size > per_rank:
        where = f" (for each of {world_size} processes)" if world_size > 1 else ""
        raise UserError(f"--batch_size {batch_size} is larger than the {per_rank} images{where} in "
                        f"{root / data_class if data_class != 'all' else root}; lower it")
    needed = len(files) * 3 * image_size * image_size
    free = available_memory_bytes()
    if free is None or needed <= memory_fraction * free:
        image_set = load_images(root, data_class, image_size, cache_dir=cache_dir, progress=progress)
        batches = DeviceBatches(image_set.images, batch_size, device=device, flip=flip, seed=seed, rank=rank,
                                world_size=world_size, memory_fraction=memory_fraction,
                                labels=image_set.labels if labelled else None)
        return TrainingData(batches, image_set, *_class_counts(image_set.classes, image_set.labels, labelled))
    workers = default_num_workers()
    warnings.warn(f"the {len(files)} images at {image_size}px need {needed / 2**30:.1f} GiB, more than "
                  f"{memory_fraction:.0%} of the {free / 2**30:.1f} GiB of free memory; decoding them from disk "
                  f"with {workers} DataLoader worker(s) instead (slower)", DataWarning, stacklevel=2)
    batches = StreamingBatches(files, image_size, batch_size, device=device, flip=flip, seed=seed, rank=rank,
                               world_size=world_size, num_workers=workers, labels=labels)
    return TrainingData(batches, None, *_class_counts(classes, labels, labelled))


def _class_counts(classes: tuple[str, ...], labels: torch.Tensor | None, labelled: bool) -> tuple[tuple, tuple]:
    """The class names and each class's image count of class-conditional data; nothing for unconditional data."""
    if not labelled:
        return (), ()
    return classes, tuple(labels.bincount(minlength=len(classes)).tolist())
