"""Finding image files and decoding every odd kind of image into a square uint8 RGB array."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagedata.files import UnreadableImage, center_square, decode_image, find_images
from runtime.errors import UserError


def save(path: Path, image: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def png_bytes(width: int, height: int, *, bit_depth: int = 8, rows: bytes = b"") -> bytes:
    """A hand-made RGB PNG: lets a test claim any size (a decompression bomb) or use 16 bits per channel."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def test_find_images_sorted_and_ignores_other_files(tmp_path):
    cat = tmp_path / "cat"
    for name in ("b.png", "a.jpg", "c.JPEG", "d.webp", "sub/e.png", "f.bmp", "g.GIF", "h.tif", "i.tiff", ".hidden.jpg",
                 ".cache/x.png"):
        save(cat / name, Image.new("RGB", (8, 8)))
    (cat / "notes.txt").write_text("not an image")
    (cat / "j.psd").write_bytes(b"8BPS")
    found = find_images(tmp_path, "cat")
    assert [p.relative_to(cat).as_posix() for p in found] == ["a.jpg", "b.png", "c.JPEG", "d.webp", "f.bmp", "g.GIF",
                                                               "h.tif", "i.tiff", "sub/e.png"]


def test_symlinked_folders_are_followed_once(tmp_path):
    """A linked folder's images count; a link to a folder already read, or back up the tree, adds nothing."""
    cat, elsewhere = tmp_path / "data" / "cat", tmp_path / "elsewhere"
    save(cat / "own" / "a.png", Image.new("RGB", (8, 8)))
    save(elsewhere / "b.png", Image.new("RGB", (8, 8)))
    (cat / "linked").symlink_to(elsewhere, target_is_directory=True)
    (cat / "again").symlink_to(elsewhere, target_is_directory=True)
    (cat / "own" / "up").symlink_to(cat, target_is_directory=True)
    found = [p.relative_to(cat).as_posix() for p in find_images(tmp_path / "data", "cat")]
    assert found in (["again/b.png", "own/a.png"], ["linked/b.png", "own/a.png"])


def test_names_with_spaces_and_other_scripts_are_found_and_decoded(tmp_path):
    names = ["ein Kätzchen.png", "猫 2.jpg", "gato ñ.webp"]
    for i, name in enumerate(names):
        save(tmp_path / "cat" / name, Image.new("RGB", (8, 8), (40 * i, 0, 0)))
    found = find_images(tmp_path, "cat")
    assert sorted(p.name for p in found) == sorted(names)
    assert all(decode_image(path, 8)[0].shape == (8, 8, 3) for path in found)
    from imagedata import dataset

    first = dataset.load_images(tmp_path, "cat", 8, cache_dir=tmp_path / ".cache", progress=False)
    again = dataset.load_images(tmp_path, "cat", 8, cache_dir=tmp_path / ".cache", progress=False)
    assert again.from_cache and again.files == first.files == found and len(again.images) == 3


def test_find_images_all_means_every_class_folder(tmp_path):
    for cls in ("cat", "dog", "wild", ".cache"):
        save(tmp_path / cls / f"{cls}1.png", Image.new("RGB", (8, 8)))
    found = find_images(tmp_path, "all")
    assert [p.parent.name for p in found] == ["cat", "dog", "wild"]
    assert len(find_images(tmp_path, "dog")) == 1


def _write_txt(root: Path, rel: str) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text("x")


@pytest.mark.parametrize("setup, data_path, data_class, message", [
    (lambda r: None, "missing", "cat", r"--data_path .*missing does not exist; .*--data_path ./data/train"),
    (lambda r: _write_txt(r, "file"), "file", "cat", r"is a file, not a folder"),
    (lambda r: _write_txt(r, "train/dog/x.txt"), "train", "cat",
     r"has no cat/ folder; its folders are dog/: pass one of them as --data_class, or --data_class all .*AFHQ"),
    (lambda r: (r / "train").mkdir(), "train", "roses", r"has no roses/ folder and no sub-folders; --data_class all"),
    (lambda r: (r / "train/cat").mkdir(parents=True), "train", "cat", r"train/cat holds no files; put the images"),
    (lambda r: _write_txt(r, "train/cat/a.txt"), "train", "cat",
     r"holds no images .*, only 1 other file \(such as a.txt\)"),
    (lambda r: (r / "train/.cache").mkdir(parents=True), "train", "all", r"train holds no files"),
    (lambda r: (r / "train").mkdir(), "train", "../x", r"--data_class '../x' is not a folder name"),
    (lambda r: save(r / "train/cat/a.png", Image.new("RGB", (8, 8))), "train/cat", "cat",
     r"is the cat folder itself; pass its parent: --data_path .*train$"),
])
def test_find_images_errors_are_one_line(tmp_path, setup, data_path, data_class, message):
    setup(tmp_path)
    with pytest.raises(UserError, match=message) as info:
        find_images(tmp_path / data_path, data_class)
    assert "\n" not in str(info.value)


