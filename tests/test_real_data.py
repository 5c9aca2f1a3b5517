"""One short run on real data: a stratified CIFAR-10 subset; a loop that silently stops learning fails here."""
from __future__ import annotations

import json

import pytest

import kdkit

from conftest import SHARED_DATA

ARCHIVE = SHARED_DATA / "cifar10-jpeg.tar.gz"
# With the archive tests of test_datasets: one test process decodes CIFAR-10 into its cache, once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("cifar10")]


@pytest.mark.skipif(not ARCHIVE.is_file(), reason=f"{ARCHIVE} is not here")
def test_cifar10_subset_learns(write_recipe, tmp_path):
    recipe = write_recipe(f"""
        seed = 0
        [data]
        dataset = "cifar10"
        root = "{ARCHIVE}"
        image_size = 32
        limit_train = 2000
        limit_val = 500
        batch_size_eval = 250
        workers = 2
        [student]
        plugin = "timm"
        model = "test_resnet"
        [[losses]]
        plugin = "ce"
        head = "pool"
        [train]
        epochs = 2
        batch_size = 64
        lr = 2e-3
        warmup_epochs = 0
        [augment]
        crop_scale = [0.5, 1.0]
        [eval]
        heads = ["pool"]
        """)
    out = kdkit.run(recipe, out=tmp_path / "run")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    losses = [json.loads(line)["train"]["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[1] < losses[0] < 2.3, losses  # falling, from below log(10): the loop learns
    assert summary["top1"]["eval"] > 25.0, summary["top1"]  # chance is 10%
