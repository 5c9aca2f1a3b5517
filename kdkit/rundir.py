"""The run directory: resolved recipe, per-epoch metrics, summary, checkpoints and the export."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import timm
import torch

import kdkit
from kdkit.errors import KdkitError


def default_run_dir(recipe, root: str | Path = "runs") -> Path:
    """``root/<name>/seed<seed>``: where ``kdkit run`` puts a run without ``--out``."""
    return Path(root) / str(recipe.table["name"]) / f"seed{recipe.table.get('seed', 0)}"


class RunDir:
    """Paths and writers of one run's directory."""

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
                             "(use --force to overwrite it, or --out to choose another)")

    def create(self, recipe_text: str) -> None:
        if self.path.is_dir():
            shutil.rmtree(self.path)
        (self.path / "checkpoints").mkdir(parents=True)
        self.recipe.write_text(recipe_text)

    def append_metrics(self, row: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")

    def write_summary(self, summary: dict) -> None:
        tmp = self.summary.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        tmp.replace(self.summary)

    def read_summary(self) -> dict:
        return json.loads(self.summary.read_text())


def provenance(recipe_hash: str) -> dict:
    """What produced a run: versions, the git commit of kdkit's checkout, the recipe hash."""
    try:
        result = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=Path(kdkit.__file__).parent,
                                capture_output=True, text=True, timeout=5)
        commit = result.stdout.strip() if result.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"kdkit_version": kdkit.__version__, "git_commit": commit, "torch_version": torch.__version__,
            "timm_version": timm.__version__, "recipe_hash": recipe_hash}
