"""Benchmark: the decoded-image cache against decoding every sample through a torchvision DataLoader.

For each folder (the 128 px AFHQ cats, and with ``--large`` 512 x 512 JPEGs made from them, the size of
the real AFHQ files) it measures, in one run:

- this package: time to build the uint8 cache (decode + resize + write), time to load it again, and
  batches per second served by ``DeviceBatches`` (float conversion and flips included);
- the reference solutions' way: an image-folder Dataset with torchvision transforms (Resize, CenterCrop,
  RandomHorizontalFlip, ToTensor, Normalize) in a shuffling DataLoader with 16 workers (what they ask
  for, on Colab's 2 CPUs) and with 2 workers: time to the first batch and batches per second after it.

Batches are moved to the device and, on CUDA, synchronized before the clock stops. Example:

    python bench/bench_data.py --data_path ./data/train --large --json bench/out/data.json
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_path", default="./data/train", help="folder holding <data_class>/")
    p.add_argument("--data_class", default="cat", help="class folder to read")
    p.add_argument("--image_size", type=int, default=64, help="training resolution")
    p.add_argument("--batch_size", type=int, default=32, help="images per batch")
    p.add_argument("--batches", type=int, default=200, help="batches timed per pipeline")
    p.add_argument("--workers", type=int, nargs="+", default=[16, 2], help="DataLoader workers of the baselines")
    p.add_argument("--large", action="store_true", help="also time 512 x 512 JPEGs made from the images")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.add_argument("--quick", action="store_true", help="time 20 batches instead of --batches (a smoke test)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def make_copy(files: list[Path], dest: Path, *, size: int | None) -> Path:
    """Copy ``files`` into ``dest/cat``, or write them as ``size`` x ``size`` JPEGs (LANCZOS, quality 95)."""
    from PIL import Image
    from tqdm import tqdm

    (dest / "cat").mkdir(parents=True)
    for path in tqdm(files, desc=f"making {size or 'copied'} px images", unit="img", disable=size is None):
        if size is None:
            shutil.copy2(path, dest / "cat" / path.name)
        else:
            with Image.open(path) as im:
                big = im.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
                big.save(dest / "cat" / f"{path.stem}.jpg", quality=95)
    return dest


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_batches(batches, n: int, device) -> tuple[float, float]:
    """(seconds to the first batch, batches per second over ``n`` after 2 untimed ones), each on ``device``; the
    package's batches are ``imagedata.batches.Batch``, the reference loader's plain image tensors."""
    start = time.perf_counter()
    stream = iter(batches)

    def images():
        batch = next(stream)
        return batch.images if hasattr(batch, "images") else batch

    images().to(device)
    _sync(device)
    first = time.perf_counter() - start
    for _ in range(2):
        images().to(device)
    start = time.perf_counter()
    for _ in range(n):
        images().to(device, non_blocking=True)
    _sync(device)
    return first, n / (time.perf_counter() - start)


def bench_package(folder: Path, args, device, cache_dir: Path) -> dict:
    from imagedata import dataset

    start = time.perf_counter()
    dataset.load_images(folder, "cat", args.image_size, cache_dir=cache_dir, progress=False)
    build = time.perf_counter() - start
    start = time.perf_counter()
    image_set = dataset.load_images(folder, "cat", args.image_size, cache_dir=cache_dir, progress=False)
    reload = time.perf_counter() - start
    assert image_set.from_cache
    batches = dataset.DeviceBatches(image_set.images, args.batch_size, device=device)
    first, rate = time_batches(batches, args.n_batches, device)
    return {"pipeline": "cached tensor (this package)", "build_s": build, "reload_s": reload,
            "first_batch_s": first, "batches_per_s": rate}


def bench_reference(folder: Path, args, device, workers: int) -> dict:
    from reference_way import reference_loader

    n = max(1, args.n_batches // 4)  # the baseline is slow; fewer batches give the same rate
    first, rate = time_batches(reference_loader(folder, args.image_size, args.batch_size, workers, device), n, device)
    return {"pipeline": f"reference DataLoader, {workers} workers", "build_s": None, "reload_s": None,
            "first_batch_s": first, "batches_per_s": rate}


def run(args) -> dict:
    import torch

    from imagedata.batches import available_cores
    from imagedata.files import find_images

    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    files = find_images(Path(args.data_path), args.data_class)[: args.limit]
    results = {"device": str(device), "cores": available_cores(), "torch": torch.__version__,
               "python": platform.python_version(), "images": len(files), "image_size": args.image_size,
               "batch_size": args.batch_size, "timed_batches": args.n_batches, "rows": []}
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        sets = [("afhq128", make_copy(files, Path(tmp) / "small", size=None))]
        if args.large:
            sets.append(("512px jpeg", make_copy(files, Path(tmp) / "large", size=512)))
        for name, folder in sets:
            rows = [bench_package(folder, args, device, Path(tmp) / f"cache-{name}")]
            rows += [bench_reference(folder, args, device, w) for w in args.workers]
            for row in rows:
                row["dataset"] = name
                row["speedup_vs_this_row"] = rows[0]["batches_per_s"] / row["batches_per_s"]
            results["rows"] += rows
    return results


def print_table(results: dict) -> None:
    print(f"{results['images']} images -> {results['image_size']} px, batch {results['batch_size']}, "
          f"device {results['device']}, {results['cores']} cores, torch {results['torch']}")
    head = f"{'dataset':<12} {'pipeline':<32} {'build s':>8} {'reload s':>9} {'1st batch s':>12} " \
           f"{'batches/s':>10} {'package is x faster':>20}"
    print(head)
    print("-" * len(head))
    for r in results["rows"]:
        num = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(f"{r['dataset']:<12} {r['pipeline']:<32} {num(r['build_s'], '8.2f'):>8} {num(r['reload_s'], '9.3f'):>9} "
              f"{r['first_batch_s']:>12.3f} {r['batches_per_s']:>10.1f} {r['speedup_vs_this_row']:>20.1f}")


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here.parent), str(here)]  # the package root and bench/, for `python bench/...`
    args = parse_args(argv)
    args.n_batches = 20 if args.quick else args.batches
    results = run(args)
    print_table(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
