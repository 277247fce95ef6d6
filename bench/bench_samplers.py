"""FID and cost of one checkpoint under each sampler: the full DDPM chain against DDIM at fewer steps.

    python bench/bench_samplers.py --load_path results/model.pt --data_path ./data/train
    python bench/bench_samplers.py --load_path results/model.pt --data_path ./data/train \
        --samplers ddpm ddim:10 ddim:25 ddim:50 --fid_samples 1000 --json samplers.json

Each row draws ``--fid_samples`` images from the checkpoint's EMA weights in FID's batches, from the same noise
seed, as ``main.py --evaluate`` does; it times the sampling alone (seconds per 1,000 images) and scores the
images with clean-fid's Inception against the training images' statistics (computed once, then cached).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evaluation.scoring import build_evaluator, statistics_dir  # noqa: E402
from imagedata.dataset import TrainingData, load_images  # noqa: E402
from main import adopt_checkpoint_settings  # noqa: E402
from runtime.distributed import pick_device  # noqa: E402
from sampling.ema_sampler import EMASampler  # noqa: E402
from sampling.model import load_model  # noqa: E402
from settings.cli import build_parser, checked, parse  # noqa: E402
from settings.record import RunRecord  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load_path", required=True, help="the checkpoint to score")
    p.add_argument("--data_path", default="./data/train/", help="the training images (for FID's statistics)")
    p.add_argument("--cache_dir", default=None, help="where the decoded images and FID statistics are cached")
    p.add_argument("--samplers", nargs="+", default=["ddpm", "ddim:10", "ddim:25", "ddim:50"],
                   help="ddpm (the full chain), or ddim:STEPS")
    p.add_argument("--fid_samples", type=int, default=1000)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    return p.parse_args(argv)


def sampler_settings(spec: str) -> dict:
    """``ddpm`` or ``ddim:STEPS`` as settings."""
    sampler, _, steps = spec.partition(":")
    return {"sampler": sampler, **({"sample_steps": int(steps)} if steps else {})}


def load_checkpoint(load_path: str, data_path: str, flags: list[str] = ()):
    """A checkpoint's loaded EMA model (``sampling.model.LoadedModel``) with its settings (``flags`` added), the
    parser, and the decoded training images of ``data_path`` (its class folders, for a class-conditional model),
    whose record the model's run record holds."""
    parser = build_parser()
    argv = ["--load_path", load_path, "--data_path", data_path, "--evaluate", "--wandb", "disabled", *flags]
    base, named = parse(argv, parser)
    base, _, saved = adopt_checkpoint_settings(base, named, parser)
    images = load_images(base.data_path, "all" if saved.classes else base.data_class, base.image_size,
                         cache_dir=base.cache_dir, channels=base.channels)
    if saved.classes and images.classes != saved.classes:
        raise SystemExit(f"{data_path} holds the classes {images.classes}, the checkpoint {saved.classes}")
    sizes = tuple(images.labels.bincount(minlength=len(saved.classes)).tolist()) if saved.classes else ()
    device = pick_device(base.device)
    record = RunRecord.of_run(base, device=device, world_size=1, saved=saved,
                              data=TrainingData(None, images, saved.classes, sizes),
                              fid_cache_dir=str(statistics_dir(base, images).resolve()))
    return load_model(base, device=device, run=record), parser, images


def run(args, *, extractor=None) -> list[dict]:
    """The rows; ``extractor`` replaces clean-fid's Inception (a stand-in network in the tests)."""
    model, parser, images = load_checkpoint(
        args.load_path, args.data_path, ["--fid_samples", str(args.fid_samples), "--device", args.device,
                                         *(["--cache_dir", args.cache_dir] if args.cache_dir else [])])
    evaluator = build_evaluator(model.config, model.device, images, model.run, required=True, extractor=extractor)
    evaluator.reference()  # computed once (then cached), never timed
    rows = []
    for spec in args.samplers:
        sampler = EMASampler(model.diffusion, checked(parser, model.config, **sampler_settings(spec)),
                             device=model.device, precision=model.precision, classes=model.classes)
        draw, spent = sampler.fid_sample_fn(), [0.0]

        def timed(n, labels=None):
            start = time.perf_counter()
            out = draw(n, labels)
            spent[0] += time.perf_counter() - start
            return out

        result = evaluator.evaluate(timed)
        row = {"sampler": spec, "step": model.step, "fid": result["fid"], "kid": result["kid"],
               "fid_samples": result["fid_samples"], "sampling_s_per_1000": spent[0] * 1000 / result["fid_samples"],
               "precision": model.precision, "device": str(model.device)}
        rows.append(row)
        print(f"{spec:>8}: FID {row['fid']:.2f}  KID {row['kid']:.4f}  sampling {row['sampling_s_per_1000']:.1f} s "
              f"per 1,000 images ({model.precision}, {model.device}, checkpoint step {model.step})", flush=True)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = run(args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
