"""Inception's speed on the CPU with the batches laid out channels-last (as ``fid.FeatureExtractor`` hands them
over on a CPU) against the same network given the usual contiguous (NCHW) batches.

    python bench/bench_inception.py --images 500 --repeats 3 --json bench/out/inception.json

Both ways run the same clean-fid preprocessing and the same network on the same images, alternating, so
the machine's drift touches both; the features must agree to rounding. ``--bf16`` adds a third way, the
package's channels-last batches under bf16 autocast, to show what lower precision would buy and cost (the
package does not use it: its features stray from clean-fid's far beyond rounding). Uses the real Inception weights
(``python ../shared/tools/offline_inception.py`` puts them where clean-fid looks when offline).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fid  # noqa: E402
from errors import UserError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=500, help="images per timed pass")
    p.add_argument("--image_size", type=int, default=32, help="side of the (random) images before the resize to 299")
    p.add_argument("--batch_size", type=int, default=100, help="images per network call")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per layout (after one untimed warm-up pass)")
    p.add_argument("--bf16", action="store_true", help="also time the channels-last batches under bf16 autocast")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if min(args.images, args.image_size, args.batch_size, args.repeats) < 1:
        p.error("--images, --image_size, --batch_size and --repeats must be positive")
    return args


def feature_difference(features: np.ndarray, reference: np.ndarray) -> dict:
    """Largest absolute difference, and the norm of the difference relative to the reference's norm."""
    return {"max_abs_feature_difference": float(np.abs(features - reference).max()),
            "relative_feature_difference": float(np.linalg.norm(features - reference)
                                                 / max(np.linalg.norm(reference), 1e-30))}


def main(argv: list[str] | None = None, *, model=None) -> dict:
    """Time both layouts; ``model`` stands in for Inception (the tests pass a small network)."""
    args = parse_args(argv)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, args.image_size, args.image_size), dtype=torch.uint8)
    channels_last = fid.FeatureExtractor(device="cpu", batch_size=args.batch_size, model=model)
    try:
        channels_last.load()
    except UserError as e:
        sys.exit(f"bench_inception.py: {e}")
    network = channels_last._model
    contiguous = fid.FeatureExtractor(device="cpu", batch_size=args.batch_size,
                                      model=lambda x: network(x.contiguous()))
    ways = {"channels_last (package)": channels_last, "contiguous NCHW": contiguous}
    if args.bf16:
        def bf16(x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return network(x).float()
        ways["channels_last, bf16 autocast"] = fid.FeatureExtractor(device="cpu", batch_size=args.batch_size, model=bf16)
    for extract in ways.values():
        extract(images[:min(len(images), args.batch_size)])  # warm-up: oneDNN picks its kernels
    times: dict[str, list[float]] = {name: [] for name in ways}
    features = {}
    for _ in range(args.repeats):
        for name, extract in ways.items():
            start = time.perf_counter()
            features[name] = extract(images)
            times[name].append(time.perf_counter() - start)
    a, b = list(features.values())[:2]
    result = {
        "images": args.images, "batch_size": args.batch_size, "torch_threads": torch.get_num_threads(),
        "images_per_s": {name: args.images / statistics.median(t) for name, t in times.items()},
        "seconds": times,
        **feature_difference(a, b),
    }
    rates = list(result["images_per_s"].values())
    result["speedup"] = rates[0] / rates[1]
    if args.bf16:
        result["bf16"] = {"speedup_over_package": rates[2] / rates[0],
                          **feature_difference(features["channels_last, bf16 autocast"], a)}
    width = max(len(name) for name in ways) + 2
    print(f"{'layout':<{width}}{'images/s':>10}")
    for name, rate in result["images_per_s"].items():
        print(f"{name:<{width}}{rate:>10.2f}")
    print(f"channels_last is {result['speedup']:.2f} x as fast; features differ by at most "
          f"{result['max_abs_feature_difference']:.2e} (relative {result['relative_feature_difference']:.1e})")
    if args.bf16:
        low = result["bf16"]
        print(f"bf16 autocast is {low['speedup_over_package']:.2f} x as fast as the package's way; its features differ "
              f"by at most {low['max_abs_feature_difference']:.2e} (relative {low['relative_feature_difference']:.1e})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
