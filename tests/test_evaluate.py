"""``kdkit eval``: per-head top-1 and KL(teacher || head) on the run's own validation set, and the figure."""
from __future__ import annotations

import json
import math
import shutil

import pytest

import kdkit
from kdkit.recipe.toml import load_recipe

from test_compare import OVERRIDES, PNG_MAGIC, two_teacher_recipe


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One completed run with random teachers (eval rebuilds them from the run's seed), shared."""
    root = tmp_path_factory.mktemp("eval")
    return kdkit.run(two_teacher_recipe(root), OVERRIDES, out=root / "out", allow_random_teachers=True)


def test_eval_reproduces_the_runs_numbers(finished_run, cli, tmp_path):
    out = tmp_path / "eval.json"
    result = cli("eval", finished_run, "--allow-random-teachers", "--json", out, "--figure", tmp_path / "f.png",
                 "--images", "2")
    assert result.exit_code == 0, result.output
    assert "KL(conv ‖ head)" in result.output and "head inv" in result.output and "teacher other" in result.output
    numbers = json.loads(out.read_text())
    summary = json.loads((finished_run / "summary.json").read_text())
    assert numbers["images"] == 32
    assert numbers["top1"] == pytest.approx(summary["top1"])  # every head and eval: same model, same val set
    assert numbers["teacher_top1"] == pytest.approx(summary["teacher_top1"])  # the same random teachers
    assert set(numbers["kl"]) == set(summary["top1"])
    for head, row in numbers["kl"].items():
        assert set(row) == {"conv", "other"}
        assert all(value >= 0 and math.isfinite(value) for value in row.values()), head
    png = (tmp_path / "f.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 1000


def test_teachers_without_weights_are_an_error(finished_run, cli, tmp_path):
    random = cli("eval", finished_run)
    assert random.exit_code == 2 and "the run used random teachers" in random.output
    assert "--allow-random-teachers" in random.output

    moved = tmp_path / "moved"  # a run whose teacher checkpoint has gone
    shutil.copytree(finished_run, moved)
    recipe = load_recipe(moved / "recipe.toml")
    recipe.table["teachers"]["conv"]["checkpoint"] = str(tmp_path / "gone.pt")
    (moved / "recipe.toml").write_text(recipe.to_toml())
    gone = cli("eval", moved)
    assert gone.exit_code == 2 and "teachers.conv.checkpoint: no such file or directory" in gone.output


def test_bad_run_directories_exit_2(finished_run, cli, tmp_path):
    (tmp_path / "empty").mkdir()
    unexported = tmp_path / "unexported"
    shutil.copytree(finished_run, unexported)
    (unexported / "student.safetensors").unlink()
    cases = {tmp_path / "missing": "no such run directory", tmp_path / "empty": "no summary.json",
             unexported: "no student.safetensors"}
    for run_dir, message in cases.items():
        result = cli("eval", run_dir, "--allow-random-teachers")
        assert result.exit_code == 2 and message in result.output, result.output
        assert "Traceback" not in result.output