def _sixteen_bit_rgb(path: Path) -> Path:
    rows = b"".join(b"\x00" + np.full((12, 3), 50000, ">u2").tobytes() for _ in range(10))
    path.write_bytes(png_bytes(12, 10, bit_depth=16, rows=rows))  # 50000 / 257 = 194.6
    return path


def _palette(color) -> Image.Image:
    image = Image.new("P", (20, 14), 0)
    image.putpalette(list(color) + [0, 0, 0] * 255)
    return image


ODD_IMAGES = {  # name: (make file in folder, expected RGB, tolerance)
    "rgb.png": (lambda p: save(p, Image.new("RGB", (20, 14), (10, 200, 30))), (10, 200, 30), 1),
    "gray.png": (lambda p: save(p, Image.new("L", (20, 14), 100)), (100, 100, 100), 1),
    "gray.jpg": (lambda p: save(p, Image.new("L", (20, 14), 100)), (100, 100, 100), 3),
    "onebit.png": (lambda p: save(p, Image.new("1", (20, 14), 1)), (255, 255, 255), 1),
    "palette.png": (lambda p: save(p, _palette((200, 40, 90))), (200, 40, 90), 1),
    "palette_transparent.png": (lambda p: save(p, Image.new("P", (20, 14), 0), transparency=0), (255, 255, 255), 1),
    "rgba_clear.png": (lambda p: save(p, Image.new("RGBA", (20, 14), (0, 0, 0, 0))), (255, 255, 255), 1),
    "rgba_opaque.png": (lambda p: save(p, Image.new("RGBA", (20, 14), (250, 5, 5, 255))), (250, 5, 5), 1),
    "rgba_half.png": (lambda p: save(p, Image.new("RGBA", (20, 14), (255, 0, 0, 128))), (255, 127, 127), 2),
    "la.png": (lambda p: save(p, Image.new("LA", (20, 14), (0, 0))), (255, 255, 255), 1),
    "cmyk.jpg": (lambda p: save(p, Image.new("CMYK", (20, 14), (0, 255, 255, 0))), (255, 0, 0), 6),
    "sixteen_bit_gray.png": (lambda p: save(p, Image.fromarray(np.full((14, 20), 32896, np.uint16))), (128,) * 3, 1),
    "sixteen_bit_white.png": (lambda p: save(p, Image.fromarray(np.full((14, 20), 65535, np.uint16))), (255,) * 3, 1),
    "sixteen_bit_rgb.png": (_sixteen_bit_rgb, (195, 195, 195), 1),
    "lossless.webp": (lambda p: save(p, Image.new("RGB", (20, 14), (1, 2, 250)), lossless=True), (1, 2, 250), 1),
    "rgb.bmp": (lambda p: save(p, Image.new("RGB", (20, 14), (7, 140, 210))), (7, 140, 210), 0),
    "rgb.tif": (lambda p: save(p, Image.new("RGB", (20, 14), (90, 3, 60))), (90, 3, 60), 0),
    "sixteen_bit_gray.tiff": (lambda p: save(p, Image.fromarray(np.full((14, 20), 32896, np.uint16))), (128,) * 3, 1),
    "first_frame.gif": (lambda p: save(p, Image.new("RGB", (20, 14), (255, 0, 0)), save_all=True,
                                       append_images=[Image.new("RGB", (20, 14), (0, 0, 255))]), (255, 0, 0), 0),
}


@pytest.mark.parametrize("name", sorted(ODD_IMAGES))
def test_every_mode_becomes_rgb(tmp_path, name):
    make, expected, tolerance = ODD_IMAGES[name]
    path = make(tmp_path / name)
    pixels, upsampled = decode_image(path, 8)
    assert pixels.shape == (8, 8, 3) and pixels.dtype == np.uint8 and not upsampled
    assert np.abs(pixels.astype(int) - np.array(expected)).max() <= tolerance, pixels[0, 0]


