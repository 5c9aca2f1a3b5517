"""What the benchmarks share: a kdkit Trainer built from recipe text, as ``kdkit run`` builds it."""
from __future__ import annotations

import textwrap
from pathlib import Path

import torch

from kdkit._engine import Trainer
from kdkit._experiment import resolve
from kdkit._plugins import default_plugins
from kdkit._recipe import load_recipe
from kdkit._run import prepare
from kdkit._rundir import RunDir


def trainer_from_recipe(text: str, folder: Path, name: str, device: torch.device = torch.device("cpu")) -> Trainer:
    """The Trainer of recipe ``text`` (random teachers allowed); nothing is written but the recipe file."""
    path = folder / f"{name}.toml"
    path.write_text(textwrap.dedent(text))
    plugins = default_plugins()
    exp = resolve(load_recipe(path), plugins, allow_random_teachers=True)
    parts = prepare(exp, plugins, device, train_teachers=False)
    return Trainer(exp, parts, device=device, rundir=RunDir(folder / name), hook=plugins.manager.hook, summary={})
