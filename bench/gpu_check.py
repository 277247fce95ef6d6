"""Everything a GPU should be checked for, in one command: the CUDA-only tests, the training and sampling rows
of ``bench/bench.py`` (eager against CUDA graphs, fp16 against bf16, one pass against a pass per batch), and
the assignment's two report commands at the defaults with and without ``--cuda_graph True``, each with the
time summary it prints. Ends with a markdown table and, with ``--json``, the figures as JSON.

    python bench/gpu_check.py --data_path ./data/train --json bench/out/gpu_check.json
    python bench/gpu_check.py --data_path ./data/train --scale 0.1   # about 8 minutes on a lent GPU
    python bench/gpu_check.py --data_path ./data/train --parts networks --json bench/out/networks.json

The ``networks`` part (not run unless named) chooses a size's network by measurement, as docs/quality.md
chose the 64-px one: each ``--networks`` candidate trains ``--network_steps`` steps at ``--network_size`` with
the shipped defaults and FID at the end (1,000 samples), and the table gives its steps/s and FID.

``--scale`` multiplies the report commands' steps (10,000, and 1,000 with FID every 100) and the benchmark's
timed steps, and samples at one batch size. On a machine without CUDA it runs what a CPU can (the benchmark's
CPU rows as a smoke run, and the commands without graphs) and says what it skipped. FID needs clean-fid's Inception
weights; without them the FID run trains on and says so.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from settings.config import SIZE_NETWORKS  # noqa: E402

CUDA_TESTS = ["tests/test_train_step.py", "tests/test_cuda_graph.py"]


def network_spec(dim_mults, attention_levels) -> str:
    """A network as ``--networks`` takes it: 'DIM_MULTS:ATTENTION_LEVELS'."""
    return f"{' '.join(map(str, dim_mults))}:{' '.join(map(str, attention_levels))}"


# The 128-px candidates: the network 128 px has now (the 64-px network's pattern), the one it replaced (16 x 16
# and 8 x 8 levels half as wide, attention at 8 x 8 and 4 x 4), and the 32-px network at 128 px.
NETWORKS = [network_spec(*SIZE_NETWORKS[128]), "1 1 2 2 4 8:4 5", network_spec(*SIZE_NETWORKS[32])]
SUMMARY = re.compile(r"trained: (\d+) steps in ([\d.]+) s: training ([\d.]+) s, checkpoints and sample grids "
                     r"([\d.]+) s, FID ([\d.]+) s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_path", default="./data/train", help="folder holding cat/")
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the full run's steps (0.1: about 8 "
                   "minutes on a GPU)")
    p.add_argument("--parts", nargs="+", default=["tests", "bench", "commands"],
                   choices=["tests", "bench", "commands", "networks"])
    p.add_argument("--networks", nargs="+", default=NETWORKS, metavar="MULTS:LEVELS",
                   help="each candidate of the networks part: its --dim_mults and --attention_levels, e.g. '1 2 4 8:3'")
    p.add_argument("--network_size", type=int, default=128, help="the networks part's --image_size")
    p.add_argument("--network_steps", type=int, default=1000, help="the networks part's training steps")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    for spec in args.networks:
        mults, _, levels = spec.partition(":")
        numbers = (mults + " " + levels).split()
        if not (mults.split() and levels.split() and all(n.isdigit() for n in numbers)):
            p.error(f"--networks takes 'DIM_MULTS:ATTENTION_LEVELS' with whole numbers, e.g. '1 2 4 8:3'; got {spec!r}")
    return args


def time_summary(output: str) -> dict | None:
    """The figures of the trainer's last ``trained: ...`` line, or None when there is none."""
    found = SUMMARY.findall(output)
    if not found:
        return None
    steps, total, training, periodic, fid = found[-1]
    return {"steps": int(steps), "total_s": float(total), "training_s": float(training),
            "periodic_s": float(periodic), "fid_s": float(fid)}


def steps_per_s(summary: dict | None) -> float | None:
    """Training steps per second of a time summary (None without one, or without training time)."""
    return summary["steps"] / summary["training_s"] if summary and summary["training_s"] else None


def pytest_counts(output: str) -> dict:
    """pytest's closing counts (passed, failed, skipped, ...) as numbers."""
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", output)}


