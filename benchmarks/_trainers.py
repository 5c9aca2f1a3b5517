"""What the benchmarks share: a kdkit Trainer of recipe text, built by ``kdkit.build`` as ``kdkit run`` builds it."""
from __future__ import annotations

import textwrap
from pathlib import Path

import torch

import kdkit
from kdkit.train.loop import Trainer
from kdkit.plugin.discovery import default_plugins
from kdkit.store.rundir import RunDir


def trainer_from_recipe(text: str, folder: Path, name: str, device: torch.device = torch.device("cpu")) -> Trainer:
    """The Trainer of recipe ``text`` (random teachers allowed, teacher-output caches built where missing);
    nothing is written but the recipe file (and a cache the recipe reads)."""
    path = folder / f"{name}.toml"
    path.write_text(textwrap.dedent(text))
    built = kdkit.build(path, train_teachers=True, allow_random_teachers=True, device=device)
    return Trainer(built, rundir=RunDir(folder / name), hook=default_plugins().manager.hook)
