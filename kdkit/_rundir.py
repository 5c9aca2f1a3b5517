"""The run directory: resolved recipe, per-epoch metrics, summary, checkpoints and the export."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import timm
import torch

import kdkit
from kdkit._checkpoint import atomic_write, leftover_temporaries
from kdkit._errors import KdkitError


def default_run_dir(recipe, root: str | Path = "runs") -> Path:
    """``root/<name>/seed<seed>``: where ``kdkit run`` puts a run without ``--out``."""
    return Path(root) / str(recipe.table["name"]) / f"seed{recipe.table.get('seed', 0)}"


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

    def check_writable(self, force: bool) -> None:
        """Refuse an existing non-empty run directory unless ``force``; nothing is touched here."""
        if self.path.exists() and not self.path.is_dir():
            raise KdkitError(f"{self.path}: exists and is not a directory")
        if self.path.is_dir() and any(self.path.iterdir()) and not force:
            raise KdkitError(f"{self.path}: the run directory exists and is not empty "
                             "(--resume continues it, --force overwrites it, --out chooses another)")

    def create(self, recipe_text: str) -> None:
        """A new run: an empty directory (a forced one emptied first) holding the resolved recipe."""
        if self.path.is_dir():
            shutil.rmtree(self.path)
        try:
            (self.path / "checkpoints").mkdir(parents=True)
        except OSError as exc:  # a read-only file system, an unwritable parent
            raise KdkitError(f"{self.path}: cannot create the run directory: {exc.strerror}") from None
        self.write_recipe(recipe_text)

    def write_recipe(self, recipe_text: str) -> None:
        atomic_write(self.recipe, lambda tmp: tmp.write_text(recipe_text))

    def write_metrics(self, rows: list[dict]) -> None:
        """Replace ``metrics.jsonl`` with ``rows``, the run's history: every epoch exactly once, never a torn line."""
        atomic_write(self.metrics, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in rows)))

    def write_summary(self, summary: dict) -> None:
        atomic_write(self.summary, lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))

    def remove_temporaries(self) -> None:
        """Remove what a killed process left of its atomic writes (``.<name>.<pid>.tmp``, often empty)."""
        for path in (self.recipe, self.metrics, self.summary, self.last, self.best, self.export):
            for tmp in leftover_temporaries(path):
                tmp.unlink(missing_ok=True)

    def read_summary(self) -> dict:
        return json.loads(self.summary.read_text())

    def status(self) -> str | None:
        """The summary's status, or None when there is no readable summary."""
        try:
            return self.read_summary().get("status")
        except (OSError, ValueError):
            return None


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