def run(command: list[str], log) -> subprocess.CompletedProcess:
    log("$ " + " ".join(command))
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    log(f"  exit {result.returncode} after {time.perf_counter() - started:.0f} s")
    return result


def run_main(args, folder: Path, flags: list[str], log) -> tuple[str, subprocess.CompletedProcess, dict | None]:
    """``main.py`` on ``--data_path`` into ``folder`` with ``flags`` (wandb off): the command as a user types it, its
    result and its time summary."""
    command = [sys.executable, "main.py", "--data_path", args.data_path, "--save_folder", str(folder),
               "--wandb", "disabled", *flags]
    result = run(command, log)
    return " ".join(["python", *command[1:]]), result, time_summary(result.stdout)


def check_tests(cuda: bool, log) -> dict:
    result = run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *CUDA_TESTS], log)
    counts = pytest_counts(result.stdout)
    if not cuda:
        log("  the CUDA-only tests among them were skipped: no CUDA GPU here")
    return {"exit": result.returncode, **counts, "tail": result.stdout.strip().splitlines()[-1:]}


def check_bench(args, cuda: bool, tmp: Path, log) -> dict:
    steps = max(10, round(100 * args.scale))
    out = tmp / "bench.json"
    command = [sys.executable, "bench/bench.py", "--data_path", args.data_path, "--sections", "train", "sample",
               "--steps", str(steps), "--json", str(out)]
    if args.scale < 1:
        command += ["--sample_batches", "256"]
    if not cuda:  # the CPU rows as a smoke run: the reference pipeline alone takes an hour on a few cores
        command.append("--quick")
    result = run(command, log)
    if result.returncode != 0:
        log("  " + (result.stderr.strip().splitlines() or ["bench.py failed"])[-1])
        return {"exit": result.returncode}
    return json.loads(out.read_text())


