"""FID and KID of other EMA lengths of one run, rebuilt after training from its weight snapshots.

Train with ``--snapshot_every N`` (the mean raw weights of every N steps go to ``<save_folder>/snapshots``),
then score, at the steps asked for, power-function averages of chosen relative widths (sigma_rel, the
standard deviation of the averaged steps as a fraction of the step count; the trainer's EMA keeps the
width of its ``--ema_sigma_rel`` at every step count, 0.05 by default and 0.090 in runs from before that
flag) and, for comparison, the trainer's own EMA rebuilt the same way:

    python bench/ema_lengths.py --run results --steps 1000 5000 10000 --sigma_rel 0.03 0.05 0.09 0.15 \\
        --data_path ../shared/afhq128/train --json bench/out/posthoc_ema.json

Every row samples from the same noise (``--seed``) with the full DDPM chain, against the trainer's FID
statistics of the training images (cached like the trainer's). ``--checkpoint_ema`` adds a row for the EMA
held in ``<run>/model.pt``, to check the rebuilt EMA against it at the checkpoint's step.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import fid as fid_module  # noqa: E402
import posthoc_ema  # noqa: E402
from errors import UserError  # noqa: E402
from fid_protocols import load_model, package_reference, run_script, write_rows  # noqa: E402
from trainer import LEGACY_EMA_SIGMA_REL, choose_precision, ema_decay  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", required=True, help="the run's --save_folder (holding model.pt and snapshots/)")
    p.add_argument("--steps", type=int, nargs="+", default=None,
                   help="step counts to rebuild at, each the last step of a snapshot (default: the checkpoint's)")
    p.add_argument("--sigma_rel", type=float, nargs="*", default=[0.05, 0.09, 0.15],
                   help="relative widths of the power-function averages to score")
    p.add_argument("--trainer_ema", action=argparse.BooleanOptionalAction, default=True,
                   help="also score the trainer's EMA (its --ema_decay and --ema_warmup) rebuilt from the snapshots")
    p.add_argument("--checkpoint_ema", action="store_true", help="also score the EMA saved in <run>/model.pt")
    p.add_argument("--data_path", default="../shared/afhq128/train", help="folder holding <data_class>/")
    p.add_argument("--data_class", default="cat", help="class folder to read")
    p.add_argument("--samples", type=int, default=1000, help="samples per FID")
    p.add_argument("--batch_size", type=int, default=250, help="images per sampling batch")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="autocast dtype while sampling (auto: what the trainer picks on this machine)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise, the same for every row")
    p.add_argument("--cache_dir", default=None,
                   help="decoded-image cache and FID statistics (default: beside the data)")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    if args.samples < 2 or args.batch_size < 1:
        p.error("--samples must be at least 2 and --batch_size positive")
    for value in args.sigma_rel:
        if not 0 < value < 0.2886:
            p.error(f"--sigma_rel {value} is out of range; pick values in (0, 0.2886)")
    return args


def averages(args, config: dict) -> list[tuple[str, object]]:
    """(name, last_step -> per-step weights) of every average to score."""
    found = []
    if args.trainer_ema:
        decay, warmup = config["ema_decay"], config["ema_warmup"]
        width = config.get("ema_sigma_rel", LEGACY_EMA_SIGMA_REL)  # runs from before the flag had the legacy warm-up
        found.append((f"trainer EMA (decay {decay:g}{f', warm-up, sigma_rel {width:.3g}' if warmup else ''})",
                      lambda last: posthoc_ema.ema_step_weights(
                          last, lambda count: ema_decay(count, decay, warmup, width))))
    for value in args.sigma_rel:
        gamma = posthoc_ema.sigma_rel_to_gamma(value)
        found.append((f"power, sigma_rel {value:g} (gamma {gamma:.2f})",
                      lambda last, g=gamma: posthoc_ema.power_step_weights(g, last)))
    return found


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = Path(args.run)
    checkpoint = run / "model.pt"
    if not checkpoint.exists():
        raise UserError(f"{checkpoint} does not exist; --run must be a training run's --save_folder")
    diffusion, ckpt_step, size, config = load_model(str(checkpoint))
    snapshots = posthoc_ema.list_snapshots(run / "snapshots")
    ends = [last for _, last, _ in snapshots]
    steps = args.steps or [ckpt_step]
    missing = [s for s in steps if s not in ends]
    if missing:
        shown = ", ".join(map(str, ends[:3])) + (f", ..., {ends[-1]}" if len(ends) > 3 else "")
        raise UserError(f"no snapshot ends at step {missing[0]}; pick steps where one ends: {shown}")
    precision = choose_precision(args.precision, torch.device("cpu"))
    dtype = torch.bfloat16 if precision == "bf16" else None
    evaluator = package_reference(argparse.Namespace(data_path=args.data_path, data_class=args.data_class,
                                                     cache_dir=args.cache_dir, batch_size=args.batch_size),
                                  size, fid_module.FeatureExtractor(mode="clean"))
    rows = []

    def score(name: str, step: int) -> None:
        generator, start = torch.Generator().manual_seed(args.seed), time.perf_counter()

        def sample(n: int) -> torch.Tensor:
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                return diffusion.sample(n, generator=generator).float()

        fid, kid = evaluator.score(evaluator.sample_features(sample, args.samples))
        rows.append({"step": step, "average": name, "fid": fid, "kid": kid, "samples": args.samples,
                     "precision": precision, "seconds": time.perf_counter() - start})
        print(f"step {step:>6}  {name:<40}  FID {fid:7.2f}  KID {kid:.4f}  ({rows[-1]['seconds']:.0f} s)", flush=True)

    if args.checkpoint_ema:
        score("checkpoint EMA (model.pt)", ckpt_step)
    for step in steps:
        for name, weights in averages(args, config):
            posthoc_ema.rebuild_into(diffusion.model, snapshots, weights(step))
            score(name, step)
    write_rows(args.json, rows, run=str(run))
    return 0


if __name__ == "__main__":
    run_script(main)
