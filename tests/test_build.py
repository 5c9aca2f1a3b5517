"""``kdkit.build``: a recipe built as ``kdkit run`` builds it, nothing written, its step callable from a notebook."""
from __future__ import annotations

import ast
import contextlib
import io
import json
import math
import os
import tomllib
from pathlib import Path

import pytest
import torch

import kdkit
from kdkit.errors import KdkitError

from conftest import TWO_TEACHER_RECIPE, contributing_example

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_notebook_example_trains_the_quickstart_student(monkeypatch):
    monkeypatch.chdir(ROOT)
    printed = io.StringIO()
    namespace = {}
    with contextlib.redirect_stdout(printed):
        exec(contributing_example("notebook.py", doc="README.md"), namespace)
    lines = printed.getvalue().splitlines()
    assert len(lines) == 4  # 64 images in batches of 16
    for step, line in enumerate(lines):
        number, logged = line.split(" ", 1)
        logged = ast.literal_eval(logged)  # the printed dict
        assert int(number) == step and set(logged) == {"loss", "ce/cls", "kl/conv", "kl/inv"}
        assert all(math.isfinite(v) for v in logged.values())
        assert logged["loss"] == pytest.approx(logged["ce/cls"] + logged["kl/conv"] + logged["kl/inv"], rel=1e-5)
    built = namespace["built"]
    assert built.step.optimizer.state  # the optimizer has stepped: Adam's moments exist
    assert built.step.optimizer.param_groups[0]["lr"] == built.experiment.train.lr  # no schedule outside a run


def files_under(*folders: Path) -> set[Path]:
    return {p for folder in folders if folder.exists() for p in folder.rglob("*")}


def test_building_writes_nothing(write_recipe, tmp_path):
    recipe = write_recipe(TWO_TEACHER_RECIPE)
    cache = Path(os.environ["KDKIT_CACHE"])
    before = files_under(tmp_path, cache)
    built = kdkit.build(recipe, allow_random_teachers=True)
    assert set(built.teachers) == {"conv", "other"} and set(built.model.heads) == {"cls", "conv", "inv"}
    images, labels = next(iter(built.loaders.train))
    built.step(images, labels, epoch=0, step=0)
    assert files_under(tmp_path, cache) == before


def test_a_recipe_given_as_a_dict_builds_as_its_file_does(write_recipe, monkeypatch, tmp_path):
    path = write_recipe(TWO_TEACHER_RECIPE)
    table = tomllib.loads(TWO_TEACHER_RECIPE)
    monkeypatch.chdir(tmp_path)  # a dict's relative paths are the working directory's
    from_file, from_dict = (kdkit.build(source, ["train.batch_size=8"], allow_random_teachers=True)
                            for source in (path, {**table, "name": path.stem}))
    assert from_dict.experiment.recipe.table == from_file.experiment.recipe.table
    images, labels = next(iter(from_file.loaders.train))
    assert from_dict.step(images, labels, epoch=0, step=0).logged == from_file.step(images, labels, epoch=0, step=0).logged
    assert kdkit.build(table, allow_random_teachers=True).experiment.name == "recipe"


def test_a_dict_that_no_toml_file_can_hold_is_refused_naming_it():
    with pytest.raises(KdkitError, match=r"<recipe dict>: not a TOML table"):
        kdkit.build({"name": "x", "train": {"lr": object()}})


def test_an_untrained_teacher_or_an_unbuilt_cache_is_refused_naming_what_makes_it(write_recipe):
    teacher = write_recipe(TWO_TEACHER_RECIPE.split("[teachers.conv]")[0] + '[[losses]]\nplugin = "ce"\nhead = "pool"\n',
                           "teacher.toml")
    student = write_recipe(TWO_TEACHER_RECIPE.replace('[teachers.conv]\nplugin = "timm"\nmodel = "test_resnet"\n',
                                                      f'[teachers.conv]\nrecipe = "{teacher.name}"\n'))
    with pytest.raises(KdkitError, match=r"teachers.conv.recipe: teacher not trained yet .*kdkit.build: with "
                                         r"train_teachers=True"):
        kdkit.build(student, allow_random_teachers=True)
    cached = write_recipe(TWO_TEACHER_RECIPE + "\n[teacher_cache]\nviews = 2\n", "cached.toml")
    with pytest.raises(KdkitError, match=r"the teacher-output cache of 'conv' is not built yet \(kdkit cache build "):
        kdkit.build(cached, ["augment.mixup=0.0", "augment.cutmix=0.0"], allow_random_teachers=True)
    built = kdkit.build(cached, ["augment.mixup=0.0", "augment.cutmix=0.0"], train_teachers=True,
                        allow_random_teachers=True)
    assert set(built.step.teacher_outputs) == {"conv", "other"}
    assert torch.is_tensor(next(iter(built.loaders.train))[2])  # the cache's views come with each batch


def test_check_prints_the_parts_sizes_and_the_teachers_to_train_and_writes_nothing(write_recipe, tmp_path, cli):
    teacher = write_recipe(TWO_TEACHER_RECIPE.split("[teachers.conv]")[0] + '[[losses]]\nplugin = "ce"\nhead = "pool"\n',
                           "teacher.toml")
    recipe = write_recipe(TWO_TEACHER_RECIPE.replace('[teachers.conv]\nplugin = "timm"\nmodel = "test_resnet"\n',
                                                     f'[teachers.conv]\nrecipe = "{teacher.name}"\n'))
    before = files_under(tmp_path, Path(os.environ["KDKIT_CACHE"]))
    shown = cli("check", recipe, "-o", "train.epochs=7", "--allow-random-teachers")
    assert shown.exit_code == 0, shown.output
    assert "epochs = 7" in shown.output and "│ heads.inv " in shown.output and "student multiply-adds per image: " in shown.output
    assert "kdkit run would first train teacher 'conv' into " in shown.output
    report = json.loads(cli("check", recipe, "--allow-random-teachers", "--json").output)
    built = kdkit.build(recipe, ['teachers.conv = { plugin = "timm", model = "test_resnet" }'],
                        allow_random_teachers=True)
    assert report["params"] == {"student": sum(p.numel() for p in built.model.student.parameters()),
                                **{f"heads.{n}": sum(p.numel() for p in h.parameters()) for n, h in built.model.heads.items()},
                                "teachers.other": sum(p.numel() for p in built.teachers["other"].model.parameters())}
    assert list(report["teachers_to_train"]) == ["conv"] and report["flops"] > 0
    assert files_under(tmp_path, Path(os.environ["KDKIT_CACHE"])) == before
    refused = cli("check", recipe, "-o", "train.lr=-1")
    assert refused.exit_code == 2 and "train.lr" in refused.output and "Traceback" not in refused.output
