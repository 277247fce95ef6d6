"""Benchmark: seconds per FID evaluation, this package's ``FIDEvaluator`` against the reference solutions' way.

Both score the same images with the real Inception network (clean-fid's ``clean`` mode), in one run:

- the reference solutions' way, per evaluation: write the N samples as PNG files with ``save_image``, then
  ``cleanfid.fid.compute_fid(gen_folder, real_folder)``, which rebuilds Inception and recomputes the features
  of every real image each time (clean-fid's defaults otherwise: ``--workers`` 12, batch size 32). The real
  folder (the training images at the training size, as PNGs) is written once, untimed;
- this package: the one-time reference statistics (all real features), loading them back from the cache
  (a new run), and ``evaluate`` with them in memory (quantize, resize, Inception, FID and KID).

The "samples" are stand-ins: the first N training images plus Gaussian noise (sigma 0.1), so that both
ways do identical work and their FIDs must agree. Sampling itself costs the same in both ways and is left
out, unless ``--sample_images_per_s`` (the trainer's sampling throughput, measured separately) is given:
then N / rate is added to both columns. Needs clean-fid's weights at /tmp/inception-2015-12-05.pt (on
machines without internet, copy them there). Example:

    python bench/bench_fid.py --data_path ./data/train --image_size 32 --samples 512 1000 \\
        --json bench/out/fid.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_path", default="./data/train", help="folder holding <data_class>/")
    p.add_argument("--data_class", default="cat", help="class folder to read")
    p.add_argument("--image_size", type=int, default=32, help="training resolution")
    p.add_argument("--samples", type=int, nargs="+", default=[512, 1000], help="sample counts N to time")
    p.add_argument("--limit", type=int, default=None, help="use only the first L real images")
    p.add_argument("--quick", action="store_true", help="smoke test: 200 real images, N capped at 64")
    p.add_argument("--workers", type=int, default=12, help="DataLoader workers of compute_fid (its default)")
    p.add_argument("--sample_images_per_s", type=float, default=None, help="sampling rate to add to both ways")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def load_real(folder: Path, size: int, limit: int | None):
    """The real images as uint8 [M, 3, size, size], decoded with PIL and resized with LANCZOS."""
    import numpy as np
    import torch
    from PIL import Image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
    files = files[:limit] if limit else files
    arrays = []
    for path in files:
        with Image.open(path) as im:
            arrays.append(np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch
    from cleanfid import fid as cleanfid
    from torchvision.utils import save_image

    from evaluation import fid

    weights, url = fid.weights_location("clean")
    if not os.path.exists(weights):
        print(f"Inception weights missing at {weights}: download {url} there", file=sys.stderr)
        return 2
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    limit = 200 if args.quick and not args.limit else args.limit
    counts = [min(n, 64) for n in args.samples] if args.quick else args.samples
    real = load_real(Path(args.data_path) / args.data_class, args.image_size, limit)
    gen = torch.Generator().manual_seed(0)
    stand_ins = (real[:max(counts)].float() / 255 + 0.1 * torch.randn(real[:max(counts)].shape, generator=gen))
    stand_ins = stand_ins.clamp(0, 1)
    if len(stand_ins) < max(counts):
        stand_ins = stand_ins.repeat(-(-max(counts) // len(stand_ins)), 1, 1, 1)
    print(f"{len(real)} real images at {args.image_size} px, samples {counts}, device {device}, "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    results: dict = {"device": str(device), "cpu_count": os.cpu_count(), "real_images": len(real),
                     "image_size": args.image_size, "platform": platform.platform(), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "real").mkdir()
        for i, image in enumerate(real):  # the reference solutions keep this folder; written once, untimed
            save_image(image.float() / 255, tmp / "real" / f"{i:05d}.png")

        def real_batches():
            yield from real.split(250)
        evaluator_args = dict(real_key="bench", image_size=args.image_size, real_batches=real_batches,
                              device=device, cache_dir=tmp / "cache")
        start = time.perf_counter()
        fid.FIDEvaluator(**evaluator_args).reference()
        results["reference_build_s"] = time.perf_counter() - start
        start = time.perf_counter()
        fid.FIDEvaluator(**evaluator_args).reference()
        results["reference_load_s"] = time.perf_counter() - start
        print(f"ours, once per dataset: reference statistics {results['reference_build_s']:.1f} s; "
              f"loading them in a new run (network included) {results['reference_load_s']:.1f} s")

        for n in counts:
            evaluator = fid.FIDEvaluator(**evaluator_args, num_samples=n)
            evaluator.reference()  # warm: loaded from the cache, kept in memory as during training
            batches = iter(stand_ins[:n].split(evaluator.batch_size))
            sync()
            ours = evaluator.evaluate(lambda k, labels: next(batches))
            sync()
            gen_dir = tmp / f"gen{n}"
            gen_dir.mkdir()
            start = time.perf_counter()
            for i, image in enumerate(stand_ins[:n]):
                save_image(image, gen_dir / f"{i:05d}.png")
            theirs_fid = cleanfid.compute_fid(str(gen_dir), str(tmp / "real"), mode="clean", device=device,
                                              num_workers=args.workers, verbose=False)
            theirs_s = time.perf_counter() - start
            extra = n / args.sample_images_per_s if args.sample_images_per_s else 0.0
            results["rows"].append({"samples": n, "reference_way_s": theirs_s + extra, "ours_s": ours["seconds"] + extra,
                                    "sampling_s_added": extra, "fid_reference_way": float(theirs_fid),
                                    "fid_ours": ours["fid"], "kid_ours": ours["kid"]})

    print(f"\n{'N':>6} | {'reference way (s)':>17} | {'ours (s)':>8} | {'ratio':>6} | FID theirs / ours")
    for row in results["rows"]:
        print(f"{row['samples']:>6} | {row['reference_way_s']:>17.1f} | {row['ours_s']:>8.1f} | "
              f"{row['reference_way_s'] / row['ours_s']:>5.1f}x | {row['fid_reference_way']:.3f} / {row['fid_ours']:.3f}")
    if any(r["sampling_s_added"] for r in results["rows"]):
        print("(both columns include sampling at --sample_images_per_s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
