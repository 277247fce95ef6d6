"""How far training has grown a run's kernels: the norm of each convolution and linear kernel of a checkpoint's
raw weights over the norm of the same kernel at initialisation, grouped by the layer's role in the U-Net.

The initial network is rebuilt from the checkpoint's own flags and seed, as ``main.py`` builds it, so the
ratios are exact for runs the package started. Kernels that start at zero (the last convolution) have no
ratio and are listed by their norm instead.

    python bench/weight_norms.py results/model.pt other_run/model.pt --json bench/out/weight_norms.json

Why it matters: Adam's steps have a fixed size per weight, so a kernel that has grown k times turns through
an angle k times smaller per step; for a kernel that GroupNorm follows (each residual block's first
convolution) only that angle matters, and the growth acts as a learning-rate decay. ``--weight_decay``
bounds it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import main as main_module  # noqa: E402
from checkpoint import load_checkpoint, load_state_strict  # noqa: E402
from errors import UserError  # noqa: E402
from fid_protocols import checkpoint_args  # noqa: E402

NAMED_ROLES = {"time_embed": "time MLP", "input_conv": "input convolution", "output": "output convolution"}
ATTRIBUTE_ROLES = {"conv1": "residual block, first convolution (GroupNorm follows)",
                   "conv2": "residual block, second convolution", "skip": "residual block, 1x1 skip",
                   "time_proj": "residual block, time projection", "qkv": "attention, qkv projection",
                   "out": "attention, output projection", "conv": "down- and upsampling convolution"}


def role(name: str) -> str:
    """The role of a parameter named as in ``Unet.named_parameters()``, e.g. ``down.0.conv1.weight``."""
    parts = name.split(".")
    if parts[0] in NAMED_ROLES:
        return NAMED_ROLES[parts[0]]
    return ATTRIBUTE_ROLES.get(parts[-2], parts[-2])


def initial_and_trained(path: str) -> tuple[torch.nn.Module, torch.nn.Module, int, argparse.Namespace]:
    """The network as ``main.py`` initialised it for this checkpoint's run, the same network holding the
    checkpoint's raw (not EMA) weights, the checkpoint's step and its run's flags."""
    ckpt = load_checkpoint(path, map_location="cpu")
    args = checkpoint_args(ckpt)
    torch.manual_seed(args.seed)  # as main.py seeds before building the model
    initial = main_module.build_diffusion(args).model
    trained = main_module.build_diffusion(args).model
    load_state_strict(trained, ckpt["model"], "model", path)
    return initial, trained, int(ckpt["step"]), args


def kernel_growth(initial: torch.nn.Module, trained: torch.nn.Module) -> list[dict]:
    """One row per role: how many kernels, and the median, smallest and largest ratio of trained to initial
    norm (``None`` for roles whose kernels start at zero, with their trained norm instead)."""
    groups: dict[str, list[tuple[float, float]]] = {}
    start = dict(initial.named_parameters())
    for name, p in trained.named_parameters():
        if p.dim() < 2:
            continue
        groups.setdefault(role(name), []).append((start[name].norm().item(), p.detach().norm().item()))
    rows = []
    for name, pairs in groups.items():
        ratios = [b / a for a, b in pairs if a > 0]
        row = {"role": name, "kernels": len(pairs)}
        if ratios:
            row.update(median=statistics.median(ratios), min=min(ratios), max=max(ratios))
        else:
            row.update(median=None, min=None, max=None, norm=max(b for _, b in pairs))
        rows.append(row)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="model.pt files written by main.py")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = []
    try:
        for path in args.checkpoints:
            initial, trained, step, run_args = initial_and_trained(path)
            results.append({"checkpoint": path, "step": step, "weight_decay": run_args.weight_decay,
                            "rows": kernel_growth(initial, trained)})
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for result in results:
        print(f"{result['checkpoint']} (step {result['step']}, weight decay {result['weight_decay']}): "
              "kernel norm over its initial norm")
        for r in result["rows"]:
            if r["median"] is None:
                print(f"  {r['role']:<55} {r['kernels']:>3} kernels  start at zero, now {r['norm']:.3f}")
            else:
                print(f"  {r['role']:<55} {r['kernels']:>3} kernels  median {r['median']:.2f} "
                      f"(from {r['min']:.2f} to {r['max']:.2f})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
