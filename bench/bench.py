"""The benchmark: training, sampling and FID throughput and peak memory, each against a baseline in the same run.

    python bench/bench.py --quick                 # a smoke run: a few minutes on a 2-core CPU
    python bench/bench.py --large --json bench/out/bench.json   # the full run (GPU: minutes; CPU: long)

Sections (``--sections``, all by default):

- ``train``: images/s and steps/s of the package's training step (``Trainer.train_step``: EMA, clipping,
  mixed precision as chosen per device) at the assignment's recommended flags (32 px, batch 32, T = 50,
  ``unet_dim`` 16, learning rate 1e-3), fed by the package's data pipeline, and fed by one synthetic batch
  already on the device (the pipeline excluded; then again with ``--self_condition``, whose share of the
  plain synthetic row prices its extra pass), against the reference solutions' step (per-sample JPEG
  decoding in a 16-worker DataLoader, fp32, cuDNN autotuning off, ``loss.item()`` every step) on the same
  network. With ``--large`` the same again on 512 x 512 JPEGs made from the data (the size of AFHQ's files).
- ``sample``: images/s of the full 50-step DDPM chain and of DDIM with 10, 25 and 50 steps, at a few batch
  sizes; the baseline is the DDPM chain at the smallest batch size.
- ``fid``: one periodic FID evaluation against the reference way, through ``bench/bench_fid.py`` with the
  DDPM sampling rate measured in the ``sample`` section (needs the Inception weights: on machines without
  internet run ``python ../shared/tools/offline_inception.py`` first).

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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_path", default="../shared/afhq128/train", help="folder holding <data_class>/")
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
    from distributed import pick_device

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


def _diffusion(spec: dict):
    import torch

    from diffusion import Diffusion
    from unet import Unet

    torch.manual_seed(0)
    net = Unet(spec["unet_dim"], image_size=spec["image_size"], self_condition=spec.get("self_condition", False))
    return Diffusion(net, image_size=spec["image_size"], timesteps=spec["time_steps"])


def measure_training(spec: dict) -> dict:
    import itertools

    import torch

    from trainer import TrainConfig, Trainer

    device = _device(spec["device"])
    diffusion, size, batch_size = _diffusion(spec), spec["image_size"], spec["batch_size"]
    if spec["pipeline"] == "reference":
        from reference_way import ReferenceStep, reference_loader

        batches = reference_loader(Path(spec["data"]), size, batch_size, spec["workers"], device)
        step = ReferenceStep(diffusion, batches, learning_rate=spec["learning_rate"], device=device)
        precision = "fp32"
    else:
        if spec["pipeline"] == "package":
            import dataset
            from batches import DeviceBatches

            images = dataset.load_images(spec["data"], "cat", size, cache_dir=spec["cache_dir"], progress=False).images
            batches = DeviceBatches(images, batch_size, device=device)
        else:  # synthetic: one batch already on the device, served again and again
            batches = itertools.repeat(torch.rand(batch_size, 3, size, size, device=device) * 2 - 1)
        with tempfile.TemporaryDirectory() as tmp:
            config = TrainConfig(learning_rate=spec["learning_rate"], cuda_graph=spec.get("cuda_graph", False))
            trainer = Trainer(diffusion, batches, config=config, device=device, save_folder=tmp)
        step, precision = trainer.train_step, trainer.precision
    for _ in range(spec["warmup"]):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(spec["steps"]):
        step()
    _sync(device)
    seconds = time.perf_counter() - start
    parameters = sum(p.numel() for p in diffusion.model.parameters())
    del step, batches  # stops DataLoader workers, so that their peak memory is counted
    return {"precision": precision, "seconds": seconds, "steps_per_s": spec["steps"] / seconds,
            "images_per_s": spec["steps"] * batch_size / seconds, "parameters": parameters, **_peak_memory_mib(device)}


def measure_sampling(spec: dict) -> dict:
    import torch

    from trainer import AUTOCAST_DTYPES, choose_precision

    device = _device(spec["device"])
    diffusion = _diffusion(spec).to(device).eval()
    generator = torch.Generator(device).manual_seed(0)
    precision = choose_precision("auto", device)  # as the trainer samples its grids and FID images
    dtype = AUTOCAST_DTYPES.get(precision)
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        diffusion.sample(min(spec["batch"], 4), sampler=spec["sampler"], steps=spec["steps"], generator=generator)
        _sync(device)
        start = time.perf_counter()
        diffusion.sample(spec["batch"], sampler=spec["sampler"], steps=spec["steps"], generator=generator)
        _sync(device)
        seconds = time.perf_counter() - start
    return {"precision": precision, "seconds": seconds, "images_per_s": spec["batch"] / seconds,
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
    import dataset
    from bench_data import make_copy
    from images import find_images

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
        graphs = (False, True) if device.startswith("cuda") else (False,)  # --cuda_graph rows on a GPU
        # the synthetic batch also with --self_condition, whose extra first pass the share column then prices
        runs = [("reference", False, False)] + [(p, g, False) for g in graphs for p in ("package", "synthetic")]
        for pipeline, graph, self_cond in runs + [("synthetic", False, True)]:
            if pipeline == "synthetic" and name != sets[0][0]:
                continue  # the same with any data
            spec = {"kind": "train", "pipeline": pipeline, "dataset": name if pipeline != "synthetic" else "-",
                    "data": str(folder), "cache_dir": str(cache_dir), "steps": steps, "warmup": warmup,
                    "workers": args.workers, "device": device, "cuda_graph": graph, "self_condition": self_cond,
                    **RECOMMENDED}
            row = in_subprocess(spec)
            rows.append(row)
            label = pipeline + (" +graph" if graph else "") + (" +selfcond" if self_cond else "")
            log(f"train  {row['dataset']:<11} {label:<17} {row['images_per_s']:9.1f} "
                f"img/s  {row['steps_per_s']:7.2f} steps/s  RSS {row['peak_rss_mib']:.0f} MiB")
    return rows


def sample_section(args, device: str, log) -> list[dict]:
    batches = args.sample_batches[:1] if args.quick else args.sample_batches
    rows = []
    for batch in batches:
        for sampler, steps in (("ddpm", None), ("ddim", 10), ("ddim", 25), ("ddim", 50)):
            spec = {"kind": "sample", "sampler": sampler, "steps": steps, "batch": batch, "device": device,
                    **RECOMMENDED}
            row = in_subprocess(spec)
            rows.append(row)
            log(f"sample {sampler} {steps or RECOMMENDED['time_steps']:>3} steps, batch {batch:>4}: "
                f"{row['images_per_s']:8.1f} img/s")
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
        base = {r["dataset"]: r["images_per_s"] for r in train if r["pipeline"] == "reference"}
        synthetic = {r.get("cuda_graph", False): r["images_per_s"] for r in train
                     if r["pipeline"] == "synthetic" and not r.get("self_condition")}
        print(f"\n{'training':<34} {'img/s':>9} {'steps/s':>8} {'x baseline':>11} {'of synthetic':>13} {'peak MiB':>9}")
        for r in train:
            ref = base.get(r["dataset"], next(iter(base.values())))
            memory = r.get("peak_gpu_mib") or r["peak_rss_mib"]
            same = synthetic.get(r.get("cuda_graph", False))
            share = f"{r['images_per_s'] / same:12.0%}" if same and r["pipeline"] != "reference" else "-"
            name = (r["dataset"] + ", " + r["pipeline"] + (" + CUDA graph" if r.get("cuda_graph") else "")
                    + (" + self-cond." if r.get("self_condition") else ""))
            print(f"{name:<34} {r['images_per_s']:>9.1f} {r['steps_per_s']:>8.2f} "
                  f"{r['images_per_s'] / ref:>10.2f}x {share:>13} {memory:>9.0f}")
    sample = results.get("sample") or []
    if sample:
        base = sample[0]["images_per_s"]
        print(f"\n{'sampling':<34} {'img/s':>9} {'x DDPM, batch ' + str(sample[0]['batch']):>22} {'peak MiB':>9}")
        for r in sample:
            name = f"{r['sampler']} {r['steps'] or RECOMMENDED['time_steps']} steps, batch {r['batch']}"
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
