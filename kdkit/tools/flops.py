"""``kdkit flops``: the student's multiply-adds per image, of a finished run or of a recipe, without training."""
from __future__ import annotations

from pathlib import Path

import torch

from kdkit.builder.flops import FlopCount
from kdkit.builder.parts import build_splits, build_student
from kdkit.errors import KdkitError
from kdkit.plugin.discovery import default_plugins
from kdkit.recipe.experiment import resolve
from kdkit.recipe.toml import load_recipe
from kdkit.store.export import load
from kdkit.store.rundir import RunDir
from kdkit.train.run import student_flops


def target_flops(target: Path, overrides=()) -> FlopCount:
    """A run directory's student as exported (no data needed), or a recipe's as built (``overrides`` applied):
    for its image size and channels, counted on the eval prediction as ``summary.json``'s ``flops`` is."""
    plugins = default_plugins()
    target = Path(target)
    if target.is_dir():
        rundir = RunDir(target)
        if not rundir.export.is_file():
            raise KdkitError(f"{target}: no {rundir.export.name}: the run has not finished (count its recipe "
                             f"instead: kdkit flops {rundir.recipe})")
        model = load(rundir.export)
        return student_flops(model, model.meta["in_chans"], model.meta["image_size"], plugins)
    exp = resolve(load_recipe(target, list(overrides)), plugins, allow_random_teachers=True)  # no teacher is built
    torch.manual_seed(exp.seed)
    model, meta = build_student(exp, plugins, build_splits(exp, plugins), torch.device("cpu"))
    return student_flops(model, meta["in_chans"], meta["image_size"], plugins)
