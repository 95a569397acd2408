"""Ctrl-C during a trial loop: noted as well as raised, so a dropped one still stops the loop."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def ctrl_c_noted() -> Iterator[list[bool]]:
    """Ctrl-C raises KeyboardInterrupt wherever the main thread is; inside a garbage-collector
    callback (Optuna collects after every trial) Python prints and drops it. The handler also notes
    it, so the trial loop stops after the trial at the latest."""
    noted: list[bool] = []
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield noted  # signals are not ours to handle here, or Ctrl-C is ignored on purpose
        return

    def handler(signum, frame) -> None:
        noted.append(True)
        previous(signum, frame)

    def unraisable(u) -> None:  # the dropped Ctrl-C is acted on: no traceback for it
        if not isinstance(u.exc_value, KeyboardInterrupt):
            hook(u)

    hook = sys.unraisablehook
    signal.signal(signal.SIGINT, handler)
    sys.unraisablehook = unraisable
    try:
        yield noted
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = hook
