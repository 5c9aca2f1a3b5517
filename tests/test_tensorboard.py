"""The ``tensorboard`` callback: TensorBoard's own reader finds every number of the run's metrics rows."""
from __future__ import annotations

import json

import pytest

import kdkit

from conftest import TWO_TEACHER_RECIPE

pytest.importorskip("tensorboard")  # a test extra: CI has it


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_every_epoch_and_every_nth_step_is_written(write_recipe, tmp_path):
    recipe = write_recipe(TWO_TEACHER_RECIPE + "\n[callbacks.tensorboard]\nevery_steps = 2\n")
    out = kdkit.run(recipe, ["train.epochs=2"], out=tmp_path / "run", allow_random_teachers=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    written = scalars(out / "tensorboard")
    for row in rows:
        for group in ("top1", "train"):
            for name, value in row[group].items():
                assert (row["epoch"], pytest.approx(value)) in written[f"{group}/{name}"], (group, name)
        assert (row["epoch"], pytest.approx(row["lr"])) in written["lr"]
    assert [step for step, _ in written["step/loss"]] == [2, 4, 6, 8]  # 4 steps an epoch, every 2nd
    assert set(written) >= {"top1/eval", "top1/heads_mean", "train/kl/conv", "step/ce/cls", "images_per_s"}


def test_a_log_dir_elsewhere(write_recipe, tmp_path):
    recipe = write_recipe(TWO_TEACHER_RECIPE + f'\n[callbacks.tensorboard]\nlog_dir = "{tmp_path / "tb"}"\n')
    out = kdkit.run(recipe, ["train.epochs=1"], out=tmp_path / "run", allow_random_teachers=True)
    assert not (out / "tensorboard").exists() and "top1/eval" in scalars(tmp_path / "tb")


def test_without_the_package_the_recipe_is_refused_naming_the_extra(write_recipe, cli, tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "tensorboard" else find_spec(name, *args))
    recipe = write_recipe(TWO_TEACHER_RECIPE + "\n[callbacks.tensorboard]\n")
    result = cli("run", recipe, "--out", tmp_path / "run", "--allow-random-teachers")
    assert result.exit_code == 2 and "pip install 'kdkit[tensorboard]'" in result.output
    assert not (tmp_path / "run").exists()
