"""Training speed and peak memory at each image size, with the network ``main.py`` gives that size.

    python bench/bench_sizes.py                                   # 32, 64 and 128 px on the device main.py picks
    python bench/bench_sizes.py --sizes 32 64 --steps 20 --json bench/out/sizes.json

Each size is a row of ``bench.py``'s training benchmark (synthetic batches already on the device, the shipped
defaults, mixed precision as chosen per device), measured in a process of its own so that its peak memory is its
own: resident set size on the CPU, ``torch.cuda.max_memory_allocated`` on a GPU. Beside it, the activation
memory of one batch as the memory check before training estimates it (``runtime.memory.batch_memory``), and the step
time as a multiple of the first size's.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import bench  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128], help="image sizes, in pixels")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per size")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--flags", nargs=argparse.REMAINDER, default=[], help="main.py flags for every row (last)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    return p.parse_args(argv)


def estimate_gib(flags: list[str]) -> tuple[float, tuple[int, ...]]:
    """The memory check's estimate of one batch's activations, in GiB, and the network's channel multipliers."""
    from runtime.memory import activation_bytes_per_image
    from sampling.model import build_diffusion

    config = bench.main_flags({"device": "cpu", "flags": flags})
    per_image = activation_bytes_per_image(build_diffusion(config))
    return config.batch_size * per_image / 2**30, config.dim_mults


def run(args) -> list[dict]:
    device = str(bench._device(args.device))
    rows = []
    for size in args.sizes:
        flags = ["--image_size", str(size), *args.flags]
        estimate, mults = estimate_gib(flags)
        spec = {"kind": "train", "pipeline": "synthetic", "label": f"{size}px", "flags": flags, "steps": args.steps,
                "warmup": args.warmup, "workers": 0, "device": device}
        row = {**bench.in_subprocess(spec), "size": size, "dim_mults": list(mults), "estimate_gib": estimate}
        row["step_ratio"] = rows[0]["steps_per_s"] / row["steps_per_s"] if rows else 1.0
        rows.append(row)
        gpu = f"  GPU peak {row['peak_gpu_mib']:.0f} MiB" if row.get("peak_gpu_mib") else ""
        print(f"{size:>4}px  dim_mults {' '.join(map(str, mults)):<12} {row['parameters']:>11,} parameters  "
              f"{row['steps_per_s']:7.3f} steps/s ({row['step_ratio']:5.2f}x the first's step time)  "
              f"{row['images_per_s']:8.1f} img/s  RSS peak {row['peak_rss_mib']:.0f} MiB{gpu}  "
              f"activations estimated {estimate:.2f} GiB  ({row['precision']})", flush=True)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = run(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
