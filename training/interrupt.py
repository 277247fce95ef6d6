"""Stopping a training run cleanly on Ctrl-C (SIGINT) or SIGTERM, which Colab and batch schedulers send.

Inside ``StopSignals`` the first signal is only recorded; the training loop sees it at the end of the step,
saves a checkpoint and stops. A second signal stops at once (KeyboardInterrupt). Outside it, or off the main
thread (where Python cannot install handlers), signals keep their usual meaning.
"""
from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Raised after a SIGINT or SIGTERM once the checkpoint is saved; ``main.py`` exits 130."""


class StopSignals:
    """Context manager; ``received`` is the name of the first signal caught (``"SIGINT"``), or None."""

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self) -> "StopSignals":
        self.received = None
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
