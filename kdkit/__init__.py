"""kdkit: plugin-based multi-teacher knowledge distillation for PyTorch vision models."""
from __future__ import annotations

from kdkit.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["__version__", "build_model", "hookimpl", "load", "run"]


def run(recipe_path, overrides=(), out=None, **options):
    """Train one recipe (see ``kdkit run --help``); returns the run directory."""
    from kdkit.runner import run as _run

    return _run(recipe_path, overrides=overrides, out=out, **options)


def load(path):
    """Rebuild a trained student with its heads from ``student.safetensors`` or a run directory."""
    from kdkit.export import load as _load

    return _load(path)


def build_model(kind: str, **table):
    """Build a student or teacher from a recipe table, e.g. ``build_model("teacher", plugin="rednet", depth=26)``."""
    from kdkit.build import build_model as _build_model

    return _build_model(kind, **table)
