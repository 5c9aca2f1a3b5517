"""Stopping on a signal at a safe point: the run's and ``compare --jobs``'s way to end cleanly."""
from __future__ import annotations

import os
import signal
import threading


class StopOnSignal:
    """SIGINT and SIGTERM ask the run to stop after the current step; a second one exits at once.

    Only the main thread can install signal handlers; elsewhere signals keep their default effect.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self.previous = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame) -> None:
        if self.signum is not None:
            os._exit(128 + signum)  # everything on disk was written atomically: nothing is torn
        self.signum = signum
