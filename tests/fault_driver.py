"""Runs ``main.main`` with a real fault injected, for tests/test_faults.py (the package itself has no hooks).

    python tests/fault_driver.py slow_save SECONDS -- <main.py flags>
        every checkpoint takes SECONDS to reach the disk, written in 20 pieces, so that a kill at a random
        moment often lands in the middle of a save;
    python tests/fault_driver.py file_limit BYTES -- <main.py flags>
        after the first periodic save, the process may no longer write past BYTES in any file (the kernel's
        RLIMIT_FSIZE: writes fail with EFBIG exactly as they would with ENOSPC on a full disk);
    python tests/fault_driver.py read_only chattr|chmod -- <main.py flags>
        after the first periodic save, the save folder is made read-only (chattr +i for root, chmod otherwise).
"""
from __future__ import annotations

import io
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import main  # noqa: E402
import trainer  # noqa: E402


def slow_saves(seconds: float, pieces: int = 20) -> None:
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        for i in range(pieces):
            f.write(data[i * len(data) // pieces:(i + 1) * len(data) // pieces])
            f.flush()
            time.sleep(seconds / pieces)

    torch.save = save


def after_first_save(fault) -> None:
    real = trainer.Trainer.save_and_sample
    done = []

    def save_and_sample(self):
        fid_seconds = real(self)
        if not done:
            done.append(True)
            fault(self.save_folder)
        return fid_seconds

    trainer.Trainer.save_and_sample = save_and_sample


def limit_file_size(limit: int):
    def fault(_folder):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write then raises EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return fault


def make_read_only(method: str):
    def fault(folder: Path):
        if method == "chattr":
            subprocess.run(["chattr", "+i", str(folder)], check=True)
        else:
            folder.chmod(0o555)
    return fault


if __name__ == "__main__":
    mode, value, separator, *argv = sys.argv[1:]
    assert separator == "--", __doc__
    if mode == "slow_save":
        slow_saves(float(value))
    elif mode == "file_limit":
        after_first_save(limit_file_size(int(value)))
    elif mode == "read_only":
        after_first_save(make_read_only(value))
    else:
        raise SystemExit(f"unknown fault {mode!r}")
    sys.exit(main.main(argv))
