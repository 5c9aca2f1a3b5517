"""One writer per directory: an exclusive ``flock`` on a lock file inside it.

The kernel releases the lock when its process exits, however it dies, so a killed run never leaves a
stale lock behind. The lock file names its holder (pid and host) for the message of a process that is
refused or waits. A process may take a lock it already holds again (a run trains its own teacher inside
the teacher's lock); a forked child (a data loader's worker) drops its inherited copy, so that only the
process that took a lock holds it.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from kdkit.errors import KdkitError

LOCK_FILE = ".kdkit-lock"

_held: dict[Path, list] = {}  # directory (resolved) -> [open lock file, times taken]


def _drop_inherited() -> None:
    for file, _ in _held.values():
        file.close()  # the parent's lock stays: it holds its own descriptor
    _held.clear()


os.register_at_fork(after_in_child=_drop_inherited)


def holder(directory: Path) -> str | None:
    """Who holds ``directory``'s lock ("pid 12 on host h"), or None when it is free or held by this process.

    Reads only: a brief shared lock tells whether an exclusive one is held.
    """
    path = Path(directory) / LOCK_FILE
    if Path(directory).resolve() in _held or not path.is_file():
        return None
    with open(path) as file:
        try:
            fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _named(file)
    return None


def acquire(directory: Path, waiting: Callable[[str], None] | None = None) -> None:
    """Take ``directory``'s lock (the directory must exist). Held by another process: without ``waiting``
    a ``KdkitError`` naming the holder; with it, ``waiting(message)`` is told who holds it and the lock
    is waited for."""
    key = Path(directory).resolve()
    if key in _held:
        _held[key][1] += 1
        return
    # held through a read-only descriptor, so a file system can still be remounted read-only under a run
    file = os.fdopen(os.open(key / LOCK_FILE, os.O_RDONLY | os.O_CREAT, 0o666), "r")
    try:
        if not _try_lock(file):
            busy = f"{directory}: in use by another kdkit process ({_named(file)})"
            if waiting is None:
                raise KdkitError(f"{busy}; wait for it to finish, or choose another directory")
            waiting(f"{busy}: waiting for it to finish")
            fcntl.flock(file, fcntl.LOCK_EX)
    except BaseException:
        file.close()
        raise
    (key / LOCK_FILE).write_text(f"pid {os.getpid()} on {socket.gethostname()}\n")
    _held[key] = [file, 1]


def release(directory: Path) -> None:
    """Give back one taking of ``directory``'s lock; the last one unlocks it. A lock not held: nothing."""
    entry = _held.get(Path(directory).resolve())
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _held[Path(directory).resolve()]
        entry[0].close()


def _try_lock(file) -> bool:
    # a few tries: ``holder`` of another process holds a shared lock for an instant
    for attempt in range(5):
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            time.sleep(0.02 * attempt)
    return False


def _named(file) -> str:
    file.seek(0)
    return file.read().strip() or "holder unknown"
