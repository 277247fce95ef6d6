"""Downloading AFHQ and extracting the classes asked for into ``<data_root>/train/<class>/``.

The archive is fetched with urllib into ``<data_root>/afhq_<source>.zip.part``; a download that breaks off
is resumed with an HTTP Range request (from scratch when the server ignores Range), both within one call
while data keeps arriving and on the next call. It counts as complete only when its length matches the
server's and its zip central directory reads; each extracted file is checked against its CRC-32.

Only ``train/<class>/`` entries of the requested classes are extracted (the ``test`` split is not used
for training or FID here, so it is left out to save disk). The v2 and CMU archives hold ``train/cat/...``,
v1 holds ``afhq/train/cat/...``; both end up as ``<data_root>/train/cat/...``. Files are extracted into a
hidden staging folder and each class folder is moved into place whole, so an interrupted extraction never
leaves half a class behind. An archive with an entry that is absolute, climbs out with ``..`` or is a
symbolic link is refused before anything is written.
"""
from __future__ import annotations

import http.client
import os
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from tqdm import tqdm

from imagedata.files import CLASSES, find_images, has_images, sub_folders
from runtime.errors import UserError
from settings.config import DOWNLOAD_MODES

AFHQ_URLS = {
    "v2": "https://www.dropbox.com/s/vkzjokiwof5h8w6/afhq_v2.zip?dl=1",  # StarGAN v2 download.sh, afhq-v2-dataset
    "v1": "https://www.dropbox.com/s/t9l9o3vsx2jai3z/afhq.zip?dl=1",  # StarGAN v2 download.sh, afhq-dataset
    "cmu": "https://cmu.box.com/shared/static/5iydd9zn3edn127rcq0qud2scq7839ym",  # the assignment's link
}
_CHUNK = 1 << 20


class _Stalled(Exception):
    """A transfer that ended early; ``progressed`` says whether it added any bytes."""

    def __init__(self, reason: str, *, progressed: bool):
        super().__init__(reason)
        self.progressed = progressed


def ensure_dataset(data_path: str | Path, data_class: str, *, download: str = "auto", source: str = "v2",
                   url: str | None = None, progress: bool = True, timeout: float = 30) -> Path:
    """Make sure ``<data_path>/<class>/`` exists, downloading AFHQ into ``data_path``'s parent if needed.

    ``download="auto"`` fetches only when the class folder(s) are missing and ``data_path`` is the default
    location (``./data/train``, beside the working directory or this package); there, ``"all"`` fetches the
    other AFHQ classes when the one folder present is an AFHQ class; ``"always"`` fetches and
    re-extracts wherever ``data_path`` (which must end in ``train``) points; ``"never"`` leaves it to
    ``imagedata.files.find_images`` to report what is missing. Call it from one process only (rank 0).
    """
    if download not in DOWNLOAD_MODES:
        raise ValueError(f"download must be one of {DOWNLOAD_MODES}, got {download!r}")
    root = Path(data_path).expanduser()
    wanted = CLASSES if data_class == "all" else (data_class,)
    present = has_images(root) if data_class == "all" else (root / data_class).is_dir()
    if data_class == "all" and download == "auto" and present and _is_default_location(root):
        # AFHQ fetched earlier for one class (a cat run before a class-conditional one): fetch the others; two
        # or more folders, or one of the user's own, are data someone chose, so nothing is fetched
        folders = sub_folders(root)
        if len(folders) == 1 and folders[0] in CLASSES:
            wanted, present = tuple(c for c in CLASSES if c != folders[0]), False
    if download == "never" or (download == "auto" and present):
        return root
    if download == "always" and data_class not in (*CLASSES, "all"):
        raise UserError(f"--download always fetches AFHQ, which has no {data_class}/ class (only "
                        f"{', '.join(CLASSES)}); drop --download always to train on your own {data_class}/ folder")
    if download == "auto" and (not _is_default_location(root) or data_class not in (*CLASSES, "all")):
        find_images(root, data_class)  # raises the one-line error that says what is missing
        return root
    if root.name != "train":
        raise UserError(f"the AFHQ archive unpacks into <folder>/train/<class>/, so --data_path must end in "
                        f"/train to download into it (e.g. --data_path ./data/train); got {root}")
    download_afhq(root.parent, classes=wanted, source=source, url=url, progress=progress, timeout=timeout)
    return root


def _is_default_location(root: Path) -> bool:
    defaults = {Path.cwd() / "data" / "train", Path(__file__).resolve().parent / "data" / "train"}
    return root.resolve() in {p.resolve() for p in defaults}


