"""Editing, measured on real images kept out of training: inpainting (RePaint's resampling against plain
replacement and a mean fill), image-to-image at each strength, and class translation judged by a classifier.

    python bench/bench_edits.py split --source ./data/train/cat --train ./data/cats-train/cat \
        --held_out ./data/cats-held-out --every 17                  # every 17th cat (304) is held out
    python main.py --data_path ./data/cats-train --train_steps 2000 --save_folder runs/held-out
    python bench/bench_edits.py inpaint --load_path runs/held-out/model.pt --data_path ./data/cats-train \
        --held_out ./data/cats-held-out --masks centre bottom --resample 1 2 5 --kept_guidance 0 10 \
        --candidates 1 8 --samplers ancestral:10 ddpm
    python bench/bench_edits.py img2img --load_path runs/held-out/model.pt --data_path ./data/cats-train \
        --held_out ./data/cats-held-out --strengths 0 0.25 0.5 0.75 1
    python bench/bench_edits.py translate --load_path runs/digits/model.pt --data_path ./data/digits-train \
        --held_out ./data/digits-held-out --strengths 0.5 0.75 --guidance 0 1 3

Every row edits each held-out image once, from the same noise seed, with the checkpoint's EMA weights and
sampler, in the batches the commands use, and times the editing alone (seconds per image; the plain-sampling
row draws as many images from noise in the same batches). FID and KID (clean-fid, needs its Inception weights)
score the results against the statistics of ``--data_path``'s images (the training images, or all of them);
the inpainting table starts with the held-out images themselves and as many plain samples (image-to-image at
s = 0 and s = 1 gives these two). Inpainting also gives the error inside the hole against the original (RMSE,
8-bit levels) and the jump across the mask's border (mean absolute difference of neighbouring pixels, one kept
and one filled; the originals' own jump is the target). Image-to-image gives the distance from the input
(RMSE). Translation sends each held-out image of class c to another class (c + 1 + i mod (C - 1), so every pair
occurs) and reports the share a small CNN, fitted to ``--data_path``'s images, assigns to the target, and to
the source.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_guidance import share_classified, train_classifier  # noqa: E402
from bench_samplers import load_checkpoint, parse_spec  # noqa: E402
from evaluation.fid import quantize_uint8  # noqa: E402
from evaluation.scoring import build_evaluator  # noqa: E402
from imagedata.dataset import class_labels  # noqa: E402
from imagedata.files import scan  # noqa: E402
from sampling.edit_commands import in_batches, input_files, named_mask, read_inputs  # noqa: E402
from sampling.editing import pull_applies  # noqa: E402
from sampling.ema_sampler import EMASampler  # noqa: E402
from settings.cli import checked  # noqa: E402
from settings.config import Config  # noqa: E402

KEPT_GUIDANCE = Config().kept_guidance  # the inpainting rows run it and 0 unless told otherwise


def split(source: Path, train: Path, held_out: Path, every: int) -> tuple[int, int]:
    """Link every ``every``-th image of each folder under ``source`` (in name order) into ``held_out`` and the
    others into ``train``, keeping their paths below ``source``; returns the two counts."""
    files = sorted(scan(source, "all").files)
    position: dict[Path, int] = {}
    counts = [0, 0]
    for path in files:
        rel = path.relative_to(source)
        n = position[rel.parent] = position.get(rel.parent, -1) + 1
        target = (held_out if n % every == 0 else train) / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(path.resolve(), target)
        counts[n % every != 0] += 1
    return counts[1], counts[0]


def levels_rmse(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor | None = None) -> float:
    """RMSE between uint8 images, in 8-bit levels, over the pixels ``where`` is 1 (all by default)."""
    d2 = (a.float() - b.float()) ** 2
    if where is None:
        return d2.mean().sqrt().item()
    where = where.expand_as(d2)
    return (d2 * where).sum().div(where.sum()).sqrt().item()


def seam_jump(images: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean absolute difference (8-bit levels) of horizontally or vertically neighbouring pixels of which one is
    filled (``mask`` [1, S, S] 1) and one kept."""
    x, m = images.float(), mask.bool()
    jumps = []
    for dim in (-1, -2):
        n = x.shape[dim]
        border = m.narrow(dim, 1, n - 1) != m.narrow(dim, 0, n - 1)
        diff = (x.narrow(dim, 1, n - 1) - x.narrow(dim, 0, n - 1)).abs()
        jumps.append(diff[border.expand_as(diff)])
    return torch.cat(jumps).mean().item()