def report_commands(args, cuda: bool) -> list[tuple[str, list[str]]]:
    long_steps, short_steps = max(20, round(10_000 * args.scale)), max(10, round(1_000 * args.scale))
    runs = [(f"{long_steps} steps", ["--train_steps", str(long_steps), "--save_and_sample_every",
                                     str(max(1, long_steps // 10))]),
            (f"{short_steps} steps, FID every {max(1, short_steps // 10)}",
             ["--train_steps", str(short_steps), "--save_and_sample_every", str(max(1, short_steps // 10)), "--fid"])]
    return [(f"{name}{graph_name}", flags + graph) for name, flags in runs
            for graph_name, graph in (("", ["--cuda_graph", "False"]), (", CUDA graph", ["--cuda_graph", "True"]))
            if cuda or not graph_name]


def check_commands(args, cuda: bool, tmp: Path, log) -> list[dict]:
    rows = []
    for i, (name, flags) in enumerate(report_commands(args, cuda)):
        command, result, summary = run_main(args, tmp / f"run{i}", flags, log)
        warnings = [line for line in result.stderr.splitlines() if line.startswith(("warning:", "error:"))]
        rows.append({"name": name, "command": command, "exit": result.returncode, "summary": summary,
                     "notes": warnings[:3]})
        log(f"  {name}: " + (f"training {summary['training_s']:.1f} s, periodic {summary['periodic_s']:.1f} s, "
                             f"FID {summary['fid_s']:.1f} s" if summary else "no time summary"))
    if not cuda:
        log("  skipped: the commands with --cuda_graph True (no CUDA GPU here)")
    return rows


def network_commands(args) -> list[tuple[str, list[str]]]:
    """(name, main.py flags) of each ``--networks`` candidate: trained ``--network_steps`` steps with FID at the end."""
    commands = []
    for spec in args.networks:
        mults, _, levels = spec.partition(":")
        flags = ["--image_size", str(args.network_size), "--train_steps", str(args.network_steps),
                 "--save_and_sample_every", str(args.network_steps), "--fid", "--dim_mults", *mults.split(),
                 "--attention_levels", *levels.split()]
        commands.append((f"{' '.join(mults.split())}, attention {' '.join(levels.split())}", flags))
    return commands


def last_fid(metrics: Path) -> dict:
    """The last FID and KID a run's ``metrics.jsonl`` records (empty when it scored none)."""
    if not metrics.exists():
        return {}
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    scored = [r for r in records if "fid" in r]
    return {"fid": scored[-1]["fid"], "kid": scored[-1].get("kid")} if scored else {}


def check_networks(args, tmp: Path, log) -> list[dict]:
    rows = []
    for i, (name, flags) in enumerate(network_commands(args)):
        folder = tmp / f"network{i}"
        command, result, summary = run_main(args, folder, flags, log)
        speed = steps_per_s(summary)
        row = {"name": name, "command": command, "exit": result.returncode, "summary": summary,
               "steps_per_s": speed, **last_fid(folder / "metrics.jsonl")}
        rows.append(row)
        log(f"  {name}: " + ("-" if speed is None else f"{speed:.2f} steps/s")
            + (f", FID {row['fid']:.2f}" if "fid" in row else ", no FID"))
    return rows


def markdown(results: dict) -> str:
    lines = [f"{results['device']}, torch {results['torch']}, {results['date']}, scale {results['scale']}", ""]
    tests = results.get("tests")
    if tests:
        lines += [f"CUDA tests: {', '.join(f'{v} {k}' for k, v in tests.items() if isinstance(v, int) and k != 'exit')}",
                  ""]
    bench = results.get("bench") or {}
    if bench.get("train"):
        lines += ["| training row | steps/s | img/s | peak MiB |", "| --- | --- | --- | --- |"]
        for r in bench["train"]:
            memory = r.get("peak_gpu_mib") or r["peak_rss_mib"]
            lines.append(f"| {r['dataset']}, {r['pipeline']}, {r['label']} | {r['steps_per_s']:.2f} | "
                         f"{r['images_per_s']:.0f} | {memory:.0f} |")
        lines.append("")
    if bench.get("sample"):
        lines += ["| sampling row | img/s |", "| --- | --- |"]
        for r in bench["sample"]:
            graph = ", CUDA graph" if r.get("graph") else ""
            lines.append(f"| {r['sampler']} {r['steps'] or 50} steps, batch {r['batch']}{graph} | "
                         f"{r['images_per_s']:.1f} |")
        lines.append("")
    if results.get("commands"):
        lines += ["| report command | exit | training s | checkpoints and grids s | FID s |",
                  "| --- | --- | --- | --- | --- |"]
        for r in results["commands"]:
            s = r["summary"] or {}
            lines.append(f"| {r['name']} | {r['exit']} | {s.get('training_s', '-')} | {s.get('periodic_s', '-')} | "
                         f"{s.get('fid_s', '-')} |")
        lines.append("")
    if results.get("networks"):
        lines += ["| network (--dim_mults, attention levels) | exit | steps/s | FID | KID |",
                  "| --- | --- | --- | --- | --- |"]
        for r in results["networks"]:
            speed = "-" if r["steps_per_s"] is None else f"{r['steps_per_s']:.2f}"
            fid = f"{r['fid']:.2f} | {r['kid']:.4f}" if "fid" in r else "- | -"
            lines.append(f"| {r['name']} | {r['exit']} | {speed} | {fid} |")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (Path(args.data_path) / "cat").is_dir():
        print(f"error: {Path(args.data_path) / 'cat'} does not exist; pass --data_path to the folder that holds cat/",
              file=sys.stderr)
        return 2
    import torch

    cuda = torch.cuda.is_available()
    results = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d"), "scale": args.scale}
    log = lambda line: print(line, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        if "tests" in args.parts:
            results["tests"] = check_tests(cuda, log)
        if "bench" in args.parts:
            results["bench"] = check_bench(args, cuda, Path(tmp), log)
        if "commands" in args.parts:
            results["commands"] = check_commands(args, cuda, Path(tmp), log)
        if "networks" in args.parts:
            results["networks"] = check_networks(args, Path(tmp), log)
    table = markdown(results)
    print("\n" + table, end="")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        args.json.with_suffix(".md").write_text(table)
        print(f"wrote {args.json} and {args.json.with_suffix('.md')}")
    failed = any(part.get("exit") for part in [results.get("tests") or {}, results.get("bench") or {},
                                                *(results.get("commands") or []), *(results.get("networks") or [])])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