def download_afhq(data_root: str | Path, *, classes: Sequence[str], source: str = "v2", url: str | None = None,
                  progress: bool = True, timeout: float = 30, retries: int = 3, keep_archive: bool = False) -> Path:
    """Download the AFHQ zip (``AFHQ_URLS[source]`` unless ``url`` is given) and extract ``classes``.

    Returns ``<data_root>/train``. The archive is deleted after extraction unless ``keep_archive``; a
    complete archive already in ``data_root`` is used without downloading. Raises ``UserError`` (one line,
    saying how to get the data by hand) when the network or the archive fails.
    """
    if source not in AFHQ_URLS:
        raise UserError(f"--dataset_source {source!r} is not one of {', '.join(AFHQ_URLS)}; pick one of those")
    unknown = [c for c in classes if c not in CLASSES]
    if unknown or not classes:
        raise UserError(f"cannot download AFHQ class(es) {unknown or 'none'}; AFHQ has {', '.join(CLASSES)}")
    data_root = Path(data_root).expanduser()
    url = url or AFHQ_URLS[source]
    try:
        data_root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {data_root} for the download ({e.strerror or e}); pass a --data_path "
                        f"you can write to") from None
    archive = data_root / f"afhq_{source if url == AFHQ_URLS[source] else 'custom'}.zip"
    if not (archive.exists() and _is_complete_zip(archive)):
        fetch(url, archive, progress=progress, timeout=timeout, retries=retries, hint=_by_hand(url, data_root, classes))
    counts = extract_classes(archive, data_root, classes, progress=progress)
    if not keep_archive:
        archive.unlink(missing_ok=True)
    if progress:
        done = ", ".join(f"{n} {c}" for c, n in counts.items())
        print(f"AFHQ ready: {done} images in {data_root / 'train'}", file=sys.stderr)
    return data_root / "train"


def _by_hand(url: str, data_root: Path, classes: Sequence[str]) -> str:
    return (f"get it by hand: download {url}, unzip it into {data_root} so that {data_root / 'train' / classes[0]} "
            f"exists, then pass --data_path {data_root / 'train'}")


def fetch(url: str, dest: Path, *, progress: bool = True, timeout: float = 30, retries: int = 3,
          hint: str = "") -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming after breaks; the result is a readable zip.

    A transfer that breaks off after adding bytes is resumed up to ``retries`` times; one that gets
    nothing ends the call. ``hint`` (how to get the file by hand) ends every error message.
    """
    part = dest.with_name(dest.name + ".part")
    resumes = 0
    while True:
        try:
            _fetch_once(url, part, progress=progress, timeout=timeout)
            break
        except _Stalled as e:
            if not e.progressed or resumes >= retries:
                have = part.stat().st_size if part.exists() else 0
                kept = f"; {have} bytes are kept in {part} and the next run resumes from there" if have else ""
                raise UserError(f"could not download AFHQ from {url} ({e}){kept}; {hint}") from None
            resumes += 1
    if not _is_complete_zip(part):
        part.unlink(missing_ok=True)
        raise UserError(f"the file downloaded from {url} is not a complete zip archive (deleted; run again to "
                        f"download it afresh); {hint}")
    os.replace(part, dest)
    return dest


def _fetch_once(url: str, part: Path, *, progress: bool, timeout: float) -> None:
    """One HTTP request appending to ``part``; returns when it is complete, raises ``_Stalled`` otherwise."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "ddpm-afhq", **({"Range": f"bytes={have}-"} if have else {})}
    try:
        response = urlopen(Request(url, headers=headers), timeout=timeout)
    except HTTPError as e:
        if e.code == 416 and have:
            return  # nothing past the bytes we hold: the file is already whole
        raise _Stalled(f"HTTP {e.code} {e.reason}", progressed=False) from None
    except (URLError, OSError, http.client.HTTPException) as e:
        raise _Stalled(str(getattr(e, "reason", None) or e), progressed=False) from None
    with response:
        span = _span(response, have)
        if span is None:  # a range we did not ask for: start over rather than splice wrong bytes
            part.unlink(missing_ok=True)
            raise _Stalled("the server answered the resume request with another range", progressed=True)
        start, total = span
        with open(part, "r+b" if part.exists() else "wb") as f:
            f.seek(start)
            f.truncate()
            _copy(response, f, start=start, total=total, progress=progress)
            size = f.tell()
    if total is not None and size != total:
        raise _Stalled(f"the transfer stopped at {size} of {total} bytes", progressed=size > have)