def _stripes(width: int, height: int, colors, *, vertical: bool) -> Image.Image:
    """Equal bands of ``colors``, side by side (vertical bands) or stacked."""
    image = Image.new("RGB", (width, height))
    n = len(colors)
    for i, color in enumerate(colors):
        box = (i * width // n, 0, (i + 1) * width // n, height) if vertical else \
            (0, i * height // n, width, (i + 1) * height // n)
        image.paste(color, box)
    return image


@pytest.mark.parametrize("vertical", [True, False])
def test_center_crop_keeps_the_middle_square(tmp_path, vertical):
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    size = (60, 20) if vertical else (20, 60)
    path = save(tmp_path / "stripes.png", _stripes(*size, colors, vertical=vertical))
    pixels, _ = decode_image(path, 10)
    assert np.abs(pixels.astype(int) - np.array([0, 255, 0])).max() <= 1
    assert center_square(size) == ((20, 0, 40, 20) if vertical else (0, 20, 20, 40))


def test_exif_orientation_is_applied(tmp_path):
    image = _stripes(40, 20, [(255, 0, 0), (0, 0, 255)], vertical=True)  # red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: red on top
    plain = save(tmp_path / "plain.jpg", image, quality=95)
    rotated = save(tmp_path / "rotated.jpg", image, quality=95, exif=exif)
    top_right_plain = decode_image(plain, 16)[0][1, 14]
    top_right_rotated = decode_image(rotated, 16)[0][1, 14]
    assert top_right_plain[2] > 200 and top_right_plain[0] < 60
    assert top_right_rotated[0] > 200 and top_right_rotated[2] < 60


def test_large_jpeg_is_downscaled_with_antialiasing(tmp_path):
    checker = (np.indices((256, 256)).sum(0) % 2 * 255).astype(np.uint8)  # 1-pixel checkerboard
    path = save(tmp_path / "checker.jpg", Image.fromarray(checker).convert("RGB"), quality=100)
    pixels, upsampled = decode_image(path, 16)
    assert not upsampled and pixels.shape == (16, 16, 3)
    assert abs(float(pixels.mean()) - 127.5) < 12 and pixels.std() < 12  # averaged to gray, not aliased


def test_small_images_are_upsampled_and_flagged(tmp_path):
    path = save(tmp_path / "small.png", Image.new("RGB", (8, 9), (9, 9, 9)))
    pixels, upsampled = decode_image(path, 16)
    assert upsampled and pixels.shape == (16, 16, 3)


def test_images_below_half_the_size_are_too_small(tmp_path):
    from imagedata.files import TooSmall

    path = save(tmp_path / "tiny.png", Image.new("RGB", (7, 30), (9, 9, 9)))
    with pytest.raises(TooSmall, match=r"7 x 30 pixels, less than half of 16px"):
        decode_image(path, 16)
    assert decode_image(path, 14)[0].shape == (14, 14, 3)


def test_grey_decoding_gives_one_channel_of_luma(tmp_path):
    path = save(tmp_path / "red.png", Image.new("RGB", (16, 16), (255, 0, 0)))
    pixels, _ = decode_image(path, 8, channels=1)
    assert pixels.shape == (8, 8, 1) and int(pixels.min()) == int(pixels.max()) == 76  # 0.299 * 255


@pytest.mark.parametrize("make", [
    lambda p: p.write_bytes(b"this is not an image"),
    lambda p: p.write_bytes(b""),
    lambda p: p.write_bytes(_jpeg_bytes(p)[:300]),
    lambda p: p.write_bytes(_png_noise(p)[:-40]),
], ids=["garbage", "empty", "truncated-jpeg", "truncated-png"])
def test_unreadable_files_raise(tmp_path, make):
    path = tmp_path / "bad.jpg"
    make(path)
    with pytest.raises(UnreadableImage):
        decode_image(path, 8)


def _jpeg_bytes(path: Path) -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, format="JPEG")
    return path.read_bytes()


def _png_noise(path: Path) -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, format="PNG")
    return path.read_bytes()


@pytest.mark.parametrize("width, height, message", [
    (100_000, 100_000, "decompression bomb"),  # over PIL's own hard limit
    (9_000, 9_000, "over the limit"),  # under PIL's limit, over ours
])
def test_decompression_bombs_are_refused_without_decoding(tmp_path, width, height, message):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(width, height))
    with pytest.raises(UnreadableImage, match=message):
        decode_image(path, 8)


def test_pixel_limit_is_adjustable(tmp_path):
    path = save(tmp_path / "ok.png", Image.new("RGB", (40, 40)))
    decode_image(path, 8, max_pixels=1600)
    with pytest.raises(UnreadableImage, match="40 x 40 pixels is over the limit of 1599"):
        decode_image(path, 8, max_pixels=1599)
