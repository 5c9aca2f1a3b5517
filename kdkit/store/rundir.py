"""The run directory: resolved recipe, per-epoch metrics, summary, checkpoints and the export.

kdkit deletes only what it wrote: a run directory carries a marker (written first, atomically) that
kdkit made it, and ``--force`` empties only a directory with the marker, an empty one, or a run of an
earlier kdkit (``recipe.toml`` and ``summary.json`` or ``checkpoints/``). One process writes a run
directory at a time: the one holding its lock (``kdkit.store.lock``).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import timm
import torch

import kdkit
from kdkit.errors import reason
from kdkit.errors import KdkitError
from kdkit.store import lock
from kdkit.store.atomic import atomic_write, leftover_temporaries
from kdkit.store.summary import Summary

MARKER = ".kdkit-run"  # "kdkit made this directory": what --force asks before emptying one

# A run's name is one folder name (runs/<name>/seed<N>, $KDKIT_CACHE/teachers/<name>-<hash>): letters,
# digits, '.', '_' and '-', starting with a letter, digit or '_' (never '.', '..' or a hidden folder).
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")


def check_name(name: str) -> str | None:
    """Why ``name`` cannot name a run's folder, or None when it can."""
    if NAME.fullmatch(name):
        return None
    return (f"{name!r} cannot name the run's folder: use 1 to 100 letters, digits, '.', '_' or '-', "
            "starting with a letter, digit or '_'")


def default_run_dir(recipe, root: str | Path = "runs") -> Path:
    """``root/<name>/seed<seed>``: where ``kdkit run`` puts a run without ``--out``."""
    name = str(recipe.table["name"])
    if why := check_name(name):
        raise recipe.error("name", why)
    return Path(root) / name / f"seed{recipe.table.get('seed', 0)}"


class RunDir:
    """Paths and writers of one run's directory; every file is replaced atomically."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.recipe = self.path / "recipe.toml"
        self.metrics = self.path / "metrics.jsonl"
        self.summary = self.path / "summary.json"
        self.last = self.path / "checkpoints" / "last.pt"
        self.best = self.path / "checkpoints" / "best.pt"
        self.export = self.path / "student.safetensors"
        self.marker = self.path / MARKER

    def check_writable(self, force: bool) -> None:
        """Refuse an existing non-empty run directory unless ``force`` is given and it is a kdkit run
        (``check_owned``), and one that another process writes (``check_free``); nothing is touched here."""
        if self.path.exists() and not self.path.is_dir():
            raise KdkitError(f"{self.path}: exists and is not a directory")
        if self.path.is_dir() and self.written() and not force:
            raise KdkitError(f"{self.path}: the run directory exists and is not empty "
                             "(--resume continues it, --force overwrites it, --out chooses another)")
        self.check_owned()
        self.check_free()

    def written(self) -> list[Path]:
        """What the directory holds besides kdkit's marker and lock (a claimed directory is still empty)."""
        return [entry for entry in self.path.iterdir() if entry.name not in (MARKER, lock.LOCK_FILE)]

    def check_owned(self) -> None:
        """Refuse a directory kdkit may not empty: not empty, no marker, and not a run of an earlier kdkit."""
        if not self.path.is_dir() or self.marker.is_file() or not any(self.path.iterdir()):
            return
        if self.recipe.is_file() and (self.summary.is_file() or self.last.parent.is_dir()):
            return  # a run written before the marker existed
        raise KdkitError(f"{self.path}: not a kdkit run directory (no {MARKER} marker), so kdkit will not "
                         "overwrite it, even with --force: remove it yourself or choose another --out")

    def check_free(self) -> None:
        """Refuse a run directory that another process is writing (it holds the lock)."""
        holder = lock.holder(self.path)
        if holder:
            raise KdkitError(f"{self.path}: in use by another kdkit process ({holder}); "
                             "wait for it to finish, or choose another --out")

    def claim(self, waiting=None) -> None:
        """Make this process the directory's one writer before it writes anything: a directory kdkit
        may own (created if missing), marked as kdkit's, then locked (``kdkit.store.lock.acquire``: held
        elsewhere, refused or, with ``waiting``, waited for). ``release`` gives it back."""
        self.check_owned()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a read-only file system, an unwritable parent
            raise KdkitError(f"{self.path}: cannot create the run directory: {exc.strerror}") from None
        if not self.marker.is_file():
            atomic_write(self.marker, lambda tmp: tmp.write_text(f"kdkit {kdkit.__version__} run directory\n"))
        lock.acquire(self.path, waiting)

    def release(self) -> None:
        lock.release(self.path)

    def create(self, recipe_text: str, force: bool) -> None:
        """A new run: the directory claimed, emptied of an earlier run (but its marker and lock), holding
        the resolved recipe. The check of ``check_writable`` is made again once the lock is held: another
        run may have filled the directory in between."""
        self.claim()
        try:
            self.check_writable(force)
        except KdkitError:
            self.release()
            raise
        for entry in self.written():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        (self.path / "checkpoints").mkdir()
        self.write_recipe(recipe_text)

    def reopen(self, recipe_text: str) -> None:
        """A resumed run: the directory claimed, its recipe rewritten (``--allow-changes`` may change it)."""
        self.claim()
        self.write_recipe(recipe_text)

    def write_recipe(self, recipe_text: str) -> None:
        atomic_write(self.recipe, lambda tmp: tmp.write_text(recipe_text))

    def write_metrics(self, rows: list[dict]) -> None:
        """Replace ``metrics.jsonl`` with ``rows``, the run's history: every epoch exactly once, never a torn line."""
        atomic_write(self.metrics, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in rows)))

    def write_summary(self, summary: Summary) -> None:
        atomic_write(self.summary, lambda tmp: tmp.write_text(json.dumps(summary.to_json(), indent=2) + "\n"))

    def remove_temporaries(self) -> None:
        """Remove what a killed process left of its atomic writes (``.<name>.<pid>.tmp``, often empty)."""
        for path in (self.marker, self.recipe, self.metrics, self.summary, self.last, self.best, self.export):
            for tmp in leftover_temporaries(path):
                tmp.unlink(missing_ok=True)

    def read_summary(self) -> dict:
        """The summary, a JSON object; a binary, garbled or foreign one is refused, naming the file."""
        again = "run it again (kdkit run --force) or put back a good copy"
        try:
            summary = json.loads(self.summary.read_bytes())
        except (OSError, ValueError) as exc:  # ValueError: not UTF-8, or not JSON
            raise KdkitError(f"{self.summary}: cannot read the run's summary ({reason(exc)}); {again}") from None
        if not isinstance(summary, dict):
            raise KdkitError(f"{self.summary}: not a kdkit summary (a JSON {type(summary).__name__}, not an object); "
                             f"{again}")
        return summary

    def status(self) -> str | None:
        """The summary's status, or None when there is no summary yet."""
        return self.read_summary().get("status") if self.summary.is_file() else None


def provenance(recipe_hash: str) -> dict:
    """What produced a run: versions, the git commit of kdkit's checkout, the recipe hash."""
    try:
        result = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=Path(kdkit.__file__).parent,
                                capture_output=True, text=True, timeout=5)
        commit = result.stdout.strip() if result.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"kdkit_version": kdkit.__version__, "git_commit": commit, "torch_version": str(torch.__version__),
            "timm_version": str(timm.__version__), "recipe_hash": recipe_hash}
