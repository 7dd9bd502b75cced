"""Stopping a run cleanly: SIGTERM / Ctrl-C make the loop save a checkpoint, then stop.

Preemptions (TPU maintenance, ``scancel``, a job's time limit, Ctrl-C of ``jaxdistil launch``)
send SIGTERM; the loop checks ``StopSignal`` after every step. In multi-process runs every process
must stop after the same step to take part in one save, so there the signal goes through
``jax.distributed``'s notifier and ``jaxdistil.distributed.agreed_stop``.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import jax


class StopSignal:
    """SIGTERM / SIGINT set a flag that the loop checks after each step (save, then stop).

    A second Ctrl-C stops immediately (KeyboardInterrupt) in case saving hangs. Multi-process runs
    keep JAX's own SIGTERM notifier instead and stop where all processes agree
    (``jaxdistil.distributed.agreed_stop``), so that every process joins the same final save.
    """

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def check(self, step: int) -> bool:
        """True when the loop must stop after ``step`` (the loop sets ``signum`` from
        ``distributed.agreed_stop`` in multi-process runs)."""
        return self.signum is not None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            if jax.process_count() > 1:
                # SIGTERM belongs to jax.distributed's notifier: every process stops at one agreed step
                # (distributed.agreed_stop); Ctrl-C is passed on to it as a SIGTERM.
                self._old[signal.SIGINT] = signal.signal(
                    signal.SIGINT, lambda *_: os.kill(os.getpid(), signal.SIGTERM)
                )
                return self
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
