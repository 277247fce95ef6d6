"""The benchmark: training, sampling and FID throughput and peak memory, each against a baseline in the same run.

    python bench/bench.py --quick                 # a smoke run: a few minutes on a 2-core CPU
    python bench/bench.py --large --json bench/out/bench.json   # the full run (GPU: minutes; CPU: long)

Sections (``--sections``, all by default):

- ``train``: images/s and steps/s of the package's training step (``Trainer.train_step``) with ``main.py``'s
  default flags (the shipped defaults: two batches of 32 per step, a self-conditioned U-Net, weight decay,
  mixed precision as chosen per device), fed by the package's data pipeline and by synthetic batches already
  on the device (the pipeline excluded): one pass per step against separate passes per batch, the baseline
  (one batch per step, no self-conditioning), and on a GPU eager steps against CUDA graphs in bf16 and fp16.
  The baseline of the table is the reference solutions' step on the data: two batches of 32 per step as the
  handout trainer takes them, each JPEG decoded at every step in a 16-worker DataLoader, fp32, cuDNN
  autotuning off, ``loss.item()`` every step. With ``--large`` the data rows again on 512 x 512 JPEGs made
  from the data (the size of AFHQ's files).
- ``sample``: images/s of the full 50-step DDPM chain and of DDIM with 10, 25 and 50 steps, at a few batch
  sizes; the baseline is the DDPM chain at the smallest batch size.
- ``fid``: one periodic FID evaluation against the reference way, through ``bench/bench_fid.py`` with the
  DDPM sampling rate measured in the ``sample`` section (needs clean-fid's Inception weights: on machines without
  internet copy them to where ``evaluation.fid.weights_location("clean")`` says first).

Every measurement runs in a fresh process, so that its peak memory is its own (resident set size on the
CPU, ``torch.cuda.max_memory_allocated`` on a GPU) and nothing from one row slows the next.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RECOMMENDED = {"image_size": 32, "batch_size": 32, "time_steps": 50, "unet_dim": 16, "learning_rate": 1e-3}
BASELINE = ["--grad_accum", "1", "--self_condition", "False", "--weight_decay", "0"]  # plain Algorithm 1
# (pipeline, label, main.py flags on top of the defaults) of each training row
TRAIN_ROWS = [
    ("reference", "the reference way", ["--self_condition", "False"]),
    ("package", "shipped defaults", []),
    ("synthetic", "shipped defaults", []),
    ("synthetic", "shipped defaults, one pass", ["--one_pass", "True"]),
    ("synthetic", "shipped defaults, separate passes", ["--one_pass", "False"]),
    ("synthetic", "baseline", BASELINE),
]
GPU_TRAIN_ROWS = [
    ("package", "shipped defaults, CUDA graph", ["--cuda_graph", "True"]),
    ("synthetic", "shipped defaults, CUDA graph, one pass", ["--cuda_graph", "True", "--one_pass", "True"]),
    ("synthetic", "shipped defaults, CUDA graph, separate passes", ["--cuda_graph", "True", "--one_pass", "False"]),
    ("synthetic", "shipped defaults, CUDA graph, fp16", ["--cuda_graph", "True", "--precision", "fp16"]),
    ("synthetic", "baseline, CUDA graph", [*BASELINE, "--cuda_graph", "True"]),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_path", default="./data/train", help="folder holding <data_class>/")
    p.add_argument("--data_class", default="cat", help="class folder to read")
    p.add_argument("--sections", nargs="+", default=["train", "sample", "fid"], choices=["train", "sample", "fid"])
    p.add_argument("--large", action="store_true", help="also train from 512 x 512 JPEGs made from the data")
    p.add_argument("--quick", action="store_true", help="few steps, one batch size, FID on 200 images (a smoke run)")
    p.add_argument("--steps", type=int, default=100, help="training steps timed per row (after 10 untimed)")
    p.add_argument("--workers", type=int, default=16, help="DataLoader workers of the reference pipeline")
    p.add_argument("--sample_batches", type=int, nargs="+", default=[16, 64, 256], help="sampling batch sizes")
    p.add_argument("--fid_samples", type=int, default=1000, help="samples of the FID evaluation")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # internal: measure one row, print its JSON
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------------
# One row, in its own process


def _device(name: str):
    sys.path.insert(0, str(ROOT))
    from runtime.distributed import pick_device

    return pick_device(name)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _peak_memory_mib(device) -> dict:
    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest DataLoader worker
    out = {"peak_rss_mib": rss, "peak_worker_rss_mib": children or None}
    if device.type == "cuda":
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def main_flags(spec: dict):
    """``main.py``'s settings for a row: its defaults at the recommended size, with the row's own ``flags`` on top."""
    from settings.cli import parse

    recommended = [f"--{k}={v}" for k, v in RECOMMENDED.items()]
    return parse([*recommended, "--device", spec["device"], *spec.get("flags", [])])[0]


def _diffusion(spec: dict):
    import torch

    from sampling.model import build_diffusion

    torch.manual_seed(0)
    return build_diffusion(main_flags(spec))


class _Counted:
    """The batches a row draws, counting their images (a batch is a ``imagedata.batches.Batch`` or an images tensor)."""

    def __init__(self, batches):
        self.batches, self.images = iter(batches), 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.batches)
        self.images += len(batch[0] if isinstance(batch, tuple) else batch)
        return batch


def measure_training(spec: dict) -> dict:
    import itertools

    import torch

    from trainer import Trainer

    device = _device(spec["device"])
    args = main_flags(spec)
    diffusion, size, batch_size = _diffusion(spec), args.image_size, args.batch_size
    if spec["pipeline"] == "reference":
        from reference_way import ReferenceStep, reference_loader

        batches = _Counted(reference_loader(Path(spec["data"]), size, batch_size, spec["workers"], device))
        step = ReferenceStep(diffusion, batches, learning_rate=args.learning_rate, device=device,
                             grad_accum=args.grad_accum)
        precision = "fp32"
    else:
        from imagedata.batches import Batch, DeviceBatches

        if spec["pipeline"] == "package":
            from imagedata import dataset

            images = dataset.load_images(spec["data"], "cat", size, cache_dir=spec["cache_dir"], progress=False,
                                         channels=args.channels).images
            batches = _Counted(DeviceBatches(images, batch_size, device=device))
        else:  # synthetic: one batch already on the device, served again and again
            shape = (batch_size, args.channels, size, size)
            batches = _Counted(itertools.repeat(Batch(torch.rand(shape, device=device) * 2 - 1)))
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(diffusion, batches, config=args.replace(save_folder=tmp), device=device)
        step, precision = trainer.train_step, trainer.precision
    for _ in range(spec["warmup"]):
        step()
    _sync(device)
    drawn, start = batches.images, time.perf_counter()
    for _ in range(spec["steps"]):
        step()
    _sync(device)
    seconds = time.perf_counter() - start
    images = batches.images - drawn  # what the timed steps trained on
    parameters = sum(p.numel() for p in diffusion.model.parameters())
    del step, batches  # stops DataLoader workers, so that their peak memory is counted
    return {"precision": precision, "seconds": seconds, "steps_per_s": spec["steps"] / seconds, "images": images,
            "images_per_s": images / seconds, "parameters": parameters, **_peak_memory_mib(device)}


def measure_sampling(spec: dict) -> dict:
    import torch

    from runtime.precision import autocast, choose_precision

    device = _device(spec["device"])
    diffusion = _diffusion(spec).to(device).eval()
    generator = torch.Generator(device).manual_seed(0)
    precision = choose_precision("auto", device)  # as the trainer samples its grids and FID images
    step, warmup_batch = None, min(spec["batch"], 4)
    if spec.get("graph"):  # the reverse step replayed from a CUDA graph, as --cuda_graph samples
        from sampling.captured_step import ChainStep

        shape = (spec["batch"], diffusion.channels, diffusion.image_size, diffusion.image_size)
        step, warmup_batch = ChainStep(diffusion, shape, sampler=spec["sampler"]), spec["batch"]  # warm-up captures

    def warmup():
        diffusion.sample(warmup_batch, sampler=spec["sampler"], steps=spec["steps"], generator=generator, step=step)

    def timed():
        return diffusion.sample(spec["batch"], sampler=spec["sampler"], steps=spec["steps"], generator=generator,
                                step=step)
    with torch.inference_mode(), autocast(device, precision):
        warmup()
        _sync(device)
        start = time.perf_counter()
        images = len(timed())
        _sync(device)
        seconds = time.perf_counter() - start
    return {"precision": precision, "seconds": seconds, "images": images, "images_per_s": images / seconds,
            **_peak_memory_mib(device)}


def run_row(spec: dict) -> dict:
    sys.path[:0] = [str(ROOT), str(HERE)]
    return measure_training(spec) if spec["kind"] == "train" else measure_sampling(spec)


def in_subprocess(spec: dict) -> dict:
    result = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--row", json.dumps(spec)],
                            capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"row {spec} failed:\n{result.stderr[-3000:]}")
    return {**spec, **json.loads(result.stdout.strip().splitlines()[-1])}


# ------------------------------------------------------------------------------------------------------
# The sections


def train_section(args, device: str, tmp: Path, log) -> list[dict]:
    sys.path[:0] = [str(ROOT), str(HERE)]
    from bench_data import make_copy
    from imagedata import dataset
    from imagedata.files import find_images

    files = find_images(Path(args.data_path), args.data_class)
    if args.quick:
        files = files[:512]
    sets = [(Path(args.data_path).resolve().parent.name, make_copy(files, tmp / "small", size=None))]
    if args.large:
        sets.append(("512px jpeg", make_copy(files, tmp / "large", size=512)))
    steps, warmup = (10, 3) if args.quick else (args.steps, 10)
    rows = []
    for name, folder in sets:
        cache_dir = tmp / f"cache-{name}"
        dataset.load_images(folder, "cat", RECOMMENDED["image_size"], cache_dir=cache_dir, progress=False)  # untimed
        runs = TRAIN_ROWS + (GPU_TRAIN_ROWS if device.startswith("cuda") else [])
        for pipeline, label, flags in runs:
            if pipeline == "synthetic" and name != sets[0][0]:
                continue  # the same with any data
            spec = {"kind": "train", "pipeline": pipeline, "label": label, "flags": flags,
                    "dataset": name if pipeline != "synthetic" else "-", "data": str(folder),
                    "cache_dir": str(cache_dir), "steps": steps, "warmup": warmup, "workers": args.workers,
                    "device": device}
            row = in_subprocess(spec)
            rows.append(row)
            log(f"train  {row['dataset']:<11} {pipeline + ', ' + label:<44} {row['images_per_s']:9.1f} "
                f"img/s  {row['steps_per_s']:7.2f} steps/s  RSS {row['peak_rss_mib']:.0f} MiB")
    return rows


def sample_section(args, device: str, log) -> list[dict]:
    batches = args.sample_batches[:1] if args.quick else args.sample_batches
    rows = []
    runs = [(sampler, steps, False) for sampler, steps in (("ddpm", None), ("ddim", 10), ("ddim", 25), ("ddim", 50))]
    if device.startswith("cuda"):
        runs += [("ddpm", None, True), ("ddim", 10, True)]
    for batch in batches:
        for sampler, steps, graph in runs:
            spec = {"kind": "sample", "sampler": sampler, "steps": steps, "batch": batch, "device": device,
                    "graph": graph}
            row = in_subprocess(spec)
            rows.append(row)
            log(f"sample {sampler} {steps or RECOMMENDED['time_steps']:>3} steps, batch {batch:>4}"
                f"{', CUDA graph' if graph else ''}: {row['images_per_s']:8.1f} img/s")
    return rows


def fid_section(args, device: str, ddpm_rate: float | None, tmp: Path, log) -> dict | None:
    out = tmp / "fid.json"
    command = [sys.executable, str(HERE / "bench_fid.py"), "--data_path", args.data_path, "--data_class",
               args.data_class, "--image_size", str(RECOMMENDED["image_size"]), "--samples", str(args.fid_samples),
               "--device", device, "--json", str(out)]
    if args.quick:
        command.append("--quick")
    if ddpm_rate:
        command += ["--sample_images_per_s", str(ddpm_rate)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        log(f"fid    skipped: {(result.stderr.strip().splitlines() or ['bench_fid.py failed'])[-1]}")
        return None
    fid = json.loads(out.read_text())
    for row in fid["rows"]:
        log(f"fid    N={row['samples']}: reference way {row['reference_way_s']:.1f} s, package {row['ours_s']:.1f} s "
            f"(sampling {row['sampling_s_added']:.1f} s in each)")
    return fid


def print_table(results: dict) -> None:
    print(f"\n{results['device']}, {results['cores']} cores, torch {results['torch']}, {results['date']}")
    train = results.get("train") or []
    if train:
        base = {r["dataset"]: r["steps_per_s"] for r in train if r["pipeline"] == "reference"}
        print(f"\n{'training (64 images per step unless baseline)':<60} {'img/s':>9} {'steps/s':>8} "
              f"{'x reference steps/s':>20} {'peak MiB':>9}")
        for r in train:
            ref = base.get(r["dataset"], next(iter(base.values())))
            memory = r.get("peak_gpu_mib") or r["peak_rss_mib"]
            name = f"{r['dataset']}, {r['pipeline']}, {r['label']}"
            print(f"{name:<60} {r['images_per_s']:>9.1f} {r['steps_per_s']:>8.2f} "
                  f"{r['steps_per_s'] / ref:>19.2f}x {memory:>9.0f}")
    sample = results.get("sample") or []
    if sample:
        base = sample[0]["images_per_s"]
        print(f"\n{'sampling':<34} {'img/s':>9} {'x DDPM, batch ' + str(sample[0]['batch']):>22} {'peak MiB':>9}")
        for r in sample:
            name = (f"{r['sampler']} {r['steps'] or RECOMMENDED['time_steps']} steps, batch {r['batch']}"
                    + (", CUDA graph" if r.get("graph") else ""))
            memory = r.get("peak_gpu_mib") or r["peak_rss_mib"]
            print(f"{name:<34} {r['images_per_s']:>9.1f} {r['images_per_s'] / base:>21.2f}x {memory:>9.0f}")
    fid = results.get("fid")
    if fid:
        print(f"\n{'FID evaluation':<34} {'reference way s':>16} {'package s':>10} {'x faster':>9}")
        for r in fid["rows"]:
            print(f"{'N = ' + str(r['samples']) + ' (sampling included)':<34} {r['reference_way_s']:>16.1f} "
                  f"{r['ours_s']:>10.1f} {r['reference_way_s'] / r['ours_s']:>8.1f}x")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.row is not None:
        print(json.dumps(run_row(json.loads(args.row))))
        return 0
    if not (Path(args.data_path) / args.data_class).is_dir():
        print(f"error: {Path(args.data_path) / args.data_class} does not exist; pass --data_path to the folder "
              f"that holds {args.data_class}/", file=sys.stderr)
        return 2
    import torch

    sys.path.insert(0, str(ROOT))
    device = str(_device(args.device))
    results = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else device,
               "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__, "python": platform.python_version(),
               "platform": platform.platform(), "date": time.strftime("%Y-%m-%d"), "quick": args.quick,
               "recommended_flags": RECOMMENDED}
    log = lambda line: print(line, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        if "train" in args.sections:
            results["train"] = train_section(args, device, Path(tmp), log)
        if "sample" in args.sections:
            results["sample"] = sample_section(args, device, log)
        if "fid" in args.sections:
            largest = [r for r in results.get("sample", []) if r["sampler"] == "ddpm"]
            rate = max(largest, key=lambda r: r["batch"])["images_per_s"] if largest else None
            results["fid"] = fid_section(args, device, rate, Path(tmp), log)
    print_table(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
