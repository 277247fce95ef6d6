"""Whether a model's fill agrees with what is kept, and whether it draws each class as often as the data holds it,
judged by a classifier on labelled real images (class folders; the model itself need not be class-conditional):

    python bench/class_data.py --out ./data/digits/all --grey           # 5,000 MNIST digits, a folder per digit
    python bench/bench_edits.py split --source ./data/digits/all --train ./data/digits/train \\
        --held_out ./data/digits/held --every 17                        # every 17th of each digit (300) held out
    python main.py --data_path ./data/digits/train --data_class all --channels 1 --flip False \\
        --train_steps 1500 --save_folder runs/digits                    # an unconditional grey model
    python bench/bench_digits.py complete --load_path runs/digits/model.pt --data_path ./data/digits/train \\
        --held_out ./data/digits/held --masks bottom --resample 1 5
    python bench/bench_digits.py balance --load_path runs/digits/model.pt --data_path ./data/digits/train

A small CNN (``bench_guidance.train_classifier``) is fitted to ``--data_path``'s images, never to the held-out ones.

``complete`` hides each mask's region of every held-out image and fills it in turn with: the training images'
mean there (mean fill); that region of the training image whose kept part is nearest (retrieval: least squared
distance over the kept pixels); the model's inpainting, for each sampler and resampling count, ``--fills`` times
per image from as many noise seeds. Each row gives the share the classifier names as the image's own class,
overall and per class, and the seconds per image; the held-out images whole give the classifier's ceiling. The
floors take no model (leave out ``--load_path``): a fill that is named right less often than retrieval continues
what is kept worse than a lookup does. Each row after retrieval also gives its lead over retrieval in points, with
a 95 % interval paired over the held-out images (each image's share of right fills less retrieval's 0 or 1), so
that a lead smaller than the held-out set can show reads as such.

``balance`` draws ``--samples`` images from each checkpoint given (its sampler or each of ``--samplers``, one noise
seed) and compares the share of each class the classifier names with the data's own; the largest gap and the total
variation (half the sum of the gaps), in points, are the row's summary. Each row also gives the samples' mean
level (``ink``: on dark-ground digits, how much of an image is stroke) beside the data's: a model whose samples
hold less ink than the data draws the thinner digits more often. With ``--held_out``, a first row reads real
images the same way: the classifier's own errors give them gaps too, the floor a model drawing the data's very
shares would score. From how it reads them (each class's images named as each class) come the data's shares as the
classifier would name them (``data_as_read``), and each sample row's gaps against those as well
(``against_data_as_read``): a model drawing the data's shares scores no gap there but the sampling noise, as long
as the classifier errs on its samples as it errs on real images. Several checkpoints of one run (saved along its
training) give the balance over training.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_edits import KEPT_GUIDANCE, Bench, inpainting_samplers, report  # noqa: E402
from bench_guidance import classify, train_classifier  # noqa: E402
from imagedata.dataset import class_labels, load_images  # noqa: E402
from sampling.edit_commands import input_files, named_mask, read_inputs  # noqa: E402


def labelled_training(images, data_path: str):
    """The training images (uint8) with their classes, refusing a folder without class folders."""
    if len(images.classes) < 2:
        raise SystemExit(f"{data_path} has no class folders; the classifier needs one folder per class "
                         f"(python bench/class_data.py writes digits so)")
    return images


def held_out_truth(files, args, classes: tuple[str, ...]) -> torch.Tensor:
    """The class of each held-out file (long [N]), refusing held-out class folders other than the training data's."""
    found, truth = class_labels(files, Path(args.held_out))
    if found != classes:
        raise SystemExit(f"{args.held_out} holds the classes {found}, {args.data_path} {classes}")
    return truth


def floors_data(args):
    """Without a model: the training images and the held-out ones at ``--image_size`` and ``--channels``."""
    images = load_images(args.data_path, args.data_class, args.image_size, cache_dir=args.cache_dir,
                         channels=args.channels)
    files = input_files(args.held_out, "held_out")
    return images, files, read_inputs(files, args.image_size, args.channels, "held_out")


def shares(right: torch.Tensor, truth: torch.Tensor, classes: tuple[str, ...]) -> dict:
    """The share of ``right`` (each image's share of fills named as its class), over all and within each class."""
    return {"named_right": right.mean().item(),
            "per_class": {name: right[truth == c].mean().item() for c, name in enumerate(classes) if (truth == c).any()}}


