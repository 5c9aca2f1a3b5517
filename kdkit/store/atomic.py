"""Files written whole or not at all: a temporary beside the target, fsync, then a rename over it."""
from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Callable
from pathlib import Path

from kdkit.errors import RunFailed, reason


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then fsync and rename over ``path``: a kill never leaves a torn file. A write that fails
    (a full disk, an unwritable folder, any error of ``write``) leaves the previous ``path`` as it was,
    removes the temporary and raises ``RunFailed`` naming the path and the reason."""
    path = Path(path)
    tmp = temporary_path(path, os.getpid())
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a power cut
        finally:
            os.close(directory)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # on a read-only file system even this fails
            tmp.unlink(missing_ok=True)
        if not isinstance(exc, Exception):  # KeyboardInterrupt and the like go on as they are
            raise
        intact = "; the previous one is intact" if path.exists() else ""
        raise RunFailed(f"cannot write {path}: {reason(exc)}{intact}") from exc

def temporary_path(path: Path, pid: int) -> Path:
    """Where process ``pid`` writes ``path`` before renaming it: ``.<name>.<pid>.tmp`` beside it."""
    return path.with_name(f".{path.name}.{pid}.tmp")

def leftover_temporaries(path: Path) -> list[Path]:
    """The temporaries of ``path`` that a killed process left behind (kdkit's own names only)."""
    return [tmp for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp")
            if tmp.name[len(path.name) + 2:-len(".tmp")].isdigit()]