def mean_fill(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each image's hole (``mask`` 1) filled with the mean colour of its kept pixels."""
    keep = 1 - mask
    mean = (images * keep).sum(dim=(2, 3), keepdim=True) / keep.sum()
    return images * keep + mean * mask


class Bench:
    """The checkpoint's model, its FID evaluator and the held-out images (where ``args`` names them), with timed,
    batched editing."""

    def __init__(self, args, *, extractor=None, load_path: str | None = None):
        flags = ["--device", args.device, *(["--cache_dir", args.cache_dir] if args.cache_dir else []),
                 *(["--data_class", args.data_class] if getattr(args, "data_class", None) else [])]
        self.model, self.parser, images = load_checkpoint(load_path or args.load_path, args.data_path, flags)
        self.config, self.record = self.model.config, self.model.run
        self.training_images, self.extractor, self.evaluator = images, extractor, None
        if getattr(args, "held_out", None):
            self.files = input_files(args.held_out, "held_out")
            diffusion = self.model.diffusion
            self.inputs = read_inputs(self.files, diffusion.image_size, diffusion.channels, "held_out")
            self.real = quantize_uint8(self.inputs)

    def sampler(self, spec: str | None = None, **settings) -> EMASampler:
        """The checkpoint's sampler with ``settings`` changed; ``spec`` (``NAME[:STEPS]``) names another sampler."""
        if spec is not None:
            chosen = parse_spec(spec)
            settings = {"sampler": chosen["sampler"], "sample_steps": chosen["steps"], **settings}
        return EMASampler(self.model.diffusion, checked(self.parser, self.config, **settings), device=self.model.device,
                          precision=self.model.precision, classes=self.model.classes)

    def timed(self, fn, count: int, seed: int = 0, per_image: int = 1) -> tuple[torch.Tensor, float]:
        """``fn(start, stop, generator)`` over ``count`` images in batches of the commands' size (``per_image``
        chains of each image), from the noise seed ``seed``; the uint8 results and the seconds per image."""
        generator = torch.Generator(self.model.device).manual_seed(seed)
        start = time.perf_counter()
        out = in_batches(lambda a, b: fn(a, b, generator).cpu(), count, per_image)
        return quantize_uint8(out), (time.perf_counter() - start) / count

    def fid(self, images: torch.Tensor) -> dict:
        """FID and KID of uint8 images against the training images (whose statistics are computed once, then
        cached, and never timed)."""
        if self.evaluator is None:
            self.evaluator = build_evaluator(self.config, self.model.device, self.training_images, self.record,
                                             required=True, extractor=self.extractor)
        fid, kid = self.evaluator.score(self.evaluator.extractor(images))
        return {"fid": fid, "kid": kid}

    def reference_rows(self) -> list[dict]:
        """The held-out images themselves, and as many plain samples."""
        sampler = self.sampler()
        drawn, seconds = self.timed(lambda a, b, g: sampler.sample(b - a, generator=g), len(self.inputs))
        return [{"method": "held-out images", **self.fid(self.real)},
                {"method": "plain sampling", **self.fid(drawn), "s_per_image": seconds}]


def report(row: dict) -> None:
    print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)


def inpaint(args, *, extractor=None) -> list[dict]:
    bench = Bench(args, extractor=extractor)
    rows = bench.reference_rows()
    for row in rows:
        report(row)
    inputs, size = bench.inputs, bench.inputs.shape[-1]
    for name in args.masks:
        mask = named_mask(name, size, generator=torch.Generator().manual_seed(0))
        hole = (mask > 0).float()
        originals_seam = seam_jump(bench.real, mask)

        def scored(method: str, images: torch.Tensor, seconds: float | None = None) -> dict:
            row = {"mask": name, "method": method, **bench.fid(images),
                   "hole_rmse": levels_rmse(images, bench.real, hole), "seam": seam_jump(images, mask),
                   "seam_of_originals": originals_seam}
            if seconds is not None:
                row["s_per_image"] = seconds
            report(row)
            return row

        rows.append(scored("mean fill", quantize_uint8(mean_fill(inputs, mask))))
        for method, sampler in inpainting_samplers(bench, args):
            edited, seconds = bench.timed(lambda a, b, g: sampler.edit(inputs[a:b], keep=1 - mask, generator=g),
                                          len(inputs), per_image=sampler.config.candidates)
            unchanged = torch.equal(edited * (1 - hole).to(torch.uint8), bench.real * (1 - hole).to(torch.uint8))
            assert unchanged, "kept pixels changed"
            rows.append(scored(method, edited, seconds))
    return rows


def inpainting_samplers(bench: Bench, args):
    """(row name, sampler) for each of ``args.samplers``, ``args.resample``, ``args.kept_guidance`` (a scale that
    does not apply, as on plain replacement, is the row without a pull) and ``args.candidates``."""
    for spec, u, pull, k in ((spec, u, pull, k) for spec in args.samplers for u in args.resample
                             for pull in sorted({p if pull_applies(p, u) else 0.0 for p in args.kept_guidance})
                             for k in args.candidates):
        sampler = bench.sampler(spec, resample=u, kept_guidance=pull, candidates=k)
        method = "replacement" if u == 1 else f"RePaint, {u} resamplings"
        pulled = f", pulled to the kept pixels at {pull:g}" if pull else ""
        chosen_of = f", the consensus of {k}" if k > 1 else ""
        yield f"{method}{pulled}{chosen_of} ({sampler.config.sampler_name})", sampler


