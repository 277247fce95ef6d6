"""FID of trained checkpoints under three protocols: the package's, and the two the reference solutions use.

One set of samples per checkpoint (EMA weights, full DDPM chain, quantized as a PNG holds them) is scored
against three sets of real images, all through clean-fid's Inception (mode ``clean``):

- ``package``: the training images at the training size, as the trainer decodes them (README, docs/fid.md);
- ``handout``: what the assignment's handout trainer builds when its validation folder is empty: each
  training file opened with PIL, ``resize((S, S))`` with PIL's default filter, and saved under its own name
  (so a ``.jpg`` is written again as a JPEG at PIL's default quality), then scored with
  ``cleanfid.fid.compute_fid(sample_folder, that_folder)``; here the files are encoded and decoded in memory;
- ``stored``: the training files at the size they are stored at (``compute_fid`` pointed at the data folder
  itself). A perfect S-pixel model cannot reach 0 that way, since the real side keeps detail that S pixels
  cannot hold.

    python bench/fid_protocols.py --data_path ../shared/afhq128/train --samples 512 1000 \\
        --load_path results/model.pt --json bench/out/fid_protocols.json

``--protocols`` names a subset (``--protocols handout``: the reference solutions' set alone; the package's set
is still read, to draw the samples, but not scored). Needs clean-fid's Inception weights (offline: ``python ../shared/tools/offline_inception.py``). The real
images' statistics are cached in ``--cache_dir`` like the trainer's, so only the first run computes them.
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dataset  # noqa: E402
import fid as fid_module  # noqa: E402
import main as main_module  # noqa: E402
from checkpoint import load_checkpoint, load_state_strict, saved_flags  # noqa: E402
from cli import build_parser  # noqa: E402
from errors import UserError  # noqa: E402
from images import UnreadableImage, decode_image  # noqa: E402

PROTOCOLS = ("package", "handout", "stored")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--load_path", nargs="+", required=True, help="checkpoints (model.pt) to score")
    p.add_argument("--data_path", default="../shared/afhq128/train", help="folder holding <data_class>/")
    p.add_argument("--data_class", default="cat", help="class folder to read")
    p.add_argument("--samples", type=int, nargs="+", default=[512, 1000],
                   help="sample counts N; each checkpoint draws max(N) images and N counts the first N of them")
    p.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS),
                   help="real sets to score against (each one not yet cached costs a pass of Inception over "
                        "every training image)")
    p.add_argument("--batch_size", type=int, default=250, help="images per sampling batch")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="autocast dtype while sampling")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    p.add_argument("--cache_dir", default=None, help="decoded-image cache and FID statistics (default: beside the data)")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    if min(args.samples) < 2 or args.batch_size < 1:
        p.error("--samples must be at least 2 and --batch_size positive")
    return args


def native_size(data_path: str, data_class: str) -> int:
    """Side of the stored training images; they must all be square and of one size."""
    from PIL import Image

    files = dataset.find_images(Path(data_path), data_class)
    sizes = set()
    for path in files:
        try:
            with Image.open(path) as im:
                sizes.add(im.size)
        except OSError as e:
            raise UserError(f"{path} cannot be read ({e}); remove it or pass another --data_path") from None
    if len(sizes) != 1 or len({*next(iter(sizes))}) != 1:
        raise UserError(f"the images under {data_path}/{data_class} come in sizes {sorted(sizes)[:4]}; "
                        f"this comparison needs one square size")
    return next(iter(sizes))[0]


def _evaluator(args, real_batches, key: str, image_size: int, cache_dir: Path, extractor) -> fid_module.FIDEvaluator:
    """An evaluator holding the statistics of the uint8 [B, 3, S, S] batches ``real_batches()`` yields, cached
    under ``key``; it draws samples ``args.batch_size`` at a time."""
    evaluator = fid_module.FIDEvaluator(real_key=key, image_size=image_size, cache_dir=cache_dir, extractor=extractor,
                                        real_batches=real_batches, batch_size=args.batch_size)
    evaluator.reference()
    return evaluator


def _in_chunks(images: torch.Tensor):
    return lambda: (images[i:i + 500] for i in range(0, len(images), 500))


def package_reference(args, image_size: int, extractor) -> fid_module.FIDEvaluator:
    """The training images at ``image_size`` as the trainer decodes them (its cache and statistics reused)."""
    images = dataset.load_images(args.data_path, args.data_class, image_size, cache_dir=args.cache_dir)
    cache_dir = images.cache_path.parent if images.cache_path is not None else Path(args.cache_dir or ".")
    return _evaluator(args, _in_chunks(images.images), images.pixels_key, image_size, cache_dir, extractor)


def stored_reference(args, native: int, cache_dir: Path, extractor) -> fid_module.FIDEvaluator:
    """The training files at their stored size, decoded 500 at a time (512-pixel AFHQ would take 4 GB at once);
    the statistics are keyed by the files' names, sizes and times."""
    files = dataset.find_images(Path(args.data_path), args.data_class)
    key = "stored-" + dataset.cache_key(files, native, root=Path(args.data_path))

    def batches():
        for first in range(0, len(files), 500):
            arrays = []
            for path in files[first:first + 500]:
                try:
                    arrays.append(decode_image(path, native)[0])
                except UnreadableImage as e:
                    raise UserError(f"{path} cannot be read ({e}); remove it or pass another --data_path") from None
            yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    return _evaluator(args, batches, key, native, cache_dir, extractor)


