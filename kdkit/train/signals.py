"""Stopping on a signal at a safe point: the run's and ``compare --jobs``'s way to end cleanly."""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading


class StopOnSignal:
    """SIGINT and SIGTERM ask the run to stop after the current step; a second one exits at once.

    Only the main thread can install signal handlers; elsewhere signals keep their default effect.
    Exiting at once skips multiprocessing's exit handler, so the handler first does what that one would:
    it terminates the daemonic children (a run's data-loader workers; never ``compare --jobs``'s runs),
    which would otherwise linger for seconds, holding the terminal's or a caller's output pipes, until
    they noticed their parent was gone.
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
            for child in multiprocessing.active_children():
                if child.daemon:
                    child.terminate()
            os._exit(128 + signum)  # everything on disk was written atomically: nothing is torn
        self.signum = signum
