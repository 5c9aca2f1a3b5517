"""Nothing is written before the first training batch and one validation batch have been read and passed
through the student: an unreadable image is one line naming it (exit 2) and no run directory; one met
later fails the run (exit 1) naming it, its last checkpoint kept. The check changes no result."""
from __future__ import annotations

import json
import random
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import kdkit
from kdkit.builder.data import EpochSampler

from conftest import TWO_TEACHER_RECIPE, make_trainer
from test_images import BAD_FILES

RECIPE = """
seed = 0

[data]
dataset = "imagefolder"
root = "{root}"
image_size = 16
batch_size_eval = 4
workers = {workers}

[student]
plugin = "timm"
model = "test_resnet"

[heads.cls]
embedding = "pool"

[[losses]]
plugin = "ce"
head = "cls"

[train]
epochs = 2
batch_size = {batch_size}
"""


def image_folder(root, train_per_class: int) -> list:
    """root/train and root/val of two classes of small PNGs; the training files in ImageFolder's order."""
    rng = np.random.default_rng(0)
    files = []
    for split, count in (("train", train_per_class), ("val", 2)):
        for label in ("ant", "bee"):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                path = root / split / label / f"{i}.png"
                Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(path)
                if split == "train":
                    files.append(path)
    return files


def recipe(tmp_path, batch_size: int, workers: int = 0):
    path = tmp_path / "recipe.toml"
    path.write_text(textwrap.dedent(RECIPE.format(root=tmp_path / "data", batch_size=batch_size, workers=workers)))
    return path


def one_line(output: str) -> str:
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    return lines[0]


@pytest.mark.parametrize("kind", ["truncated JPEG", "empty file", "text named .jpg", "decompression bomb"])
def test_an_unreadable_image_in_the_first_batch_stops_the_run_before_anything_is_written(kind, cli, tmp_path):
    files = image_folder(tmp_path / "data", train_per_class=4)
    bad = files[5].with_suffix(".jpg")
    files[5].unlink()
    bad.write_bytes(BAD_FILES[kind][0])
    result = cli("run", recipe(tmp_path, batch_size=8), "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    line = one_line(result.output)
    assert line.startswith(f"error: {bad}: cannot read the image: ") and BAD_FILES[kind][1] in line
    assert not (tmp_path / "out").exists()


def test_a_folder_of_nothing_but_unreadable_images_writes_nothing(cli, tmp_path):
    image_folder(tmp_path / "data", train_per_class=4)
    for path in (tmp_path / "data").rglob("*.png"):
        path.write_text("not an image")
    result = cli("run", recipe(tmp_path, batch_size=4), "--out", tmp_path / "out")
    assert result.exit_code == 2 and "cannot read the image: not an image file" in one_line(result.output)
    assert not (tmp_path / "out").exists()


def test_an_unreadable_validation_image_stops_the_run_before_anything_is_written(cli, tmp_path):
    image_folder(tmp_path / "data", train_per_class=4)
    bad = tmp_path / "data" / "val" / "ant" / "0.png"
    bad.write_bytes(b"")
    result = cli("run", recipe(tmp_path, batch_size=4), "--out", tmp_path / "out")
    assert result.exit_code == 2 and one_line(result.output) == f"error: {bad}: cannot read the image: the file is empty"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("workers", [0, 2])
def test_an_unreadable_image_met_while_training_fails_the_run_naming_it_and_keeps_the_last_checkpoint(
        workers, cli, tmp_path):
    files = image_folder(tmp_path / "data", train_per_class=5)  # 10 images, batches of 4: 2 left out per epoch
    sampler = EpochSampler(len(files), seed=0, repeats=1, batch_size=4, rank=0, world=1)
    epochs = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        epochs.append({index for _, index, _ in sampler})
    index = min(epochs[1] - epochs[0])  # first read in the second epoch
    files[index].write_bytes(b"broken")
    result = cli("run", recipe(tmp_path, batch_size=4, workers=workers), "--out", tmp_path / "out")
    assert result.exit_code == 1, result.output
    line = result.output.strip().splitlines()[-1]  # after the progress display and the run's summary table
    assert line.startswith(f"error: {files[index]}: cannot read the image: not an image file PIL can decode (at "
                           "epoch 2, step ") and line.endswith("; the run stops, its last checkpoint is kept")
    assert torch.load(tmp_path / "out" / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["epochs"] == 1


def test_a_resumed_run_checks_the_batch_it_resumes_with_before_rewriting_its_recipe(cli, tmp_path):
    files = image_folder(tmp_path / "data", train_per_class=4)
    path = recipe(tmp_path, batch_size=8)
    assert cli("run", path, "--out", tmp_path / "out", "-o", "train.epochs=1").exit_code == 0
    saved = {name: (tmp_path / "out" / name).read_bytes() for name in ("recipe.toml", "checkpoints/last.pt")}
    files[0].write_bytes(b"")  # every batch holds every image
    result = cli("run", path, "--out", tmp_path / "out", "--resume", "--allow-changes")
    assert result.exit_code == 2 and one_line(result.output) == (f"error: {files[0]}: cannot read the image: "
                                                                 "the file is empty")
    assert all((tmp_path / "out" / name).read_bytes() == data for name, data in saved.items())


def test_the_check_changes_no_random_stream_no_weight_and_no_statistic(write_recipe):
    text = TWO_TEACHER_RECIPE.replace('model = "test_vit"\nmodel_kwargs = { img_size = 32 }',
                                      'model = "test_resnet"\ndrop_path_rate = 0.1')  # BatchNorm, drop path
    trainer = make_trainer(write_recipe(text), ['augment.rand_augment="rand-m9-mstd0.5-inc1"'])
    before = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              {k: v.clone() for k, v in trainer.state.model.state_dict().items()})
    trainer.evaluation.check_first_batches(trainer.state.model)
    assert random.getstate() == before[0] and torch.equal(torch.get_rng_state(), before[2])
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), before[1]))
    after = trainer.state.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before[3].items()) and trainer.state.model.training


def test_a_run_is_the_same_with_and_without_the_check(write_recipe, tmp_path, monkeypatch):
    """The whole run, bit for bit: with the check (as ``kdkit run`` does) and with it skipped (as before it)."""
    text = TWO_TEACHER_RECIPE.replace('model = "test_vit"\nmodel_kwargs = { img_size = 32 }',
                                      'model = "test_resnet"\ndrop_path_rate = 0.1')
    path = write_recipe(text)
    checked = kdkit.run(path, ["train.epochs=1"], out=tmp_path / "checked", allow_random_teachers=True)
    monkeypatch.setattr(kdkit.train.evaluation.Evaluation, "check_first_batches", lambda self, model, *start: None)
    unchecked = kdkit.run(path, ["train.epochs=1"], out=tmp_path / "unchecked", allow_random_teachers=True)
    ours = torch.load(checked / "checkpoints" / "last.pt", weights_only=True)
    theirs = torch.load(unchecked / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.equal(ours["model"][k], theirs["model"][k]) for k in theirs["model"])
    assert ours["history"][0]["train"] == theirs["history"][0]["train"]
    assert ours["history"][0]["top1"] == theirs["history"][0]["top1"]
