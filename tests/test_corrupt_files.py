"""Every file kdkit wrote is checked when it is read back: a truncated, garbled or foreign checkpoint,
export, summary, recipe or teacher-output cache gives exit 2 and one line naming the file, and nothing
on disk changes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import kdkit
from kdkit.builder import teacher_cache
from kdkit.cli import app
from kdkit.errors import KdkitError

from conftest import TWO_TEACHER_RECIPE, make_trainer

FAST = ["-o", "train.epochs=1", "-o", "data.train_size=32"]  # two steps: seconds on a CPU


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def refused(result, message: str) -> None:
    """Exit 2 and exactly one line, which holds ``message``."""
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run (and its recipe), shared: tests corrupt copies of it."""
    root = tmp_path_factory.mktemp("finished")
    recipe = root / "two.toml"
    recipe.write_text(TWO_TEACHER_RECIPE)
    result = CliRunner().invoke(app, ["run", str(recipe), "--out", str(root / "run"), *FAST, "--allow-random-teachers"])
    assert result.exit_code == 0, result.output
    return recipe, root / "run"


@pytest.fixture
def run_copy(finished, tmp_path):
    recipe, run = finished
    shutil.copytree(run, tmp_path / "run")
    return recipe, tmp_path / "run"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[: 64] = bytes(range(200, 255)) + bytes(9)
    path.write_bytes(bytes(data))


# --- recipes ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("through_extends", [False, True])
def test_a_binary_recipe_or_extends_target_is_refused(through_extends, tmp_path, cli):
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"PK\x03\x04\x80\x81\xfe\xff not a recipe")
    recipe = binary
    if through_extends:
        recipe = tmp_path / "child.toml"
        recipe.write_text('extends = "binary.toml"\n')
    refused(cli("run", recipe, "--out", tmp_path / "out", "--allow-random-teachers"), f"{binary}: not a text file")
    assert not (tmp_path / "out").exists()


# --- checkpoints and exports ------------------------------------------------------------------------

def without_keys(path: Path) -> None:
    torch.save({"model": {}}, path)


