"""Classifier-free guidance, measured: does a class-conditional model draw the class it is asked for, how good are
its samples per class, and what do conditioning and guidance cost.

    python bench/class_data.py --out ./data/digits/train           # a real 10-class image set, offline
    python main.py --data_path ./data/digits/train --class_conditional --flip False --save_folder runs/digits
    python bench/bench_guidance.py quality --load_path runs/digits/model.pt --data_path ./data/digits/train
    python bench/bench_guidance.py costs                            # conditional and guided steps, timed

``quality``: a small CNN is trained on the real images (nine tenths; its accuracy on the other tenth is
printed); then, at each guidance scale, ``--fid_samples`` samples are drawn with their classes in proportion to
the data and scored by the package's FID evaluator, per class and over all classes (the same samples), and the
classifier says which share of them shows the class that was asked for. Needs clean-fid's Inception weights.

``costs``: steps/s of the training step of the recommended network without and with class labels (10 classes),
and images/s of the 50-step DDPM chain of the unconditional model, of the conditional one at w = 0 and guided
(w > 0: the batch goes through the network twice), measured alternately in one process.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_samplers import load_checkpoint  # noqa: E402
from evaluation.scoring import build_evaluator  # noqa: E402
from imagedata.batches import Batch  # noqa: E402
from runtime.distributed import pick_device  # noqa: E402
from sampling.model import build_diffusion  # noqa: E402
from settings.cli import parse  # noqa: E402
from settings.record import RunRecord  # noqa: E402
from trainer import Trainer  # noqa: E402


class Standardize(nn.Module):
    """Grey levels with each image's mean and spread taken out: a tint, a lighter background or a bolder stroke
    in the samples does not move the classifier off the real images it learned from."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grey = x.mean(dim=1, keepdim=True)
        mean, std = grey.mean(dim=(2, 3), keepdim=True), grey.std(dim=(2, 3), keepdim=True)
        return (grey - mean) / (std + 1e-3)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, classes: int, *, epochs: int = 12,
                     seed: int = 0) -> tuple[nn.Module, float]:
    """A small CNN fitted to nine tenths of ``images`` (uint8 [N, 3, S, S]); returns it and its accuracy on the
    rest."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=generator)
    held_out, fit = order[: len(images) // 10], order[len(images) // 10:]
    torch.manual_seed(seed)
    net = nn.Sequential(Standardize(), nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(64, classes))
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    x = images.float() / 255
    for _ in range(epochs):
        for batch in fit[torch.randperm(len(fit), generator=generator)].split(64):
            loss = nn.functional.cross_entropy(net(x[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.eval()
    return net, share_classified(net, x[held_out], labels[held_out])


@torch.no_grad()
def classify(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The class ``net`` assigns to each of ``images`` (float in [0, 1]), long [N]."""
    return torch.cat([net(chunk).argmax(1) for chunk in images.split(500)])


