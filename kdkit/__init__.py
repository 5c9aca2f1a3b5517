"""kdkit: plugin-based multi-teacher knowledge distillation for PyTorch vision models.

The user API is here (``run``, ``build``, ``load``, ``build_model``, ``count_flops``); plugins use ``kdkit.api``.
"""
from __future__ import annotations

import warnings

__version__ = "0.1.0"

__all__ = ["__version__", "build", "build_model", "count_flops", "load", "run"]


def run(recipe_path, overrides=(), out=None, *, force: bool = False, resume: bool = False,
        allow_changes: bool = False, allow_random_teachers: bool = False, allow_weak_teachers: bool = False,
        train_teachers: bool = True, progress: bool = False, console=None, callbacks=()):
    """Train one recipe as ``kdkit run`` does; returns the run directory.

    ``overrides``: ``key.path=value`` strings (``-o``); ``out``: the run directory (default
    ``runs/<name>/seed<seed>``); ``force`` overwrites a kdkit run there; ``resume`` continues it from its
    last checkpoint (``allow_changes``: with a changed recipe or teachers); ``allow_random_teachers`` and
    ``allow_weak_teachers`` accept teachers at chance; ``train_teachers=False`` refuses to train a
    teacher its recipe has not trained yet; ``progress`` shows progress (otherwise nothing prints) and
    ``console`` (a rich Console) receives messages about teachers being trained;
    ``callbacks``: objects whose ``@kdkit.api.hookimpl`` methods join this run, as a recipe's
    ``[callbacks]`` do (a logger made in a notebook)."""
    from kdkit.train.run import run as _run

    return _run(recipe_path, overrides, out, force=force, resume=resume, allow_changes=allow_changes,
                allow_random_teachers=allow_random_teachers, allow_weak_teachers=allow_weak_teachers,
                train_teachers=train_teachers, progress=progress, console=console, callbacks=callbacks)


def build(recipe, overrides=(), *, train_teachers: bool = False, allow_random_teachers: bool = False, device=None):
    """A recipe (a file, or its table as a dict) checked and built as ``kdkit run`` builds it, writing
    nothing: ``.model``, ``.teachers``, ``.loaders`` and ``.step``, the distillation step (``step(images, labels, epoch=, step=)`` makes one
    optimizer update and returns its loss terms). A teacher its recipe has not trained yet, or a
    teacher-output cache not built yet, is an error naming the command that makes it, unless
    ``train_teachers``."""
    from kdkit.builder.build import build as _build

    return _build(recipe, overrides, train_teachers=train_teachers,
                  allow_random_teachers=allow_random_teachers, device=device)


def load(path):
    """Rebuild a trained student with its heads from ``student.safetensors`` or a run directory."""
    from kdkit.store.export import load as _load

    return _load(path)


def build_model(kind: str, **table):
    """Build a student or teacher from a recipe table, e.g. ``build_model("teacher", plugin="rednet", depth=26)``."""
    from kdkit.builder.parts import build_model as _build_model

    return _build_model(kind, **table)


def count_flops(model, image):
    """Multiply-adds of ``image`` (a batch of one) through ``model``, with every installed plugin's rules (the
    involution's...): ``.total`` (None when the tracer cannot follow the model) and ``.unsupported``, the
    operators no rule counts. A kdkit student with its heads is counted on its eval prediction, as
    ``summary.json``'s ``flops`` is."""
    from kdkit.builder.flops import count_flops as _count_flops
    from kdkit.builder.flops import plugin_rules
    from kdkit.builder.model import DistillModel, Predictor
    from kdkit.plugin.discovery import default_plugins

    model = Predictor(model) if isinstance(model, DistillModel) else model
    return _count_flops(model, image, plugin_rules(default_plugins().manager.hook))


def __getattr__(name: str):
    if name == "hookimpl":  # where 0.1's plugins imported it from
        warnings.warn("kdkit.hookimpl is deprecated: use kdkit.api.hookimpl", DeprecationWarning, stacklevel=2)
        from kdkit.api import hookimpl

        return hookimpl
    raise AttributeError(f"module 'kdkit' has no attribute {name!r}")
