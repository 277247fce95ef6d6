"""FID and cost of one checkpoint under each sampler, at each step count: the full DDPM chain against the others.

    python bench/bench_samplers.py --load_path results/model.pt --data_path ./data/train
    python bench/bench_samplers.py --load_path results/model.pt --data_path ./data/train \
        --samplers ddpm ancestral:5 ancestral:10 ddim:50:eta=0.5 ddim_unclipped:50 --json samplers.json

A row is ``NAME[:STEPS][:eta=E]``: a sampler of ``sampling.samplers.SAMPLERS``, or one of ``EXPERIMENTS`` below
(variants measured here, not shipped), over STEPS timesteps (default: the sampler's) with DDIM's noise level E.
Each row draws ``--fid_samples`` images from the checkpoint's EMA weights in FID's batches, from FID's noise seed,
as ``main.py --evaluate`` does; it counts the network evaluations, times the sampling alone (seconds per 1,000
images) and scores the images with clean-fid's Inception against the training images' statistics (computed
once, then cached).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evaluation.scoring import build_evaluator, statistics_dir  # noqa: E402
from imagedata.dataset import TrainingData, load_images  # noqa: E402
from main import adopt_checkpoint_settings  # noqa: E402
from runtime.distributed import pick_device  # noqa: E402
from runtime.precision import autocast  # noqa: E402
from sampling import samplers  # noqa: E402
from sampling.model import load_model  # noqa: E402
from settings.cli import build_parser, parse  # noqa: E402
from settings.record import RunRecord  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load_path", required=True, help="the checkpoint to score")
    p.add_argument("--data_path", default="./data/train/", help="the training images (for FID's statistics)")
    p.add_argument("--cache_dir", default=None, help="where the decoded images and FID statistics are cached")
    p.add_argument("--samplers", nargs="+", default=["ddpm", "ancestral:10", "ancestral:20", "ddim:10",
                                                      "dpmpp_2m_sde:10"],
                   help="rows: NAME[:STEPS][:eta=E], NAME a sampler of the package or of EXPERIMENTS")
    p.add_argument("--fid_samples", type=int, default=1000)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    return p.parse_args(argv)


def ddim_unclipped_step(diffusion, x, t, t_next, z, x_prev, *, t_prev=None, y=None, guidance=0.0, eta=0.0):
    """DDIM's step with the x_0 estimate left unclamped and the network's own noise (the step without Algorithm 2's
    clipping); the next step's self-conditioning input is clamped, as training gives it."""
    eps = diffusion.predict_noise(x, t, x_prev, y, guidance)
    abar, abar_next = diffusion.alpha_bar(t, x.shape), diffusion.alpha_bar(t_next, x.shape)
    sigma = eta * ((1 - abar_next) / (1 - abar) * (1 - abar / abar_next)).sqrt()
    x_start = diffusion.predict_start_from_noise(x, t, eps)
    x = abar_next.sqrt() * x_start + (1 - abar_next - sigma ** 2).clamp(min=0).sqrt() * eps
    return (x if z is None else x + sigma * z), x_start.clamp(-1, 1)


EXPERIMENTS = {"ddim_unclipped": samplers.Sampler(ddim_unclipped_step, stochastic=lambda eta: eta > 0)}


def parse_spec(spec: str) -> dict:
    """``NAME[:STEPS][:eta=E]`` as ``Diffusion.sample``'s keywords."""
    name, *rest = spec.split(":")
    out = {"sampler": name, "steps": None, "eta": 0.0}
    for part in rest:
        if part.startswith("eta="):
            out["eta"] = float(part[4:])
        else:
            out["steps"] = int(part)
    return out


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
    model, _, images = load_checkpoint(
        args.load_path, args.data_path, ["--fid_samples", str(args.fid_samples), "--device", args.device,
                                         *(["--cache_dir", args.cache_dir] if args.cache_dir else [])])
    evaluator = build_evaluator(model.config, model.device, images, model.run, required=True, extractor=extractor)
    evaluator.reference()  # computed once (then cached), never timed
    rows = []
    for spec in args.samplers:
        settings = parse_spec(spec)
        with experiments():  # one network evaluation a step
            plan = samplers.chain_plan(model.diffusion.num_timesteps, settings["sampler"], steps=settings["steps"])
        passes = len(plan)
        generator, spent = model.sampler.generator(1), [0.0]  # FID's noise stream, the same for every row

        def draw(n, labels=None):
            start = time.perf_counter()
            w = model.config.guidance if labels is not None else 0.0
            with experiments(), torch.no_grad(), autocast(model.device, model.precision):
                out = model.diffusion.sample(n, **settings, generator=generator, classes=labels, guidance=w).float()
            spent[0] += time.perf_counter() - start
            return out

        result = evaluator.evaluate(draw)
        row = {"sampler": spec, "network_evaluations": passes, "step": model.step,
               "fid": result["fid"], "kid": result["kid"], "fid_samples": result["fid_samples"],
               "sampling_s_per_1000": spent[0] * 1000 / result["fid_samples"], "precision": model.precision,
               "device": str(model.device)}
        rows.append(row)
        print(f"{spec:>16}: {row['network_evaluations']:>3} evaluations, FID {row['fid']:.2f}  KID {row['kid']:.4f}  "
              f"sampling {row['sampling_s_per_1000']:.1f} s per 1,000 images ({model.precision}, {model.device}, "
              f"checkpoint step {model.step})", flush=True)
    return rows


@contextlib.contextmanager
def experiments():
    """``EXPERIMENTS`` in the sampler table while a row runs."""
    saved = dict(samplers.SAMPLERS)
    samplers.SAMPLERS.update(EXPERIMENTS)
    try:
        yield
    finally:
        samplers.SAMPLERS.clear()
        samplers.SAMPLERS.update(saved)


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = run(args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