def share_classified(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of ``images`` (float in [0, 1]) that ``net`` assigns to ``labels``."""
    return (classify(net, images) == labels).float().mean().item()


def quality(args) -> dict:
    extra = ["--fid_samples", str(args.fid_samples), "--sampler", args.sampler]
    model, _, image_set = load_checkpoint(args.load_path, args.data_path, extra)
    config, device = model.config, model.device
    started = time.perf_counter()
    classifier, accuracy = train_classifier(image_set.images, image_set.labels, len(model.classes))
    print(f"classifier: {accuracy:.1%} of held-out real images right ({time.perf_counter() - started:.0f} s)")
    evaluator = build_evaluator(config, device, image_set, model.run, required=True)
    rows = []
    for w in args.guidance:
        drawn = []

        def sample_fn(n, labels, generator=torch.Generator(device).manual_seed(0)):
            images = model.sampler.sample(n, classes=labels, guidance=w, generator=generator)
            drawn.append((images.cpu(), labels))
            return images

        result = evaluator.evaluate(sample_fn)
        images, labels = (torch.cat(parts) for parts in zip(*drawn))
        result.update(guidance=w, classified=share_classified(classifier, images, labels))
        rows.append(result)
        per_class = " ".join(f"{c} {result[f'fid/{c}']:.1f}" for c in model.classes)
        print(f"w = {w:g}: requested class {result['classified']:.1%}, FID {result['fid']:.2f} "
              f"(KID {result['kid']:.4f}), per class: {per_class} ({result['seconds']:.0f} s)")
    return {"step": model.step, "classifier_accuracy": accuracy, "rows": rows, "classes": list(model.classes)}


def costs(args) -> dict:
    """Training steps/s and sampling images/s, unconditional against conditional and guided, alternately timed."""
    import itertools
    import tempfile

    device = pick_device(args.device)
    config = parse(["--device", args.device, "--wandb", "disabled"])[0]
    classes = 10
    trainers = {}
    for name, conditional in (("unconditional", False), ("conditional", True)):
        cfg = config.replace(class_conditional=conditional)
        torch.manual_seed(0)
        x = torch.rand(cfg.batch_size, 3, cfg.image_size, cfg.image_size, device=device) * 2 - 1
        y = torch.arange(cfg.batch_size, device=device) % classes
        batches = itertools.repeat(Batch(x, y if conditional else None))
        names = tuple(str(c) for c in range(classes)) if conditional else ()
        with tempfile.TemporaryDirectory() as tmp:
            trainers[name] = Trainer(build_diffusion(cfg, names), batches, config=cfg.replace(save_folder=tmp),
                                     device=device, run=RunRecord(classes=names))
    train = {name: 0.0 for name in trainers}
    for name, trainer in trainers.items():
        for _ in range(3):
            trainer.train_step()  # warm-up
    for _ in range(args.rounds):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                trainer.train_step()
            float(trainer.train_step())  # waits for the device
            train[name] += time.perf_counter() - start
    steps = args.rounds * (args.steps + 1)
    result = {"train_steps_per_s": {name: steps / seconds for name, seconds in train.items()}}
    cases = {"unconditional": (trainers["unconditional"], None, 0.0),
             "conditional, w = 0": (trainers["conditional"], True, 0.0),
             "conditional, w = 1": (trainers["conditional"], True, 1.0)}
    sample = {}
    for batch in args.sample_batches:
        seconds = {case: 0.0 for case in cases}
        for _ in range(args.rounds):
            for case, (trainer, labelled, w) in cases.items():
                labels = torch.arange(batch) % classes if labelled else None
                start = time.perf_counter()
                trainer.sampler.sample(batch, classes=labels, guidance=w).sum().item()
                seconds[case] += time.perf_counter() - start
        sample[batch] = {case: args.rounds * batch / s for case, s in seconds.items()}
    result["sample_images_per_s"] = sample
    base = result["train_steps_per_s"]["unconditional"]
    print(f"training steps/s: unconditional {base:.3f}, conditional {result['train_steps_per_s']['conditional']:.3f} "
          f"({result['train_steps_per_s']['conditional'] / base:.3f} x)")
    for batch, rates in sample.items():
        ratio = " ".join(f"{case} {rate:.2f} ({rate / rates['unconditional']:.2f} x)" for case, rate in rates.items())
        print(f"sampling images/s at batch {batch}: {ratio}")
    return result


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    q = sub.add_parser("quality", help="requested-class share and per-class FID at each guidance scale")
    q.add_argument("--load_path", required=True)
    q.add_argument("--data_path", required=True, help="the class folders the model was trained on")
    q.add_argument("--guidance", type=float, nargs="+", default=[0.0, 1.0, 3.0])
    q.add_argument("--fid_samples", type=int, default=500, help="samples per guidance scale, over all classes")
    q.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"])
    c = sub.add_parser("costs", help="conditional and guided steps against unconditional ones")
    c.add_argument("--device", default="auto")
    c.add_argument("--steps", type=int, default=10, help="training steps per round")
    c.add_argument("--rounds", type=int, default=3)
    c.add_argument("--sample_batches", type=int, nargs="+", default=[16, 64])
    for p in (q, c):
        p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    result = quality(args) if args.part == "quality" else costs(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main_cli()
