"""The decoded-image cache on disk: its key, its name, where it goes, and its checked reads and atomic writes.

A cache is ``<selection>_<S>px[_grey]_<key>.npy`` (the uint8 [N, C, S, S] array) plus a JSON file holding the
key, shape and CRC-32 of the array, the files it holds and those skipped. The key (16 hex digits) hashes the
file list with sizes and modification times, the image size, the channels and the preprocessing, so a changed
folder gets a new cache, and a truncated or edited cache fails its check and is rebuilt. ``pixels_key`` hashes
the decoded pixels themselves.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
import warnings
import zlib
from pathlib import Path

import numpy as np

from imagedata.batches import DataWarning
from imagedata.files import MAX_PIXELS
from runtime.atomic import atomic_write, atomic_write_text
from runtime.errors import UserError

PREPROCESSING = "exif/rgb-on-white/center-square/lanczos/jpeg-draft-2x/min-half-size"
CACHE_FORMAT = 2


def pixels_key(array: np.ndarray) -> str:
    """16 hex digits hashing the decoded images (their shape and every byte)."""
    digest = hashlib.blake2b(str(array.shape).encode(), digest_size=8)
    digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def cache_key(files: list[Path], image_size: int, *, root: Path, max_pixels: int = MAX_PIXELS,
              channels: int = 3) -> str:
    """16 hex digits hashing each file's path (relative to ``root``), size and mtime, and the preprocessing."""
    entries = []
    for path in files:
        stat = path.stat()
        entries.append([path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns])
    settings = {"files": entries, "image_size": image_size, "preprocessing": PREPROCESSING, "max_pixels": max_pixels,
                "format": CACHE_FORMAT, **({"channels": channels} if channels != 3 else {})}
    blob = json.dumps(settings, separators=(",", ":"))
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


def cache_name(selection: str) -> str:
    """A selection (``cat``, ``all``, a folder name in any script) as a file-name part: letters, digits, - and _."""
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in selection)


def read_cache(folder: Path, stem: str, key: str):
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


def write_cache(folder: Path, stem: str, array: np.ndarray, meta: dict) -> Path | None:
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
