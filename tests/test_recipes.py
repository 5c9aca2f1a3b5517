"""Every recipe under recipes/ validates as written, and trains one step on fake data at reduced size.

Partial recipes (``_*.toml``) only exist to be extended and are checked through the recipes that do.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest

import kdkit
from kdkit.plugin.discovery import default_plugins
from kdkit.recipe.experiment import resolve
from kdkit.recipe.toml import load_recipe

RECIPES = sorted(p for p in (Path(__file__).parents[1] / "recipes").rglob("*.toml") if not p.name.startswith("_"))
FAKE_DATA = ('data={ dataset = "fake", image_size = 32, num_classes = 10, train_size = 16, val_size = 8, '
             'batch_size_eval = 8, workers = 0 }')
SMALL_STUDENT = {  # the same families, shrunk so one step takes a moment on a CPU
    "vit": ["student.patch_size=8", "student.depth=1", "student.embed_dim=48", "student.num_heads=3"],
    "mixer": ["student.patch_size=8", "student.depth=1", "student.embed_dim=48"],
    "rednet": ["student.width=0.25"],
}


def test_there_are_recipes():
    assert len(RECIPES) > 30 and any(p.name == "quickstart.toml" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(p.parents[1])) for p in RECIPES])
def test_recipe_validates_and_trains_one_step(path):
    exp = resolve(load_recipe(path), default_plugins())  # as written, teacher recipes included
    overrides = [FAKE_DATA, "train.batch_size=8", "train.accum_steps=1", *SMALL_STUDENT.get(exp.student.plugin, [])]
    overrides += [f'teachers.{name}={{ plugin = "timm", model = "test_resnet" }}' for name in exp.teachers]
    built = kdkit.build(path, overrides, train_teachers=True, allow_random_teachers=True)  # caches built if read
    built.loaders.sampler.set_epoch(0)
    images, labels, *views = next(iter(built.loaders.train))
    logged = built.step(images, labels, epoch=0, step=0, views=views or None).logged
    assert set(logged) == {"loss", *(term.name for term in built.experiment.losses)}
    assert all(math.isfinite(value) for value in logged.values()), logged
