"""Stopping a run at a step boundary: Ctrl-C (exit 130) or SIGTERM, a cluster's preemption
(exit 143). Under torchrun the request travels in the per-step exchange, so every rank stops
at the same step."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

from ... import distributed
from .options import TrainingInterrupted, TrainingTerminated

__all__ = ["Stop"]


class Stop:
    """Ctrl-C (SIGINT) or SIGTERM asks the run to stop at the next step boundary, with a
    checkpoint; a second signal interrupts at once. Only the main thread can install the
    handlers; elsewhere the flag is inert. Under torchrun the request travels in the
    per-step reduction, so every rank stops at the same step."""

    def __init__(self):
        self.interrupt = self.terminate = False

    @property
    def requested(self) -> bool:
        return self.interrupt or self.terminate

    def error(self, interrupt: float, terminate: float):
        """The exception for requests seen by any rank (counts), or None."""
        return TrainingTerminated if terminate else TrainingInterrupted if interrupt else None

    def agreed(self):
        """The exception to stop with, agreed by every rank, or None (a collective)."""
        i, t = distributed.sum_across([float(self.interrupt), float(self.terminate)])
        return self.error(i, t)

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            if signum == signal.SIGTERM:
                self.terminate = True
            else:
                self.interrupt = True

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)
