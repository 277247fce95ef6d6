"""FID of trained checkpoints against the training images as stored, beside the package's own protocol.

The package scores samples against the training images at the training resolution (README, docs/fid.md).
The reference solutions call ``cleanfid.fid.compute_fid(sample_folder, data_folder)`` instead: the 32 x 32
samples against the training files at the size they are stored at, both resized by clean-fid to 299 x 299.
A perfect 32-pixel model cannot reach 0 that way, since the real side keeps detail that 32 pixels cannot
hold. This script draws one set of samples per checkpoint (EMA weights, full DDPM chain) and scores it both
ways, so the package's figures can be set beside the reference solutions' published ones:

    python bench/fid_native_resolution.py --data_path ../shared/afhq128/train --samples 512 1000 \\
        --load_path results/model.pt --json bench/out/fid_native.json

Needs clean-fid's Inception weights (offline: ``python ../shared/tools/offline_inception.py``). The real
images' statistics are cached in ``--cache_dir`` like the trainer's, so only the first run computes them.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dataset  # noqa: E402
import fid as fid_module  # noqa: E402
import main as main_module  # noqa: E402
from checkpoint import load_checkpoint, load_state_strict  # noqa: E402
from cli import build_parser  # noqa: E402
from errors import UserError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--load_path", nargs="+", required=True, help="checkpoints (model.pt) to score")
    p.add_argument("--data_path", default="../shared/afhq128/train", help="folder holding <data_class>/")
    p.add_argument("--data_class", default="cat", help="class folder to read")
    p.add_argument("--samples", type=int, nargs="+", default=[512, 1000],
                   help="sample counts N; each checkpoint draws max(N) images and N counts the first N of them")
    p.add_argument("--batch_size", type=int, default=250, help="images per sampling batch")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="autocast dtype while sampling")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    p.add_argument("--cache_dir", default=None, help="decoded-image cache and FID statistics (default: beside the data)")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    if min(args.samples) < 2 or args.batch_size < 1:
        p.error("--samples must be at least 2 and --batch_size positive")
    return args


def native_size(data_path: str, data_class: str) -> int:
    """Side of the stored training images; they must all be square and of one size."""
    from PIL import Image

    files = dataset.find_images(Path(data_path), data_class)
    sizes = set()
    for path in files:
        with Image.open(path) as im:
            sizes.add(im.size)
    if len(sizes) != 1 or len({*next(iter(sizes))}) != 1:
        raise UserError(f"the images under {data_path}/{data_class} come in sizes {sorted(sizes)[:4]}; "
                        f"this comparison needs one square size")
    return next(iter(sizes))[0]


def reference(args, image_size: int, extractor) -> fid_module.FIDEvaluator:
    """An evaluator holding the real statistics at ``image_size`` (from the package's caches when present)."""
    images = dataset.load_images(args.data_path, args.data_class, image_size, cache_dir=args.cache_dir)
    cache_dir = images.cache_path.parent if images.cache_path is not None else Path(args.cache_dir or ".")
    evaluator = fid_module.FIDEvaluator(
        real_key=images.pixels_key, image_size=image_size, cache_dir=cache_dir, extractor=extractor,
        real_batches=lambda: (images.images[i:i + 500] for i in range(0, len(images.images), 500)))
    evaluator.reference()
    return evaluator


def load_model(path: str):
    """The checkpoint's EMA network inside a Diffusion built from its own recorded flags, and its step."""
    ckpt = load_checkpoint(path, map_location="cpu")
    args = build_parser().parse_args([])
    for key, value in {**ckpt.get("config", {}), **ckpt.get("architecture", {})}.items():
        if hasattr(args, key) and value is not None:
            setattr(args, key, value)
    diffusion = main_module.build_diffusion(args)
    load_state_strict(diffusion.model, ckpt.get("ema", ckpt["model"]), "EMA model", path)
    return diffusion.eval(), int(ckpt["step"]), args.image_size


def score(gen: np.ndarray, evaluator: fid_module.FIDEvaluator) -> tuple[float, float]:
    ref = evaluator.reference()
    fid = fid_module.frechet_distance(gen.mean(0), np.cov(gen, rowvar=False), ref.mu, ref.sigma)
    return fid, fid_module.kernel_inception_distance(gen, ref.features)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    extractor = fid_module.FeatureExtractor(mode="clean")
    native = native_size(args.data_path, args.data_class)
    evaluators = {native: reference(args, native, extractor)}
    dtype = {"fp32": None, "bf16": torch.bfloat16}[args.precision]
    rows = []
    for path in args.load_path:
        diffusion, step, size = load_model(path)
        if size not in evaluators:
            evaluators[size] = reference(args, size, extractor)
        generator, chunks, start = torch.Generator().manual_seed(args.seed), [], time.perf_counter()
        for first in range(0, max(args.samples), args.batch_size):
            n = min(args.batch_size, max(args.samples) - first)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                images = diffusion.sample(n, generator=generator).float()
            chunks.append(extractor(fid_module.quantize_uint8(images)))
        gen = np.concatenate(chunks)
        for n in args.samples:
            row = {"checkpoint": str(path), "step": step, "samples": n, "precision": args.precision}
            row["fid_training_size"], row["kid_training_size"] = score(gen[:n], evaluators[size])
            row["fid_native"], row["kid_native"] = score(gen[:n], evaluators[native])
            row.update(training_size=size, native_size=native)
            rows.append(row)
            print(f"{path} step {step} N={n}: FID {row['fid_training_size']:.2f} (KID {row['kid_training_size']:.4f}) "
                  f"against {size} px, {row['fid_native']:.2f} (KID {row['kid_native']:.4f}) against {native} px",
                  flush=True)
        print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                               "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
