"""Faults caused for real on the real command: SIGKILL mid-save, signals, a full disk, a read-only folder."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import TINY_FLAGS, make_image_folder
from runtime.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "fault_driver.py"
TINY = [*TINY_FLAGS, "--log_every", "1"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
KILL_TRIALS = 4
SAVE_EVERY = 3


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("afhq"), count=12)


def flags(data_path, save, *extra):
    return [*TINY, "--data_path", str(data_path), "--save_folder", str(save), *map(str, extra)]


def start(fault: list[str], argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(DRIVER), *fault, "--", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)


def logged_steps(save: Path) -> list[int]:
    path = save / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        if "loss" in record:
            steps.append(record["step"])
    return steps


def wait_for(condition, proc, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()[1]}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the run")


def test_sigkill_at_random_moments_always_leaves_a_checkpoint_that_resumes(data_path, tmp_path):
    """Kill -9 at random moments and in the middle of checkpoint writes (slowed down to make room); every
    time model.pt loads, holds at least the previous trial's step, and loses at most the steps since the
    last save; the runs resumed from it form one run with every step logged once."""
    rng = random.Random(1234)
    save = tmp_path / "run"
    step, lost, inside_a_save = 0, [], 0
    for trial in range(KILL_TRIALS):
        argv = flags(data_path, save, "--train_steps", 10**6, "--save_and_sample_every", SAVE_EVERY)
        if step:
            argv += ["--load_path", save / "model.pt"]
        (save / "metrics.jsonl").unlink(missing_ok=True)  # the resumed run rewrites it from the checkpoint
        proc = start(["slow_save", "0.6"], argv)
        wait_for(lambda: (save / "model.pt").exists() and any(s > step for s in logged_steps(save)), proc)
        if trial % 2:  # aim inside a save: wait for its temporary file, then kill partway through the write
            wait_for(lambda: bool(list(save.glob(".model.pt.*.tmp"))), proc)
            time.sleep(rng.uniform(0.0, 0.5))
        else:  # any moment: a step, a sample grid, a save, the metrics
            time.sleep(rng.uniform(0.0, 2.0))
        proc.kill()
        proc.communicate()
        inside_a_save += bool(list(save.glob(".model.pt.*.tmp")))
        reached = max(logged_steps(save))
        ckpt = load_checkpoint(save / "model.pt")  # raises if the file is broken
        assert ckpt["step"] >= step, "a kill took away steps that were already saved"
        assert 0 <= reached - ckpt["step"] <= SAVE_EVERY
        lost.append(reached - ckpt["step"])
        step = ckpt["step"]
    assert inside_a_save >= KILL_TRIALS // 2
    assert step >= SAVE_EVERY

    final = step + 2
    done = subprocess.run([sys.executable, str(ROOT / "main.py"),
                           *flags(data_path, save, "--train_steps", final, "--save_and_sample_every", SAVE_EVERY,
                                  "--load_path", save / "model.pt")],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert load_checkpoint(save / "model.pt")["step"] == final
    # the curve of the whole run has every step once: each resume continued where its checkpoint stopped
    assert logged_steps(save) == list(range(1, final + 1))
    assert not list(save.glob(".model.pt.*.tmp")), "temporary files of killed saves were left behind"
    assert not list(save.glob("*.tmp.png"))
    print(f"{KILL_TRIALS} SIGKILL trials, {inside_a_save} inside a save; steps lost per kill {lost}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_signals_save_and_say_how_to_resume(data_path, tmp_path, sig):
    save = tmp_path / "run"
    proc = start(["slow_save", "0"], flags(data_path, save, "--train_steps", 10**6, "--save_and_sample_every", 10**6))
    wait_for(lambda: len(logged_steps(save)) >= 2, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, 130), err
    assert "Traceback" not in err
    assert f"resume with --load_path {save / 'model.pt'}" in err
    reached = max(logged_steps(save))
    assert load_checkpoint(save / "model.pt")["step"] >= reached  # the steps done before the signal are kept


def _read_only_method(probe: Path) -> str | None:
    """How this machine can make a folder unwritable for this user: chmod, or chattr +i for root."""
    probe.mkdir()
    method = "chmod"
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode:
            return None
        method = "chattr"
    else:
        probe.chmod(0o555)
    try:
        (probe / "x").write_text("x")
        return None
    except OSError:
        return method
    finally:
        if method == "chattr":
            subprocess.run(["chattr", "-i", str(probe)], check=False)
        probe.chmod(0o755)


def _faults(tmp_path):
    yield ["file_limit", str(64 * 1024)], "File too large"
    method = _read_only_method(tmp_path / "probe")
    if method is not None:
        yield ["read_only", method], "could not write"


def test_full_disk_or_read_only_folder_stops_the_run_and_keeps_the_checkpoint(data_path, tmp_path):
    """A checkpoint write that fails for real (the kernel's file-size limit fails writes the way a full disk
    does; a read-only folder where the machine allows making one) ends the run with one line and exit 2,
    and the previous checkpoint loads."""
    tried = []
    for fault, message in _faults(tmp_path):
        save = tmp_path / fault[0]
        proc = start(fault, flags(data_path, save, "--train_steps", 12, "--save_and_sample_every", 3))
        try:
            _, err = proc.communicate(timeout=300)
        finally:
            if fault == ["read_only", "chattr"]:
                subprocess.run(["chattr", "-i", str(save)], check=False)
            save.chmod(0o755)
        assert proc.returncode == 2, err
        assert "Traceback" not in err
        error_lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(error_lines) == 1 and message in error_lines[0], err
        assert "the previous file there is intact" in error_lines[0]
        assert load_checkpoint(save / "model.pt")["step"] == 3
        assert not list(save.glob(".model.pt.*.tmp"))
        tried.append(fault[0])
    assert "file_limit" in tried