def handout_images(args, image_size: int) -> torch.Tensor:
    """Each training file resized by PIL's default filter and re-encoded in its own format, then decoded."""
    from PIL import Image

    arrays = []
    for path in dataset.find_images(Path(args.data_path), args.data_class):
        with Image.open(path) as im:
            small = im.resize((image_size, image_size))
            buffer = io.BytesIO()
            small.save(buffer, format=im.format or "PNG")
        with Image.open(io.BytesIO(buffer.getvalue())) as im:
            arrays.append(np.asarray(im.convert("RGB")))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def checkpoint_args(ckpt: dict) -> argparse.Namespace:
    """main.py's flags as the checkpoint's run set them (its recorded flags and architecture over the defaults;
    where it predates a flag, the value that flag's absence meant, not today's default)."""
    args = build_parser().parse_args([])
    for key, value in {**ckpt.get("config", {}), **saved_flags(ckpt, training=True)}.items():
        if hasattr(args, key) and value is not None:
            setattr(args, key, value)
    return args


def load_model(path: str):
    """The checkpoint's EMA network inside a Diffusion built from its own recorded flags, its step, its image size
    and its trainer settings."""
    ckpt = load_checkpoint(path, map_location="cpu")
    args = checkpoint_args(ckpt)
    diffusion = main_module.build_diffusion(args)
    load_state_strict(diffusion.model, ckpt.get("ema", ckpt["model"]), "EMA model", path)
    return diffusion.eval(), int(ckpt["step"]), args.image_size, ckpt.get("config", {}).get("trainer", {})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    extractor = fid_module.FeatureExtractor(mode="clean")
    native = native_size(args.data_path, args.data_class) if "stored" in args.protocols else None
    cache_dir = dataset.resolve_cache_dir(args.data_path, args.cache_dir) or Path(".")
    references: dict[int, dict[str, fid_module.FIDEvaluator]] = {}
    dtype = {"fp32": None, "bf16": torch.bfloat16}[args.precision]
    rows = []
    for path in args.load_path:
        diffusion, step, size, _ = load_model(path)
        if size not in references:
            references[size] = {"package": package_reference(args, size, extractor)}  # it also draws the samples
            if "handout" in args.protocols:
                handout = handout_images(args, size)
                references[size]["handout"] = _evaluator(args, _in_chunks(handout), "handout-" + dataset.pixels_key(
                    handout.numpy()), size, cache_dir, extractor)
            if "stored" in args.protocols:
                references[size]["stored"] = stored_reference(args, native, cache_dir, extractor)
        generator, start = torch.Generator().manual_seed(args.seed), time.perf_counter()

        def sample(n: int) -> torch.Tensor:
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                return diffusion.sample(n, generator=generator).float()

        gen = references[size]["package"].sample_features(sample, max(args.samples))
        for n in args.samples:
            row = {"checkpoint": str(path), "step": step, "samples": n, "precision": args.precision,
                   "training_size": size, "stored_size": native}
            for name in args.protocols:
                row[f"fid_{name}"], row[f"kid_{name}"] = references[size][name].score(gen[:n])
            rows.append(row)
            print(f"{path} step {step} N={n}: FID (KID) " + ", ".join(
                f"{name} {row[f'fid_{name}']:.2f} ({row[f'kid_{name}']:.4f})" for name in args.protocols), flush=True)
        print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    write_rows(args.json, rows)
    return 0


def write_rows(path: str | None, rows: list[dict], **extra) -> None:
    """Write the rows, the machine and the torch version as JSON to ``path`` (nothing when it is None)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({**extra, "machine": platform.processor() or platform.machine(),
                                          "torch": torch.__version__, "rows": rows}, indent=1))


def run_script(main_fn) -> None:
    """Exit with ``main_fn()``'s code, or print a UserError on one line and exit 2."""
    try:
        sys.exit(main_fn())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run_script(main)