def lead_over(right: torch.Tensor, reference: torch.Tensor) -> dict:
    """The mean of ``right - reference`` over the images, in points, and its 95 % interval's half-width (normal,
    paired: both were scored on the same images)."""
    difference = 100 * (right - reference)
    half = 1.96 * difference.std() / len(difference) ** 0.5 if len(difference) > 1 else float("nan")
    return {"lead_over_retrieval_points": difference.mean().item(), "lead_95_half_width": float(half)}


def retrieval_fill(inputs: torch.Tensor, training: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each image's hole filled from the training image whose kept pixels are nearest (least squares)."""
    keep = 1 - mask
    distances = torch.cdist((inputs * keep).flatten(1), (training * keep).flatten(1))  # [N, N_train]
    nearest = distances.argmin(dim=1)
    return inputs * keep + training[nearest] * mask


def complete(args) -> list[dict]:
    if args.fills < 1:
        raise SystemExit(f"--fills must be 1 or more, got {args.fills}")
    bench = Bench(args) if args.load_path else None
    training, files, inputs = (bench.training_images, bench.files, bench.inputs) if bench else floors_data(args)
    classes = labelled_training(training, args.data_path).classes
    truth = held_out_truth(files, args, classes)
    classifier, accuracy = train_classifier(training.images, training.labels, len(classes))
    size = inputs.shape[-1]
    train_x = training.images.float() / 255
    ceiling = {"method": "held-out images, whole",
               **shares((classify(classifier, inputs) == truth).float(), truth, classes)}
    print(f"classifier: {accuracy:.1%} of its own held-out tenth of the training images right", flush=True)
    report(ceiling)
    rows = [{"classifier_accuracy": accuracy, "held_out": len(inputs)}, ceiling]

    def scored(mask_name: str, method: str, filled: torch.Tensor, seconds: float, reference=None) -> torch.Tensor:
        """Score fills (``--fills`` of each image, one after another, for the model's rows); each image's share
        of right fills."""
        right = (classify(classifier, filled) == truth.repeat(len(filled) // len(truth))).float()
        right = right.view(-1, len(truth)).mean(dim=0)
        row = {"mask": mask_name, "method": method, **shares(right, truth, classes), "s_per_image": seconds,
               **(lead_over(right, reference) if reference is not None else {})}
        report(row)
        rows.append(row)
        return right

    for name in args.masks:
        mask = named_mask(name, size, generator=torch.Generator().manual_seed(0))
        start = time.perf_counter()
        filled = inputs * (1 - mask) + train_x.mean(dim=0) * mask
        scored(name, "mean fill", filled, (time.perf_counter() - start) / len(inputs))
        start = time.perf_counter()
        filled = retrieval_fill(inputs, train_x, mask)
        retrieved = scored(name, "retrieval", filled, (time.perf_counter() - start) / len(inputs))
        for method, sampler in inpainting_samplers(bench, args) if bench else ():
            fills = [bench.timed(lambda a, b, g: sampler.edit(inputs[a:b], keep=1 - mask, generator=g),
                                 len(inputs), seed=seed, per_image=sampler.config.candidates)
                     for seed in range(args.fills)]
            scored(name, method, torch.cat([edited for edited, _ in fills]).float() / 255,
                   sum(seconds for _, seconds in fills) / len(fills), reference=retrieved)
    return rows


def ink(images: torch.Tensor) -> float:
    """The mean level of ``images`` (uint8) in [0, 1]: on dark-ground digits, how much of each image is stroke."""
    return images.float().mean().item() / 255


def shares_of(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """Each class's share of ``labels`` (long [N]), float [classes]."""
    return labels.bincount(minlength=classes).float() / len(labels)


def gaps_from(named: torch.Tensor, data: torch.Tensor, classes: tuple[str, ...]) -> dict:
    """The shares ``named`` (per class, summing to 1) against the data's ``data``: the largest gap and its class,
    and the total variation (half the sum of the gaps), in points."""
    gaps = [100 * (s - d) for s, d in zip(named.tolist(), data.tolist())]
    largest = max(range(len(gaps)), key=lambda c: abs(gaps[c]))
    return {"largest_gap_points": gaps[largest], "class_of_largest_gap": classes[largest],
            "total_variation_points": sum(map(abs, gaps)) / 2}


def confusion(named: torch.Tensor, truth: torch.Tensor, classes: tuple[str, ...]) -> torch.Tensor:
    """How the classifier reads labelled images it never fitted (long [N] each): float [classes, classes], column
    ``j`` the shares of class ``j``'s images it names as each class."""
    counts = torch.zeros(len(classes), len(classes))
    counts.index_put_((named, truth), torch.ones(len(named)), accumulate=True)
    missing = [name for name, seen in zip(classes, counts.sum(0).tolist()) if seen == 0]
    if missing:
        raise SystemExit(f"the held-out folders hold no images of {', '.join(missing)}; the classifier's reading "
                         f"of every class is needed")
    return counts / counts.sum(0)


def balance(args) -> list[dict]:
    rows, classifier, read = [], None, None
    for path in args.load_path:
        bench = Bench(args, load_path=path)
        training = labelled_training(bench.training_images, args.data_path)
        classes = training.classes
        if classifier is None:
            classifier, accuracy = train_classifier(training.images, training.labels, len(classes))
            data = shares_of(training.labels, len(classes))
            print(f"classifier: {accuracy:.1%} of its own held-out tenth of the training images right", flush=True)
            rows.append({"classifier_accuracy": accuracy, "data": dict(zip(classes, data.tolist())),
                         "data_ink": ink(training.images)})
            if args.held_out:  # what a model drawing the data's very shares would score: real images, as named
                truth, labels = held_out_truth(bench.files, args, classes), classify(classifier, bench.inputs)
                read = confusion(labels, truth, classes) @ data
                named = shares_of(labels, len(classes))
                row = {"reference": "held-out images, as the classifier names them", "images": len(truth),
                       "samples": dict(zip(classes, named.tolist())),
                       **gaps_from(named, shares_of(truth, len(classes)), classes), "ink": ink(bench.real),
                       "data_as_read": dict(zip(classes, read.tolist()))}
                report(row)
                rows.append(row)
        for spec in args.samplers or [None]:
            sampler = bench.sampler(spec)
            drawn, seconds = bench.timed(lambda a, b, g: sampler.sample(b - a, generator=g), args.samples)
            named = shares_of(classify(classifier, drawn.float() / 255), len(classes))
            row = {"load_path": path, "step": bench.model.step, "sampler": sampler.config.sampler_name,
                   "samples": dict(zip(classes, named.tolist())), **gaps_from(named, data, classes),
                   "ink": ink(drawn), "s_per_image": seconds}
            if read is not None:  # against the data's shares as the classifier would name them: its errors out
                row["against_data_as_read"] = gaps_from(named, read, classes)
            report(row)
            rows.append(row)
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    for name, helps in (("complete", "each mask: the share of held-out images whose fill the classifier names "
                                     "right, for the floors and the model's inpainting"),
                        ("balance", "each checkpoint: the share of its samples in each class against the data's")):
        p = sub.add_parser(name, help=helps)
        if name == "balance":
            p.add_argument("--load_path", required=True, nargs="+", help="checkpoints of a model trained on "
                           "--data_path")
        else:
            p.add_argument("--load_path", default=None, help="a checkpoint of a model trained on --data_path; "
                           "without one, the floors alone (at --image_size and --channels)")
            p.add_argument("--image_size", type=int, default=32, help="without --load_path: the images' side")
            p.add_argument("--channels", type=int, default=1, choices=(1, 3), help="without --load_path")
        p.add_argument("--data_path", required=True, help="the class folders the model was trained on")
        p.add_argument("--data_class", default="all", help="the sub-folder of --data_path the model was trained on")
        p.add_argument("--cache_dir", default=None)
        p.add_argument("--device", default="auto")
        p.add_argument("--json", type=Path, default=None, help="also write the rows here")
        if name == "complete":
            p.add_argument("--held_out", required=True, help="class folders of images kept out of training")
            p.add_argument("--masks", nargs="+", default=["bottom"])
            p.add_argument("--resample", type=int, nargs="+", default=[1, 5])
            p.add_argument("--kept_guidance", type=float, nargs="+", default=[0.0, KEPT_GUIDANCE],
                           help="each --kept_guidance the inpainting rows run (0: replacement and RePaint alone)")
            p.add_argument("--samplers", nargs="+", default=["ancestral:10"],
                           help="NAME[:STEPS] of each sampler the inpainting rows run (bench_samplers' rows)")
            p.add_argument("--candidates", type=int, nargs="+", default=[1],
                           help="each --candidates the inpainting rows run (fills drawn per image, the consensus kept)")
            p.add_argument("--fills", type=int, default=1, help="fills of each held-out image in every inpainting "
                           "row, from noise seeds 0, 1, ...; its share is over all of them")
        else:
            p.add_argument("--samples", type=int, default=1000, help="images drawn from each checkpoint and sampler")
            p.add_argument("--samplers", nargs="+", default=None,
                           help="NAME[:STEPS] of each sampler to draw with (default: the checkpoint's own)")
            p.add_argument("--held_out", default=None, help="class folders of real images kept out of training: "
                           "their shares as the classifier names them, the reading a perfect model would get, "
                           "and the samples' gaps against the data as the classifier reads it")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = {"complete": complete, "balance": balance}[args.part](args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