def img2img(args, *, extractor=None) -> list[dict]:
    bench = Bench(args, extractor=extractor)
    rows = []
    sampler = bench.sampler()
    for s in args.strengths:
        edited, seconds = bench.timed(lambda a, b, g: sampler.edit(bench.inputs[a:b], strength=s, generator=g),
                                      len(bench.inputs))
        row = {"strength": s, **bench.fid(edited), "distance": levels_rmse(edited, bench.real), "s_per_image": seconds}
        report(row)
        rows.append(row)
    return rows


def translate(args, *, extractor=None) -> list[dict]:
    bench = Bench(args, extractor=extractor)
    classes = bench.model.classes
    if not classes:
        raise SystemExit(f"{args.load_path} is not class-conditional; translation needs a --class_conditional model")
    training = bench.training_images
    classifier, accuracy = train_classifier(training.images, training.labels, len(classes))
    found, source = class_labels(bench.files, Path(args.held_out))
    if found != classes:
        raise SystemExit(f"{args.held_out} holds the classes {found}, the checkpoint {classes}")
    inputs = bench.inputs
    target = (source + 1 + torch.arange(len(source)) % (len(classes) - 1)) % len(classes)
    held_accuracy = share_classified(classifier, inputs, source)
    print(f"classifier: {accuracy:.1%} of its own held-out tenth right, {held_accuracy:.1%} of the held-out images",
          flush=True)
    rows = []
    for s in args.strengths:
        for w in [None, *args.guidance]:
            sampler = bench.sampler(guidance=w or 0.0)
            edited, seconds = bench.timed(lambda a, b, g: sampler.edit(
                inputs[a:b], strength=s, classes=None if w is None else target[a:b], generator=g), len(inputs))
            x = edited.float() / 255
            row = {"strength": s, "guidance": "no class" if w is None else w,
                   "to_target": share_classified(classifier, x, target),
                   "kept_source": share_classified(classifier, x, source),
                   "distance": levels_rmse(edited, bench.real), "s_per_image": seconds}
            report(row)
            rows.append(row)
    return [{"classifier_accuracy": accuracy, "classifier_on_held_out": held_accuracy}, *rows]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    s = sub.add_parser("split", help="hold out every --every-th image of each folder")
    s.add_argument("--source", type=Path, required=True)
    s.add_argument("--train", type=Path, required=True)
    s.add_argument("--held_out", type=Path, required=True)
    s.add_argument("--every", type=int, default=17)
    for name, helps in (("inpaint", "each mask, filled by a mean fill, replacement and RePaint"),
                        ("img2img", "each strength: distance from the input and FID"),
                        ("translate", "each strength and guidance: the share turned into the target class")):
        p = sub.add_parser(name, help=helps)
        p.add_argument("--load_path", required=True)
        p.add_argument("--data_path", required=True, help="the images the model was trained on")
        p.add_argument("--held_out", required=True, help="images kept out of training (class folders: translate)")
        p.add_argument("--cache_dir", default=None)
        p.add_argument("--device", default="auto")
        p.add_argument("--json", type=Path, default=None, help="also write the rows here")
        if name == "inpaint":
            p.add_argument("--masks", nargs="+", default=["centre"])
            p.add_argument("--resample", type=int, nargs="+", default=[1, 2, 5])
            p.add_argument("--kept_guidance", type=float, nargs="+", default=[0.0, KEPT_GUIDANCE],
                           help="each --kept_guidance the inpainting rows run (0: replacement and RePaint alone)")
            p.add_argument("--samplers", nargs="+", default=["ancestral:10"],
                           help="NAME[:STEPS] of each sampler the inpainting rows run (bench_samplers' rows)")
            p.add_argument("--candidates", type=int, nargs="+", default=[1],
                           help="each --candidates the inpainting rows run (fills drawn per image, the consensus kept)")
        else:
            p.add_argument("--strengths", type=float, nargs="+",
                           default=[0.0, 0.25, 0.5, 0.75, 1.0] if name == "img2img" else [0.5, 0.75])
        if name == "translate":
            p.add_argument("--guidance", type=float, nargs="+", default=[0.0, 1.0, 3.0])
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.part == "split":
        train, held = split(args.source, args.train, args.held_out, args.every)
        print(f"{train} images linked into {args.train}, {held} into {args.held_out}")
        return 0
    rows = {"inpaint": inpaint, "img2img": img2img, "translate": translate}[args.part](args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