def with_other_shapes(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    name = next(iter(state["model"]))
    state["model"][name] = torch.zeros(3, 3)
    torch.save(state, path)


@pytest.mark.parametrize("damage, message", [
    (truncate, "cannot read the checkpoint (PytorchStreamReader failed reading zip archive"),
    (garble, "cannot read the checkpoint ("),
    (without_keys, "not a kdkit training checkpoint (no optimizer, epoch"),
    (with_other_shapes, "the checkpoint's weights do not fit the run's model (1 tensors differ"),
], ids=["truncated", "garbled", "missing-keys", "other-shapes"])
def test_a_damaged_last_checkpoint_is_refused_on_resume(damage, message, run_copy, cli):
    recipe, run = run_copy
    damage(run / "checkpoints" / "last.pt")
    before = snapshot(run)
    result = cli("run", recipe, "--out", run, "--resume", *FAST, "--allow-random-teachers")
    refused(result, f"{run / 'checkpoints' / 'last.pt'}: {message}")
    assert "--force" in result.output
    assert snapshot(run) == before


def test_a_truncated_export_is_refused_by_predict_eval_and_as_a_teacher(run_copy, cli, tmp_path):
    recipe, run = run_copy
    export = run / "student.safetensors"
    truncate(export)
    before = snapshot(run)
    image = tmp_path / "image.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    message = f"{export}: cannot read the weights"
    refused(cli("predict", run, image), message)
    assert "train the run again (kdkit run --force)" in cli("predict", run, image).output
    refused(cli("eval", run, "--allow-random-teachers"), message)
    teacher = recipe.read_text().replace('model = "test_resnet"\n', "", 1).replace(
        '[teachers.conv]\nplugin = "timm"\n', f'[teachers.conv]\ncheckpoint = "{export}"\n')
    (tmp_path / "student_teacher.toml").write_text(teacher)
    refused(cli("run", tmp_path / "student_teacher.toml", "--out", tmp_path / "out", *FAST,
                "--allow-random-teachers"), message)
    assert snapshot(run) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("drop, missing", [("student", "student.plugin"), ("heads", "heads"),
                                           ("eval", "eval.heads")])
def test_export_metadata_without_what_load_needs_is_refused(drop, missing, run_copy, cli, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    export = run_copy[1] / "student.safetensors"
    with safe_open(str(export), "pt") as f:
        meta = json.loads(f.metadata()["kdkit"])
    damaged = tmp_path / "student.safetensors"
    save_file(load_file(str(export)), str(damaged), metadata={"kdkit": json.dumps({**meta, drop: None})})
    with pytest.raises(KdkitError, match=f"{damaged}: the kdkit metadata has no {missing}: the file is damaged"):
        kdkit.load(damaged)
    image = tmp_path / "image.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    refused(cli("predict", damaged, image), f"{damaged}: the kdkit metadata has no {missing}")


def test_truncated_safetensors_weights_name_the_file(run_copy, tmp_path):
    from kdkit.store.checkpoint import read_state_dict
    from kdkit.store.export import is_export

    weights = tmp_path / "weights.safetensors"
    shutil.copy(run_copy[1] / "student.safetensors", weights)
    truncate(weights)
    with pytest.raises(KdkitError, match=f"{weights}: cannot read the weights .*truncated or damaged; write or copy"):
        read_state_dict(weights)
    with pytest.raises(KdkitError, match=f"{weights}: cannot read the weights .*truncated or damaged; write or copy"):
        is_export(weights)  # how a teacher checkpoint is first looked at


def test_a_damaged_decoded_data_cache_is_refused(write_recipe, cli, tmp_path, monkeypatch):
    from PIL import Image

    from kdkit_plugins import datasets

    monkeypatch.setenv("KDKIT_CACHE", str(tmp_path / "cache"))
    for split in ("train", "test"):
        for label in ("cat", "dog"):
            (tmp_path / "tree" / split / label).mkdir(parents=True)
            for i in range(16):
                Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "tree" / split / label / f"{i}.png")
    datasets.cifar10(root=str(tmp_path / "tree"), image_size=32, augment=datasets.AugmentConfig(), num_classes=0)
    [decoded] = (tmp_path / "cache" / "decoded").glob("*.pt")
    truncate(decoded)
    before = snapshot(tmp_path / "cache")
    recipe = write_recipe(TWO_TEACHER_RECIPE.replace("train_size = 64\nval_size = 32\n", ""))
    result = cli("run", recipe, "--out", tmp_path / "out", "--allow-random-teachers", "-o", "data.dataset=cifar10",
                 "-o", f"data.root={tmp_path / 'tree'}", "-o", "data.num_classes=0")
    refused(result, f"{decoded}: cannot read the decoded-data cache")
    assert snapshot(tmp_path / "cache") == before and not (tmp_path / "out").exists()


# --- summaries --------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, message", [
    (b"\x80\x81\x00\xff" * 8, "cannot read the run's summary"),
    (b"[1, 2, 3]\n", "not a kdkit summary (a JSON list, not an object)"),
    (None, "not a kdkit summary (wrong type: top1 = "),
], ids=["binary", "list", "wrong-types"])
def test_a_damaged_summary_is_refused_by_compare(content, message, run_copy, cli):
    recipe, run = run_copy
    summary = run / "summary.json"
    if content is None:
        content = json.dumps({**json.loads(summary.read_text()), "top1": 5}).encode()
    summary.write_bytes(content)
    before = snapshot(run)
    refused(cli("compare", run), f"{summary}: {message}")
    assert snapshot(run) == before


# --- teacher-output caches --------------------------------------------------------------------------

CACHED = TWO_TEACHER_RECIPE.replace("train_size = 64", "train_size = 32") + """
[teacher_cache]
views = 3
"""


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory):
    """A recipe and its two teachers' caches (32 images x 3 views, chunks of 8), built once."""
    root = tmp_path_factory.mktemp("cached")
    recipe = root / "cached.toml"
    recipe.write_text(CACHED)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KDKIT_CACHE", str(root / "cache"))
        patch.setattr(teacher_cache, "CHUNK", 8)
        result = CliRunner().invoke(app, ["cache", "build", str(recipe), "--allow-random-teachers"])
    assert result.exit_code == 0, result.output
    return recipe, root / "cache"


