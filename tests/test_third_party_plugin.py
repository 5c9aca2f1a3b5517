"""A third-party plugin package: built in a temp dir, installed with pip --target, found by entry point.

It holds a teacher and a loss written here, and the EMA callback exactly as CONTRIBUTING.md shows it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import contributing_example

PYPROJECT = """
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "kdkit-tiny-plugin"
version = "0.1.0"

[project.entry-points.kdkit]
tiny = "kdkit_tiny"
ema = "kdkit_ema"

[tool.setuptools]
py-modules = ["kdkit_tiny", "kdkit_ema"]
"""

MODULE = '''
"""A third-party kdkit plugin: one teacher and one loss."""
import torch
import torch.nn.functional as F
from torch import nn

from kdkit import api


def tiny_cnn(*, num_classes: int, in_chans: int = 3, width: int = 8):
    """A two-layer CNN teacher."""
    return nn.Sequential(nn.Conv2d(in_chans, width, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


def logit_mse(*, scale: float = 1.0):
    """Mean squared error between student and mean teacher logits."""
    def loss(logits, *, target, labels, teacher_logits):
        return scale * F.mse_loss(logits.float(), torch.stack(teacher_logits).mean(0))
    loss.requires_teachers = True
    return loss


@api.hookimpl
def kdkit_register_teachers(registry):
    registry.register_module("tiny_cnn", module=tiny_cnn)


@api.hookimpl
def kdkit_register_losses(registry):
    registry.register_module("logit_mse", module=logit_mse)
'''

RECIPE = """
[data]
dataset = "fake"
image_size = 32
num_classes = 4
train_size = 32
val_size = 16
workers = 0

[student]
plugin = "timm"
model = "test_resnet"

[teachers.tiny]
plugin = "tiny_cnn"
width = 4

[[losses]]
plugin = "ce"
head = "pool"

[[losses]]
plugin = "logit_mse"
head = "pool"
teachers = ["tiny"]
scale = 0.5

[train]
epochs = 2
batch_size = 16

[eval]
heads = ["pool"]

[callbacks.ema]
decay = 0.5
"""


pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("third_party")]  # one pip install


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The plugin package installed into its own folder, nothing leaking into the environment."""
    root = tmp_path_factory.mktemp("plugin")
    source = root / "src"
    source.mkdir()
    (source / "pyproject.toml").write_text(textwrap.dedent(PYPROJECT))
    (source / "kdkit_tiny.py").write_text(MODULE)
    (source / "kdkit_ema.py").write_text(contributing_example("kdkit_ema.py"))
    target = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet",
                    "--target", str(target), str(source)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))}
    return root, env


def kdkit(*args, env, cwd):
    return subprocess.run([sys.executable, "-m", "kdkit", *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True)


def test_plugins_lists_the_third_party_names(installed):
    root, env = installed
    result = kdkit("plugins", "--json", env=env, cwd=root)
    assert result.returncode == 0, result.stderr
    rows = {(r["kind"], r["name"]): r for r in json.loads(result.stdout)}
    assert rows[("teacher", "tiny_cnn")]["distribution"] == "kdkit-tiny-plugin"
    assert rows[("loss", "logit_mse")]["keys"] == [{"key": "scale", "type": "float", "default": 1.0}]
    assert rows[("loss", "kl")]["distribution"] == "kdkit"
    assert rows[("callback", "ema")]["keys"] == [{"key": "decay", "type": "float", "default": 0.9998}]


def test_a_recipe_uses_the_third_party_teacher_loss_and_callback(installed):
    root, env = installed
    (root / "recipe.toml").write_text(RECIPE)
    result = kdkit("run", "recipe.toml", "--out", "out", "--allow-random-teachers", env=env, cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [json.loads(line) for line in (root / "out" / "metrics.jsonl").read_text().splitlines()]
    assert set(rows[0]["train"]) == {"loss", "ce/pool", "logit_mse/pool"}
    assert all(0 <= row["top1"]["ema"] <= 100 for row in rows)  # the EMA model, evaluated every epoch
    summary = json.loads((root / "out" / "summary.json").read_text())
    assert summary["status"] == "completed" and "tiny" in summary["teacher_top1"]
    assert summary["top1"]["ema"] == rows[-1]["top1"]["ema"]
    checkpoint = torch.load(root / "out" / "checkpoints" / "last.pt", weights_only=True)
    ema, model = checkpoint["plugins"]["ema"], checkpoint["model"]
    assert ema.keys() == model.keys()
    assert not torch.equal(ema["heads.pool.weight"], model["heads.pool.weight"])  # an average, not a copy


def test_the_plugin_is_invisible_without_its_path(installed, cli):
    result = cli("plugins", "--json")  # this process: its path lacks the plugin's folder
    assert result.exit_code == 0 and any(r["name"] == "kl" for r in json.loads(result.stdout))
    assert all(r["name"] != "tiny_cnn" for r in json.loads(result.stdout))
