"""Where one reverse chain's time goes, for each sampler: the chains timed in turn, then torch.profiler over one.

    python bench/profile_chain.py --load_path results/model.pt                    # DDPM, ancestral and DDIM, 50 steps
    python bench/profile_chain.py --load_path results/model.pt --batch 64 --rounds 3 --samplers ddpm ancestral:10

Each row is ``NAME[:STEPS]`` as in ``bench_samplers.py`` (default: the three at T steps, so that every row makes
the same network evaluations). The rows run one after another, ``--rounds`` times over, from the same noise, after
one short warm-up chain, so that a row's place in the order does not decide its time. Prints each chain's seconds
and, for the first ``--profile`` rows, the operators that take the most time in one chain, with the network's
share (convolutions, normalisation, activations, attention) against the rest.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_samplers import parse_spec  # noqa: E402
from runtime.precision import autocast  # noqa: E402
from sampling.model import load_model  # noqa: E402
from settings.cli import build_parser, parse  # noqa: E402

NETWORK_OPS = ("convolution", "group_norm", "silu", "gelu", "cat", "bmm", "softmax", "linear", "addmm", "upsample",
               "layer_norm", "scaled_dot_product")  # the U-Net's own operators, for the share the report gives


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load_path", required=True, help="the checkpoint")
    p.add_argument("--samplers", nargs="+", default=["ddpm", "ancestral:50", "ddim:50"], help="rows: NAME[:STEPS]")
    p.add_argument("--batch", type=int, default=64, help="images per chain")
    p.add_argument("--rounds", type=int, default=2, help="times each row is timed, in turn")
    p.add_argument("--profile", type=int, default=2, help="rows profiled (the first ones)")
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def load(load_path: str, device: str):
    """The checkpoint's EMA model, its network settings taken from the checkpoint as main.py takes them."""
    import main

    parser = build_parser()
    config, named = parse(["--load_path", load_path, "--sample", "1", "--device", device, "--wandb", "disabled"],
                          parser)
    config, _, run = main.adopt_checkpoint_settings(config, named, parser)
    return load_model(config, run=run)


def run(args) -> dict:
    """``{"times": {row: [seconds, ...]}, "network_share": {row: share}, "tables": {row: text}}``."""
    model = load(args.load_path, args.device)
    rows = {spec: parse_spec(spec) for spec in args.samplers}

    def chain(settings: dict) -> float:
        generator = torch.Generator(model.device).manual_seed(0)
        with torch.no_grad(), autocast(model.device, model.precision):
            start = time.perf_counter()
            model.diffusion.sample(args.batch, **settings, generator=generator)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start

    chain({"sampler": "ancestral", "steps": min(3, model.diffusion.num_timesteps)})  # warm-up, not timed
    times = {spec: [] for spec in rows}
    for _ in range(args.rounds):
        for spec, settings in rows.items():
            times[spec].append(chain(settings))
    shares, tables = {}, {}
    for spec in list(rows)[:args.profile]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            chain(rows[spec])
        averages = prof.key_averages()
        total = sum(a.self_cpu_time_total for a in averages)
        network = sum(a.self_cpu_time_total for a in averages if any(op in a.key for op in NETWORK_OPS))
        shares[spec] = network / total if total else 0.0
        tables[spec] = averages.table(sort_by="self_cpu_time_total", row_limit=10)
    return {"times": times, "network_share": shares, "tables": tables}


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    for spec, seconds in result["times"].items():
        print(f"{spec:>16}: " + ", ".join(f"{s:.2f}" for s in seconds) + f" s per chain of {args.batch} images")
    for spec, table in result["tables"].items():
        print(f"\n== {spec}: the network's operators take {result['network_share'][spec]:.0%} of the time\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
