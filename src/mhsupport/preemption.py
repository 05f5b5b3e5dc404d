"""Stopping cleanly when a scheduler asks: SIGTERM (a SLURM preemption, `scancel`, the end of a
time limit) and SIGUSR1 (what `sbatch --signal=USR1@90` sends before the time limit).

Where a stage can stop at a safe point (training between optimizer steps, eval and likelihood
between batches) it runs inside `deferred()`: the signal only sets a flag, the stage keeps its
work (a checkpoint, its finished batches) and raises `Preempted` at the next safe point. Elsewhere
the signal raises `Preempted` at once: runs are written atomically, so nothing partial is left
looking complete. The CLI exits with EXIT_CODE, and the same command resumes."""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request, work kept; the same command resumes
_state = {"signal": None, "deferring": 0}


class Preempted(BaseException):
    """A stop asked for by a signal. A BaseException, like KeyboardInterrupt, so that no
    `except Exception` on the way up swallows it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


@contextmanager
def handling():
    """Handle SIGTERM and SIGUSR1 within this block (the handlers before it are put back after it).
    Only a process's main thread may set handlers; in another thread this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {signum: signal.signal(signum, _handle) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def _handle(signum: int, frame) -> None:
    request(signum)
    if _state["deferring"]:
        log.warning("%s received: stopping at the next checkpoint", signal.Signals(signum).name)
        return
    raise Preempted(signum)


def request(signum: int) -> None:
    """Ask for a stop as `signum` would (e.g. for a process whose peer was signalled)."""
    _state["signal"] = signum


def requested() -> bool:
    return _state["signal"] is not None


def check() -> None:
    """A safe point: raise Preempted if a stop was asked for."""
    if _state["signal"] is not None:
        raise Preempted(_state["signal"])


@contextmanager
def deferred():
    """Within this block a signal waits for the next `check()` (or the block's end)."""
    _state["deferring"] += 1
    try:
        yield
    finally:
        _state["deferring"] -= 1
    check()