@pytest.fixture
def cache(built_cache, tmp_path, monkeypatch):
    """A copy of the built caches, in use: the recipe and the conv teacher's cache folder."""
    recipe, cache = built_cache
    shutil.copytree(cache, tmp_path / "cache")
    monkeypatch.setenv("KDKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(teacher_cache, "CHUNK", 8)
    [conv] = (tmp_path / "cache" / "teacher_outputs").glob("conv-*")
    return recipe, conv


def half_the_rows(path: Path) -> None:
    np.save(path, np.load(path)[:16])


def as_float64(path: Path) -> None:
    np.save(path, np.load(path).astype(np.float64))


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("file, damage, message", [
    ("logits.npy", truncate, "logits.npy: cannot read the array"),
    ("logits.npy", garble, "logits.npy: cannot read the array"),
    ("logits.npy", half_the_rows, "logits.npy: holds float16 (16, 3, 4), the key needs float16 (32, 3, 4)"),
    ("logits.npy", as_float64, "logits.npy: holds float64 (32, 3, 4), the key needs float16 (32, 3, 4)"),
    ("key.json", garble, "key.json: cannot read it"),
    ("complete.json", truncate, "complete.json: cannot read it"),
    ("chunks/3.done", garble, "3.done: cannot read it"),
], ids=["truncated", "bad-header", "half-the-rows", "float64", "key", "complete", "chunk-marker"])
def test_a_damaged_cache_is_refused_in_one_line(file, damage, message, cache, cli, tmp_path):
    recipe, conv = cache
    damage(conv / file)
    before = snapshot(conv.parent)
    verb = "run" if file != "chunks/3.done" else "cache"  # a chunk marker is read when the chunk is checked
    args = (["run", recipe, "--out", tmp_path / "out"] if verb == "run" else ["cache", "build", recipe, "--verify"])
    result = cli(*args, "--allow-random-teachers")
    refused(result, message)
    assert "the teacher-output cache is damaged" in result.output
    assert snapshot(conv.parent) == before and not (tmp_path / "out").exists()


def test_a_chunk_that_does_not_match_its_checksum_is_refused(cache, cli):
    recipe, conv = cache
    verified = cli("cache", "build", recipe, "--verify", "--allow-random-teachers")
    assert verified.exit_code == 0 and "every chunk verified" in verified.output, verified.output
    flip_last_byte(conv / "logits.npy")  # a value of the last image: chunk 3
    before = snapshot(conv.parent)
    message = "logits.npy: chunk 3 (images 24-31) does not match the checksum recorded when it was written (logits)"
    refused(cli("cache", "build", recipe, "--verify", "--allow-random-teachers"), message)
    trainer = make_trainer(recipe)  # opening does not read every chunk: a first read of each does
    trainer.distill_step.cached_teacher_logits(torch.tensor([0, 9]), torch.tensor([0, 2]), 1.0)
    with pytest.raises(KdkitError, match=message.replace("(", r"\(").replace(")", r"\)")):
        trainer.distill_step.cached_teacher_logits(torch.tensor([1, 31]), torch.tensor([0, 1]), 1.0)
    assert snapshot(conv.parent) == before


def test_a_cache_built_before_checksums_stays_readable(cache, cli):
    recipe, conv = cache
    for marker in (conv / "chunks").glob("*.done"):  # what an earlier kdkit wrote: the seconds alone
        marker.write_text(f"{json.loads(marker.read_text())['seconds']:.3f}")
    result = cli("cache", "build", recipe, "--verify", "--allow-random-teachers")
    assert result.exit_code == 0, result.output
    assert "conv: " in result.output and "4 chunks built before checksums were recorded: not verified" in result.output
    cached = make_trainer(recipe).distill_step.cached_teacher_logits(torch.tensor([3, 30]), torch.tensor([1, 2]), 1.0)["conv"]
    stored = np.load(conv / "logits.npy")[[3, 30], [1, 2]]
    torch.testing.assert_close(cached, torch.from_numpy(stored).float(), rtol=0, atol=0)


@pytest.mark.parametrize("content, message", [
    (b"\x80\x81\x00\xff\n", "cannot read the run's per-epoch metrics ("),
    (b'{"epoch": 1}\n', "cannot read the run's per-epoch metrics (no 'top1')"),
    (b'{"epoch": "one", "top1": {"eval": 50.0}}\n', "not kdkit metrics (an epoch or top1.eval of the wrong type)"),
], ids=["binary", "missing-key", "wrong-type"])
def test_damaged_metrics_are_refused_by_compare_curves_before_anything_is_written(content, message, run_copy, cli,
                                                                                 tmp_path):
    recipe, run = run_copy
    (run / "metrics.jsonl").write_bytes(content)
    before = snapshot(run)
    result = cli("compare", run, "--markdown", tmp_path / "t.md", "--curves", tmp_path / "curves.png")
    refused(result, f"{run / 'metrics.jsonl'}: {message}")
    assert snapshot(run) == before and not (tmp_path / "t.md").exists() and not (tmp_path / "curves.png").exists()