def _span(response, have: int) -> tuple[int, int | None] | None:
    """Where the response body starts in the file and the file's full length (None if unknown); None for
    a partial answer that does not start within the bytes we hold."""
    length = response.headers.get("Content-Length")
    length = int(length) if length and length.isdigit() else None
    if response.status == 206:
        match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
        if match and int(match.group(1)) <= have:
            start = int(match.group(1))
            total = int(match.group(2)) if match.group(2) != "*" else None
            return start, total if total is not None else (start + length if length is not None else None)
        return None
    return 0, length  # 200: a server that ignores Range sends the whole file again


def _copy(response, f, *, start: int, total: int | None, progress: bool) -> None:
    """Stream the body into ``f`` with a byte progress bar; a dropped connection raises ``_Stalled``."""
    bar = tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc="downloading AFHQ",
               disable=not progress, dynamic_ncols=True)
    try:
        while chunk := response.read(_CHUNK):
            f.write(chunk)
            bar.update(len(chunk))
    except (OSError, http.client.HTTPException) as e:
        f.flush()
        raise _Stalled(f"the connection broke off ({type(e).__name__})", progressed=f.tell() > start) from None
    finally:
        bar.close()


def _is_complete_zip(path: Path) -> bool:
    """Whether ``path`` is a zip whose central directory (written last) reads and lists entries."""
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return False


def extract_classes(archive: Path, data_root: Path, classes: Sequence[str], *, progress: bool = True) -> dict[str, int]:
    """Extract ``train/<class>/`` entries of ``classes`` into ``<data_root>/train/<class>/``; returns counts."""
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        for member in members:
            _refuse_unsafe(member, archive)
        wanted = [(m, rel) for m in members if (rel := _train_path(m, classes)) is not None]
        if not wanted:
            raise UserError(f"{archive} holds no train/<class>/ images for {', '.join(classes)}; check the "
                            f"archive, or delete it and run again")
        staging = Path(tempfile.mkdtemp(dir=data_root, prefix=".extract-"))
        try:
            for member, rel in tqdm(wanted, desc="extracting AFHQ", unit="file", disable=not progress):
                _extract_one(zf, member, staging / rel, archive)
            return _move_into_place(staging / "train", data_root / "train")
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _refuse_unsafe(member: zipfile.ZipInfo, archive: Path) -> None:
    name = member.filename
    parts = re.split(r"[/\\]", name)
    why = ("an absolute path" if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name)
           else "a path that climbs out with .." if ".." in parts
           else "a symbolic link" if (member.external_attr >> 16) & 0o170000 == 0o120000 else None)
    if why:
        raise UserError(f"{archive} holds an unsafe entry {name!r} ({why}); nothing was extracted: delete the "
                        f"archive and download AFHQ again from {AFHQ_URLS['v2']}")


def _train_path(member: zipfile.ZipInfo, classes: Sequence[str]) -> PurePosixPath | None:
    """``train/<class>/...`` for a wanted file entry (with or without one leading folder), else None."""
    parts = PurePosixPath(member.filename).parts
    if member.is_dir() or not parts or parts[0] == "__MACOSX" or parts[-1].startswith("."):
        return None
    for i in (0, 1):
        if len(parts) >= i + 3 and parts[i] == "train" and parts[i + 1] in classes:
            return PurePosixPath("train", *parts[i + 1:])
    return None


def _extract_one(zf: zipfile.ZipFile, member: zipfile.ZipInfo, dest: Path, archive: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with zf.open(member) as src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst, _CHUNK)  # zipfile checks the CRC-32 at the end of each entry
    except (zipfile.BadZipFile, EOFError, ValueError) as e:
        raise UserError(f"{archive} is damaged ({member.filename}: {e}); delete it and run again to download "
                        f"it afresh") from None


def _move_into_place(staged: Path, train: Path) -> dict[str, int]:
    """Move each staged class folder to ``train/<class>``, replacing an older one; returns file counts."""
    train.mkdir(parents=True, exist_ok=True)
    counts = {}
    for folder in sorted(p for p in staged.iterdir() if p.is_dir()):
        counts[folder.name] = sum(1 for p in folder.rglob("*") if p.is_file())
        target = train / folder.name
        if target.exists():
            old = staged / f".old-{folder.name}"
            os.replace(target, old)
        os.replace(folder, target)
    return counts
