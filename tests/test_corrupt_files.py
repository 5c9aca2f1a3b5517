"""Every file kdkit wrote is checked when it is read back: a truncated, garbled or foreign checkpoint,
export, summary, recipe or teacher-output cache gives exit 2 and one line naming the file, and nothing
on disk changes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kdkit._cli import app

from conftest import TWO_TEACHER_RECIPE

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

@pytest.mark.parametrize("damage", [truncate, garble, lambda p: torch.save({"model": {}}, p)],
                         ids=["truncated", "garbled", "missing-keys"])
def test_a_damaged_last_checkpoint_is_refused_on_resume(damage, run_copy, cli):
    recipe, run = run_copy
    damage(run / "checkpoints" / "last.pt")
    before = snapshot(run)
    result = cli("run", recipe, "--out", run, "--resume", *FAST, "--allow-random-teachers")
    refused(result, f"{run / 'checkpoints' / 'last.pt'}: ")
    assert "--force" in result.output
    if damage is not truncate and damage is not garble:
        assert "not a kdkit training checkpoint (no optimizer, epoch" in result.output
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
    refused(cli("eval", run, "--allow-random-teachers"), message)
    teacher = recipe.read_text().replace('model = "test_resnet"\n', "", 1).replace(
        '[teachers.conv]\nplugin = "timm"\n', f'[teachers.conv]\ncheckpoint = "{export}"\n')
    (tmp_path / "student_teacher.toml").write_text(teacher)
    refused(cli("run", tmp_path / "student_teacher.toml", "--out", tmp_path / "out", *FAST,
                "--allow-random-teachers"), message)
    assert snapshot(run) == before and not (tmp_path / "out").exists()


def test_truncated_safetensors_weights_name_the_file(run_copy, tmp_path):
    from kdkit._checkpoint import read_state_dict
    from kdkit._errors import KdkitError

    weights = tmp_path / "weights.safetensors"
    shutil.copy(run_copy[1] / "student.safetensors", weights)
    truncate(weights)
    with pytest.raises(KdkitError, match=f"{weights}: cannot read the weights .*truncated or damaged"):
        read_state_dict(weights)


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
