"""Where one training step's time goes: torch.profiler over the package's ``Trainer.train_step``.

    python bench/profile_step.py                      # synthetic batches on the device, main.py's defaults
    python bench/profile_step.py --cuda_graph True --precision fp16 --trace bench/out/trace.json
    python bench/profile_step.py --data --data_path ./data/train --steps 50

Every flag of ``main.py`` that shapes the network or the step applies (``--grad_accum 1 --self_condition False
--weight_decay 0`` profiles the baseline); ``--data`` serves the images of ``--data_path`` instead of one
synthetic batch.

Prints the step time (wall clock, with the device synchronised), how much of it the host spends issuing work
and, on a GPU, how much the device spends computing; then the operators that take the most host and device
time. ``--trace`` also writes a Chrome trace (open it in chrome://tracing or https://ui.perfetto.dev).
"""
from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from imagedata.batches import Batch  # noqa: E402
from runtime.distributed import pick_device  # noqa: E402
from sampling.model import build_diffusion  # noqa: E402
from settings.cli import build_parser, checked  # noqa: E402
from settings.config import Config  # noqa: E402
from trainer import Trainer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[build_parser()], add_help=False,
                                conflict_handler="resolve", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", action="store_true", help="train from --data_path's images (default: one synthetic batch)")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps first")
    p.add_argument("--steps", type=int, default=30, help="profiled steps")
    p.add_argument("--rows", type=int, default=15, help="operators listed per table")
    p.add_argument("--trace", type=Path, default=None, help="also write a Chrome trace here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    parser = build_parser()
    config = checked(parser, **{k: v for k, v in vars(args).items() if k in Config.__dataclass_fields__})
    device = pick_device(config.device)
    torch.manual_seed(0)
    diffusion = build_diffusion(config)
    if args.data:
        from imagedata import dataset
        from imagedata.batches import DeviceBatches

        images = dataset.load_images(config.data_path, config.data_class, config.image_size, progress=False).images
        batches = DeviceBatches(images, config.batch_size, device=device)
    else:
        size = config.image_size
        batches = itertools.repeat(Batch(torch.rand(config.batch_size, 3, size, size, device=device) * 2 - 1))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(diffusion, batches, device=device, config=config.replace(save_folder=tmp))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        trainer.train_step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step()
    issued = time.perf_counter() - start
    sync()
    wall = time.perf_counter() - start
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            trainer.train_step()
        sync()
    events = prof.key_averages()
    images = config.batch_size * config.grad_accum * args.steps
    print(f"{device}, precision {trainer.precision}, compile {config.compile}, CUDA graph {trainer.stepper.graphed}, "
          f"one pass {trainer.stepper.one_pass}, {config.grad_accum} x {config.batch_size} images of "
          f"{config.image_size} px per step, self-conditioning {config.self_condition}, unet_dim {config.unet_dim}, "
          f"torch {torch.__version__}")
    print(f"step: {1e3 * wall / args.steps:.2f} ms wall clock ({images / wall:.0f} images/s); "
          f"the host returns after {1e3 * issued / args.steps:.2f} ms")
    if device.type == "cuda":
        on_device = [e for e in events if "CUDA" in str(e.device_type)]  # kernels and copies
        device_us = sum(e.self_device_time_total for e in on_device)
        kernels = sum(e.count for e in on_device)
        print(f"device busy {device_us / 1e3 / args.steps:.2f} ms per step over {kernels / args.steps:.0f} kernels")
        print(events.table(sort_by="self_device_time_total", row_limit=args.rows))
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if args.trace:
        args.trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(args.trace))
        print(f"wrote {args.trace}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
