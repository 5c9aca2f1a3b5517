"""The CIFAR-10 study v2 reproduces from its one command (docs/results/cifar10-v2/README.md): here the
same recipes and command on fake data with tiny settings, so that CI keeps the command working."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdkit.cli import app

RECIPES = Path(__file__).parents[1] / "recipes" / "cifar10_v2"
ROWS = ["no_kd", "conv_only", "inv_only", "two_conv", "one_token_sum", "one_token_mean_prob", "civt", "two_inv"]
TINY_DATA = """
seed = 0

[data]
dataset = "fake"
image_size = 32
num_classes = 10
train_size = 64
val_size = 40
val_split = 0.25
batch_size_eval = 40
workers = 0

[train]
batch_size = 16
lr = 2e-3

[augment]
crop_scale = [0.35, 1.0]
label_smoothing = 0.1
"""


@pytest.mark.slow
def test_the_study_command_trains_teachers_caches_and_students_and_writes_the_tables(tmp_path, monkeypatch):
    recipes = tmp_path / "cifar10_v2"
    shutil.copytree(RECIPES, recipes)
    (recipes / "_data.toml").write_text(TINY_DATA)  # the rest of the recipes exactly as shipped
    for name, epochs in (("teachers/_teacher.toml", 1), ("_student.toml", 1)):
        path = recipes / name
        path.write_text(re.sub(r"\nepochs = \d+", f"\nepochs = {epochs}", path.read_text()))
    out = tmp_path / "results"
    command = [sys.executable, "-m", "kdkit", "compare", *(str(recipes / f"{row}.toml") for row in ROWS),
               "--seeds", "0,1", "--runs", str(tmp_path / "runs"), "--jobs", "2", "--baseline", "civt",
               "--markdown", str(out / "comparison.md"), "--csv", str(out / "comparison.csv"),
               "--plot", str(out / "comparison.png"), "--allow-weak-teachers"]  # fake data: chance-level teachers
    env = {**os.environ, "KDKIT_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wall time of what trained: teachers" in result.stderr and "students" in result.stderr
    rows = {r["recipe"]: r for r in csv.DictReader((out / "comparison.csv").open())}
    assert list(rows) == ROWS and all(r["seeds"] == "0 1" for r in rows.values())
    assert rows["civt"]["teacher_conv_top1"] and rows["two_inv"]["teacher_inv2_top1"]
    assert (rows["civt"]["teacher_conv_model"], rows["civt"]["teacher_inv_model"]) == ("resnet10t", "rednet26 x0.25")
    assert rows["no_kd"]["diff_pairs"] == "2" and rows["civt"]["diff_pairs"] == ""
    caches = list((tmp_path / "cache" / "teacher_outputs").iterdir())
    assert len(caches) == 4  # conv, conv2 (seed 1), inv, inv2: built once, shared by every row and seed
    summary = json.loads((tmp_path / "runs" / "civt" / "seed1" / "summary.json").read_text())
    assert summary["best_selected_on"] == "validation" and summary["best_test_top1"] is not None
    assert set(summary["teacher_cache"]) == {"conv", "inv"}

    monkeypatch.setenv("KDKIT_CACHE", env["KDKIT_CACHE"])
    again = CliRunner().invoke(app, command[3:])  # nothing left to train (in this process: it only reads)
    assert again.exit_code == 0 and "wall time of what trained" not in again.output
