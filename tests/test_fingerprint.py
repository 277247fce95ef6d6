"""The shipped defaults do not move: a short run of ``main.py`` with its default flags ends with recorded weights.

The run: the default network and training flags (a self-conditioned U-Net, two batches per step, weight decay
0.1, the EMA's warm-up), seed 0, fp32, on the CPU, three steps on 40 lossless 32-pixel images the test
makes. ``tests/data/fingerprint_defaults.json`` holds, for every tensor of the model and of its EMA, its sum,
its sum of squares and its dot product with fixed random numbers, and the logged loss. A change that alters
what the defaults compute changes these numbers. The record runs a step's two batches as two passes
(``--one_pass False``).

One pass over both batches, what ``--one_pass auto`` does on a CPU, computes the same loss and gradients
(``tests/test_train_step.py``) with the additions in another order; Adam's first steps divide each gradient
by its own size and so carry those last-bit differences into the weights. That run is held to the record at
1e-3 of each tensor's norm.

fp32, not ``--precision auto``: auto is bf16 on CPUs with bf16 instructions and fp32 elsewhere. One thread:
the kernels split their sums by thread count, which moves the last bits of a float32.

Where the record was made (the same torch, vector instructions, CPU model and cache size, which
``machine()`` names) the run must give the same weights to a relative 1e-6 of each tensor's norm: bit for bit
in practice, with room for an operation that adds in another order. Elsewhere the convolution kernels
themselves add in another order, and Adam's first steps carry that into the weights; there the tolerance is
1e-3 of the norm, which still catches any change of the network, its initialisation, the data each step
takes or the loss. Rerecord only when a change of the defaults is intended: ``python tests/test_fingerprint.py``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

RECORD = Path(__file__).resolve().parent / "data" / "fingerprint_defaults.json"
STEPS = 3


def make_pngs(root: Path, count: int = 40, size: int = 32) -> Path:
    """``root/train/cat`` with ``count`` PNGs at the training size, so that decoding is exact everywhere."""
    folder = root / "train" / "cat"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2024)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return root / "train"


def machine() -> str:
    """What decides the last bits of the record: the torch build, its vector instructions, the CPU and its cache."""
    cpu = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            cpu.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return (f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, "
            f"{cpu.get('model name', 'unknown CPU')}, cache {cpu.get('cache size', 'unknown')}")


def train_defaults(root: Path, *flags: str) -> Path:
    import main

    data = make_pngs(root / "data")
    save = root / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main.main(["--data_path", str(data), "--save_folder", str(save), "--cache_dir", str(root / "cache"),
                          "--train_steps", str(STEPS), "--save_and_sample_every", str(STEPS), "--log_every",
                          str(STEPS), "--num_samples", "1", "--precision", "fp32", "--device", "cpu", "--wandb", "disabled", *flags]) == 0
    finally:
        torch.set_num_threads(threads)
    return save / "model.pt"


def fingerprint(path: Path) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    out = {"machine": machine(), "step": ckpt["step"], "loss": [r["loss"] for r in ckpt["history"] if "loss" in r]}
    for part in ("model", "ema"):
        tensors = {}
        for name, value in sorted(ckpt[part].items()):
            x = value.detach().double().flatten()
            probe = torch.randn(x.numel(), generator=torch.Generator().manual_seed(len(name)), dtype=torch.float64)
            tensors[name] = [x.sum().item(), x.square().sum().item(), (x * probe).sum().item()]
        out[part] = tensors
    return out


def compare(got: dict, want: dict, *, tolerance: float) -> list[str]:
    """Every figure that differs by more than ``tolerance`` times its scale (the tensor's norm for its sum and
    its dot product, its sum of squares for that, the loss for the loss), as lines naming it."""
    problems = [f"step: {got['step']} != {want['step']}"] if got["step"] != want["step"] else []
    if len(got["loss"]) != len(want["loss"]) or not np.allclose(got["loss"], want["loss"], rtol=tolerance, atol=0):
        problems.append(f"loss: {got['loss']} != {want['loss']}")
    for part in ("model", "ema"):
        if set(got[part]) != set(want[part]):
            problems.append(f"{part}: tensors {sorted(set(got[part]) ^ set(want[part]))} differ in name")
            continue
        for name, (total, squares, probe) in want[part].items():
            scale = np.array([squares ** 0.5, squares, squares ** 0.5]) + 1e-12
            error = np.abs(np.array(got[part][name]) - [total, squares, probe]) / scale
            if (error > tolerance).any():
                problems.append(f"{part}.{name}: {got[part][name]} != {[total, squares, probe]}")
    return problems


def tolerance_for(record: dict) -> float:
    return 1e-6 if record["machine"] == machine() else 1e-3


@pytest.fixture(scope="module")
def defaults_run(tmp_path_factory) -> dict:
    return fingerprint(train_defaults(tmp_path_factory.mktemp("fingerprint"), "--one_pass", "False"))


def test_the_shipped_defaults_give_the_recorded_weights(defaults_run):
    record = json.loads(RECORD.read_text())
    problems = compare(defaults_run, record, tolerance=tolerance_for(record))
    assert not problems, f"{len(problems)} figures moved, e.g. " + "; ".join(problems[:3])


def test_one_pass_over_the_steps_batches_stays_with_the_record(tmp_path):
    record = json.loads(RECORD.read_text())
    problems = compare(fingerprint(train_defaults(tmp_path)), record, tolerance=1e-3)
    assert not problems, f"{len(problems)} figures moved, e.g. " + "; ".join(problems[:3])


if __name__ == "__main__":
    import tempfile

    sys.path.insert(0, str(RECORD.parents[2]))
    with tempfile.TemporaryDirectory() as tmp:
        RECORD.parent.mkdir(exist_ok=True)
        RECORD.write_text(json.dumps(fingerprint(train_defaults(Path(tmp), "--one_pass", "False")), indent=1) + "\n")
    print(f"wrote {RECORD}")
