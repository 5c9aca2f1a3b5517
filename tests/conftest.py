"""Shared fixtures: tiny recipes on fake data, and the CLI runner."""
from __future__ import annotations

import os
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import kdkit
from kdkit.cli import app
from kdkit.plugin.discovery import Plugins, default_plugins
from kdkit.store.rundir import RunDir
from kdkit.train.loop import Trainer
from kdkit_plugins import involution_fused

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# One thread per test process, and per kdkit process a test starts: the models are tiny, and
# pytest-xdist runs one test process per core (threads on top of that only wait for each other).
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"


def pytest_sessionstart(session):
    """The fused involution's first build takes most of a minute on a new machine: it starts at once, beside
    the first tests, rather than inside the first test that needs it (each process waits for one build)."""
    threading.Thread(target=involution_fused.load, daemon=True).start()


def pytest_collection_modifyitems(items):
    """The end-to-end tests (``slow``) first: under pytest-xdist the long ones then start at once, and the
    short ones fill in around them."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """Every test process writes trained teachers and decoded data under its own ``$KDKIT_CACHE``, never the
    user's (tests that need a cache of their own still set one)."""
    os.environ["KDKIT_CACHE"] = str(tmp_path_factory.mktemp("kdkit-cache"))

# Two timm teachers, one timm student with three heads on its pooled embedding: seconds on a CPU.
TWO_TEACHER_RECIPE = """
seed = 0

[data]
dataset = "fake"
image_size = 32
num_classes = 4
train_size = 64
val_size = 32
batch_size_eval = 32
workers = 0

[student]
plugin = "timm"
model = "test_vit"
model_kwargs = { img_size = 32 }

[teachers.conv]
plugin = "timm"
model = "test_resnet"

[teachers.other]
plugin = "timm"
model = "test_efficientnet"

[heads.cls]
embedding = "pool"

[heads.conv]
embedding = "pool"

[heads.inv]
embedding = "pool"

[[losses]]
plugin = "ce"
head = "cls"

[[losses]]
plugin = "kl"
head = "conv"
teachers = ["conv"]

[[losses]]
plugin = "kl"
head = "inv"
teachers = ["other"]

[train]
epochs = 2
batch_size = 16
lr = 1e-3
warmup_epochs = 1

[augment]
mixup = 0.8
cutmix = 1.0
label_smoothing = 0.1

[eval]
heads = ["cls", "conv", "inv"]
"""


@pytest.fixture
def write_recipe(tmp_path):
    """Write a recipe file (dedented) into the test's temp dir and return its path."""

    def write(text: str, name: str = "recipe.toml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


@pytest.fixture
def cli():
    """Invoke the kdkit CLI in-process; returns typer's Result (exit_code, output)."""
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args])

    return invoke


def make_trainer(recipe_path, overrides=(), *, train_teachers: bool = True, device: str = "cpu",
                 plugins=None) -> Trainer:
    """A Trainer for a recipe (random teachers allowed) built by ``kdkit.build``, its missing teachers and
    teacher-output caches made first; no run directory. ``plugins`` gives the hooks (default: kdkit's)."""
    built = kdkit.build(recipe_path, overrides, train_teachers=train_teachers, allow_random_teachers=True,
                        device=device)
    return Trainer(built, rundir=RunDir(recipe_path.parent / "unused"),
                   hook=(plugins or default_plugins()).manager.hook)


def plugins_with(*objects) -> Plugins:
    """The installed plugins and these hook implementations (not registered anywhere else)."""
    plugins = Plugins()
    plugins.load_entry_points()
    for obj in objects:
        plugins.manager.register(obj)
    return plugins


def make_distribution(root, name: str, modules: dict[str, str], entry_points: dict[str, str]):
    """An installed-looking distribution in ``root``: its modules and a dist-info with entry_points.txt."""
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{name.replace('-', '_')}-1.0.dist-info"  # the wheel convention: no dash in the name
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[kdkit]\n{lines}\n")


def contributing_example(filename: str, doc: str = "CONTRIBUTING.md") -> str:
    """The code block of ``doc`` whose first line is ``# <filename>``: the docs' examples run as tests."""
    text = (Path(__file__).resolve().parents[1] / doc).read_text()
    for block in text.split("```python\n")[1:]:
        code = block.split("```")[0]
        if code.startswith(f"# {filename}\n"):
            return code
    raise LookupError(f"{doc} has no python block starting with '# {filename}'")
