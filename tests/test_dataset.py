"""The decoded-image cache: counts, warnings, reuse, rebuilds, damaged caches, where it lives; make_batches."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imagedata import dataset
from imagedata.batches import DataWarning, DeviceBatches, StreamingBatches
from runtime.errors import UserError

GOOD = 8  # readable images made by `folder`


def make_folder(root: Path) -> Path:
    """<root>/train/cat with 8 readable images of assorted modes and sizes, 2 unreadable ones and a text file."""
    cat = root / "train" / "cat"
    cat.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        noise = rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)
        Image.fromarray(noise).save(cat / f"rgb{i}.png")
    Image.new("L", (30, 20), 77).save(cat / "gray.jpg")
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(cat / "clear.png")
    Image.new("RGB", (10, 10), (1, 2, 3)).save(cat / "small.png")  # below 16px, above 8px: upsampled
    (cat / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (cat / "truncated.png").write_bytes((cat / "rgb0.png").read_bytes()[:60])
    (cat / "readme.txt").write_text("ignored")
    return root / "train"


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_folder(tmp_path)


def load(path, size=16, **kwargs):
    kwargs.setdefault("progress", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image_set = dataset.load_images(path, "cat", size, **kwargs)
    return image_set, [str(w.message) for w in caught if issubclass(w.category, DataWarning)]


def test_load_counts_shape_range_and_warns_once_per_kind(folder):
    image_set, messages = load(folder)
    assert image_set.images.shape == (GOOD, 3, 16, 16) and image_set.images.dtype == torch.uint8
    assert image_set.skipped == 2 and image_set.upsampled == 1 and len(image_set.files) == GOOD
    assert "corrupt.jpg" not in {p.name for p in image_set.files}
    assert len(messages) == 2
    assert messages[0].startswith("skipped 2 unreadable image file(s) under") and "\n" not in messages[0]
    assert messages[1].startswith("1 image(s) under") and "(e.g. small.png)" in messages[1]
    row = image_set.files.index(folder / "cat" / "clear.png")
    assert int(image_set.images[row].min()) == 255  # transparent -> white
    assert len(image_set.key) == 16 and int(image_set.key, 16) >= 0


def test_progress_bar_while_building(folder, capsys):
    load(folder, progress=True)
    assert "decoding images to 16px" in capsys.readouterr().err


def test_second_load_reuses_the_cache_without_decoding(folder, monkeypatch):
    first, _ = load(folder)
    monkeypatch.setattr(dataset, "decode_image", lambda *a, **k: pytest.fail("decoded despite the cache"))
    second, messages = load(folder)
    assert second.from_cache and not first.from_cache
    assert torch.equal(first.images, second.images) and second.key == first.key
    assert second.files == first.files and second.skipped == 2 and second.upsampled == 1
    assert len(messages) == 2  # the same warnings on every run


@pytest.mark.parametrize("change", ["add", "modify", "delete", "size"])
def test_cache_is_rebuilt_when_the_folder_changes(folder, change):
    first, _ = load(folder)
    cat = folder / "cat"
    if change == "add":
        Image.new("RGB", (20, 20), (5, 5, 5)).save(cat / "new.png")
    elif change == "modify":
        Image.new("RGB", (20, 20), (9, 9, 9)).save(cat / "rgb1.png")
        os.utime(cat / "rgb1.png", ns=(1, 1))
    elif change == "delete":
        (cat / "rgb2.png").unlink()
    second, _ = load(folder, size=8 if change == "size" else 16)
    assert not second.from_cache and second.key != first.key
    assert len(second.files) == GOOD + {"add": 1, "delete": -1}.get(change, 0)
    caches = sorted(p.name for p in (folder / ".cache").iterdir())
    expected = 4 if change == "size" else 2  # an older cache of the same size is removed
    assert len(caches) == expected and not any(name.endswith(".tmp") for name in caches)


def test_pixels_key_follows_the_pixels_not_the_files(folder, tmp_path):
    first, _ = load(folder)
    for path in (folder / "cat").iterdir():  # re-extracted or copied: every file is newer, the pixels are not
        os.utime(path, ns=(10**18, 10**18))
    touched, _ = load(folder)
    assert not touched.from_cache and touched.key != first.key
    assert touched.pixels_key == first.pixels_key == dataset.pixels_key(first.images.numpy())
    reread, _ = load(folder)
    assert reread.from_cache and reread.pixels_key == first.pixels_key
    Image.new("RGB", (24, 24), (200, 1, 1)).save(folder / "cat" / "rgb3.png")  # one image changes
    changed, _ = load(folder)
    assert changed.pixels_key != first.pixels_key and len(changed.pixels_key) == 16
    assert dataset.pixels_key(np.zeros((2, 3, 4, 4), np.uint8)) != dataset.pixels_key(np.zeros((1, 3, 8, 4), np.uint8))


def test_a_cache_written_without_a_pixels_key_still_gets_one(folder):
    first, _ = load(folder)
    meta_path = first.cache_path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    del meta["pixels_key"]
    meta_path.write_text(json.dumps(meta))
    second, _ = load(folder)
    assert second.from_cache and second.pixels_key == first.pixels_key


def test_cache_is_plain_npy_and_json(folder):
    image_set, _ = load(folder)
    assert image_set.cache_path.parent == folder / ".cache"
    array = np.load(image_set.cache_path, allow_pickle=False)
    meta = json.loads(image_set.cache_path.with_suffix(".json").read_text())
    assert np.array_equal(array, image_set.images.numpy())
    assert meta["key"] == image_set.key and meta["shape"] == [GOOD, 3, 16, 16] and len(meta["skipped"]) == 2


@pytest.mark.parametrize("damage", ["truncate", "flip-byte", "wrong-key", "no-json"])
def test_damaged_or_stale_cache_is_rebuilt_not_trusted(folder, damage):
    first, _ = load(folder)
    npy, meta_path = first.cache_path, first.cache_path.with_suffix(".json")
    if damage == "truncate":
        npy.write_bytes(npy.read_bytes()[:-100])
    elif damage == "flip-byte":
        data = bytearray(npy.read_bytes())
        data[-5] ^= 0xFF
        npy.write_bytes(bytes(data))
    elif damage == "wrong-key":
        meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "key": "0" * 16}))
    else:
        meta_path.unlink()
    second, messages = load(folder)
    assert not second.from_cache and torch.equal(first.images, second.images)
    assert any("is damaged or stale" in m and "rebuilding it" in m for m in messages)
    third, _ = load(folder)
    assert third.from_cache


def test_cache_falls_back_to_home_when_data_folder_is_not_writable(folder, tmp_path, monkeypatch):
    (folder / ".cache").write_text("a file where the cache folder would go")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    image_set, _ = load(folder)
    assert image_set.cache_path.parent == tmp_path / "home" / ".cache" / "ddpm_afhq"


def test_explicit_cache_dir(folder, tmp_path):
    image_set, _ = load(folder, cache_dir=tmp_path / "elsewhere")
    assert image_set.cache_path.parent == tmp_path / "elsewhere" and not (folder / ".cache").exists()
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match=r"--cache_dir .*a_file cannot be created or written; pass a folder"):
        dataset.load_images(folder, "cat", 16, cache_dir=tmp_path / "a_file", progress=False)


def test_a_shared_cache_dir_keeps_the_caches_of_other_folders(tmp_path):
    a, b = make_folder(tmp_path / "a"), make_folder(tmp_path / "b")
    Image.new("RGB", (20, 20)).save(b / "cat" / "extra.png")
    shared = tmp_path / "shared"
    first_a, _ = load(a, cache_dir=shared)
    first_b, _ = load(b, cache_dir=shared)
    assert first_a.key != first_b.key and len(list(shared.glob("*.npy"))) == 2
    assert load(a, cache_dir=shared)[0].from_cache and load(b, cache_dir=shared)[0].from_cache


def test_no_readable_image_is_an_error(tmp_path):
    cat = tmp_path / "cat"
    cat.mkdir()
    (cat / "a.jpg").write_bytes(b"junk")
    (cat / "b.png").write_bytes(b"junk")
    message = r"none of the 2 images under .* could be read \(e.g. cat/a.jpg: cannot identify image file 'a.jpg'\); "
    with pytest.raises(UserError, match=message):
        dataset.load_images(tmp_path, "cat", 16, progress=False)


@pytest.mark.parametrize("size", [0, -3, 2.5, True])
def test_bad_image_size(folder, size):
    with pytest.raises(UserError, match="--image_size .* is not a positive whole number"):
        dataset.load_images(folder, "cat", size, progress=False)


def test_bomb_in_the_folder_is_skipped_and_counted(folder):
    from test_images import png_bytes

    (folder / "cat" / "bomb.png").write_bytes(png_bytes(100_000, 100_000))
    image_set, messages = load(folder)
    assert image_set.skipped == 3 and len(image_set.files) == GOOD


def test_make_batches_in_memory(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        data = dataset.make_batches(folder, "cat", 16, 4, device="cpu", progress=False)
    batches, image_set = data.batches, data.image_set
    assert isinstance(batches, DeviceBatches) and image_set.images.shape[0] == GOOD and data.classes == ()
    x = next(batches).images
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1


def test_make_batches_streams_when_memory_is_short(folder, monkeypatch):
    monkeypatch.setattr(dataset, "available_memory_bytes", lambda: 1000)
    with pytest.warns(DataWarning, match=r"need .* GiB, more than 25% of .* decoding them from disk with \d+ "):
        data = dataset.make_batches(folder, "cat", 16, 4, device="cpu", progress=False)
    assert isinstance(data.batches, StreamingBatches) and data.image_set is None
    assert not (folder / ".cache").exists()


def test_the_summary_counts_what_was_read_skipped_and_repeated(folder):
    """One line: the images and their folder, the layout, the size, each reason a file was skipped, the upsampled
    ones, and a batch larger than the folder."""
    from PIL import Image

    Image.new("RGB", (5, 5)).save(folder / "cat" / "tiny.png")  # below half of 16px
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        data = dataset.make_batches(folder, "cat", 16, 11, device="cpu", progress=False)
    assert data.summary == (f"data: {GOOD} images in {folder / 'cat'} (flat: ./ ({GOOD})), 16px RGB; skipped 4 files "
                            f"(1 not an image, 2 unreadable, 1 too small); 1 upsampled (smaller than 16px); fewer "
                            f"images than --batch_size 11, so each batch holds some twice or more")
    assert len(next(data.batches).images) == 11


def test_available_memory_is_memavailable_capped_by_the_cgroup_limit(tmp_path):
    from runtime.memory import available_memory_bytes

    meminfo, cgroup = tmp_path / "meminfo", tmp_path / "cgroup"
    cgroup.mkdir()
    meminfo.write_text("MemTotal:       16000000 kB\nMemAvailable:    8000000 kB\n")
    (cgroup / "memory.max").write_text("max\n")
    assert available_memory_bytes(meminfo=meminfo, cgroup=cgroup) == 8_000_000 * 1024  # no limit
    (cgroup / "memory.max").write_text(f"{3 * 2**30}\n")
    (cgroup / "memory.current").write_text(f"{2**30}\n")
    assert available_memory_bytes(meminfo=meminfo, cgroup=cgroup) == 2 * 2**30  # the limit less what is used
    meminfo.write_text("MemAvailable:    1000 kB\n")
    assert available_memory_bytes(meminfo=meminfo, cgroup=cgroup) == 1000 * 1024  # the host is the tighter


def test_what_fits_is_a_fraction_of_the_free_memory():
    from runtime.memory import fits

    cuda = torch.device("cuda")
    assert fits(100, cuda, memory_fraction=0.25, free=400) and not fits(101, cuda, memory_fraction=0.25, free=400)
    assert fits(10**15, torch.device("cpu"), memory_fraction=0.25, free=None) is (
        dataset.available_memory_bytes() is None)
