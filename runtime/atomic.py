"""Writing a file whole or not at all: checkpoints, caches, metrics, configs and figures all go through here.

``atomic_write`` writes into a temporary file beside the target, flushes it to disk and renames it over the
target, so a crash, a kill or a full disk at any moment leaves either the old file or the new one, never a
half-written one. An error leaves the old file in place and removes the temporary one.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(f)`` on a temporary binary file in ``path``'s folder, then rename it to ``path``; returns it.

    The folder is created if needed; the file gets the permissions a plain ``open`` would give it (the
    temporary file's own are private). OSError (and anything ``write`` raises) propagates with ``path`` as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        _give_plain_permissions(tmp)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``atomic_write`` of UTF-8 text."""
    return atomic_write(path, lambda f: f.write(text.encode()))


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Temporary files that ``atomic_write`` left beside ``path`` when its process was killed mid-write."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


def _give_plain_permissions(tmp: str) -> None:
    """0666 less the umask, as ``open`` creates files; where the file system keeps its own (FUSE mounts), as is."""
    try:
        os.chmod(tmp, 0o666 & ~_umask())
    except OSError:
        pass


def _umask() -> int:
    """The process's umask: read from /proc where there is one (reading it elsewhere means setting it briefly)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (where the platform lets a folder be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
