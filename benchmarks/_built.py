"""What the benchmarks share: a recipe's text built by ``kdkit.build``, as ``kdkit run`` builds it."""
from __future__ import annotations

import textwrap
from pathlib import Path

import torch

import kdkit

CIVT_KL = """
[[losses]]
plugin = "kl"
head = "conv"
teachers = ["conv"]
[[losses]]
plugin = "kl"
head = "inv"
teachers = ["inv"]
"""  # CivT's two distillation terms, one per distillation token and teacher


def built_from_recipe(text: str, folder: Path, name: str, device: torch.device = torch.device("cpu")):
    """``kdkit.build`` of recipe ``text`` (random teachers allowed, teacher-output caches built where missing);
    nothing is written but the recipe file (and a cache the recipe reads)."""
    path = folder / f"{name}.toml"
    path.write_text(textwrap.dedent(text))
    return kdkit.build(path, train_teachers=True, allow_random_teachers=True, device=device)


def train_epoch(built, epoch: int) -> None:
    """One epoch of the built step over the built training loader, as a run trains it (no hooks, no schedule)."""
    built.model.train()
    built.loaders.sampler.set_epoch(epoch)
    for step, (images, labels, *views) in enumerate(built.loaders.train):
        built.step(images, labels, epoch=epoch, step=step, views=views or None)
