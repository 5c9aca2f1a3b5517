"""Teacher-output caches: the student replays exactly the views the teachers saw, cached outputs equal live
ones, mixing mixes them as timm mixes the images, builds resume exactly, and mismatches are refused."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from kdkit.builder import teacher_cache
from kdkit.builder.data import replay, view_of, view_seed
from kdkit.builder.teacher import Teacher
from kdkit.errors import KdkitError
from kdkit.recipe.experiment import resolve
from kdkit.recipe.toml import load_recipe

from conftest import TWO_TEACHER_RECIPE, make_trainer

CACHED = TWO_TEACHER_RECIPE.replace("train_size = 64", "train_size = 32") + """
[teacher_cache]
views = 3
"""
NO_MIXING = ["augment.mixup=0.0", "augment.cutmix=0.0"]
AUGMENT = ['augment.rand_augment="rand-m9-mstd0.5-inc1"', "augment.random_erasing=0.25"]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KDKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(teacher_cache, "CHUNK", 8)  # several chunks from a few images
    return tmp_path / "cache"


def test_the_student_replays_the_very_views_the_teachers_saw(write_recipe, monkeypatch):
    seen = []
    real = teacher_cache._Views.__getitem__

    def record(self, i):
        image = real(self, i)
        seen.append((self.keys[i], image.clone()))
        return image

    monkeypatch.setattr(teacher_cache._Views, "__getitem__", record)
    trainer = make_trainer(write_recipe(CACHED), [*NO_MIXING, *AUGMENT, "data.workers=0"])
    built = dict(seen)
    assert len(built) == 32 * 3  # every (image, view) once
    for epoch in range(2):
        trainer.parts.loaders.sampler.set_epoch(epoch)
        for images, _, indices, views in trainer.parts.loaders.train:
            for image, index, view in zip(images, indices.tolist(), views.tolist()):
                assert torch.equal(image, built[index, view])  # bit for bit: the same pixels


def test_cached_logits_are_the_live_teachers_within_fp16(write_recipe):
    trainer = make_trainer(write_recipe(CACHED), [*NO_MIXING, *AUGMENT])
    parts = trainer.parts
    indices, views = torch.tensor([0, 5, 31, 17]), torch.tensor([0, 2, 1, 2])
    images = torch.stack([replay(parts.train_set, i, v)[0] for i, v in zip(indices.tolist(), views.tolist())])
    live = trainer.distill_step.teacher_logits(images)
    cached = trainer.distill_step.cached_teacher_logits(indices, views, 1.0)
    assert live.keys() == cached.keys() == {"conv", "other"}
    for name in live:
        torch.testing.assert_close(cached[name], live[name].half().float(), rtol=0, atol=0)  # fp16 storage only


def test_training_from_a_cache_never_runs_the_teachers(write_recipe, monkeypatch):
    trainer = make_trainer(write_recipe(CACHED))
    calls = []
    for teacher in trainer.parts.teachers.values():
        teacher.model.register_forward_hook(lambda *args: calls.append("teacher"))
    read = trainer.distill_step.cached_teacher_logits
    monkeypatch.setattr(trainer.distill_step, "cached_teacher_logits", lambda *args: calls.append("cache") or read(*args))
    trainer.train_epoch(0)
    assert calls == ["cache"] * trainer.steps_per_epoch


def test_views_walk_through_every_view_before_repeating(write_recipe):
    per_image = [view_of(7, epoch, 3, copy, views=6, repeats=2) for epoch in range(3) for copy in range(2)]
    assert sorted(per_image) == list(range(6))  # 3 epochs x 2 copies = 6 views, each once
    assert view_of(7, 0, 3, 0, 6, 2) != view_of(7, 0, 3, 1, 6, 2)  # the copies of an epoch differ


def test_a_views_pixels_and_an_images_walk_never_move():
    """Pinned: a cache on disk stays right for a later kdkit only while both stay as they are."""
    assert view_seed(3, 1) == 8764925935695108732
    assert [view_of(7, epoch, 3, 0, views=6, repeats=1) for epoch in range(6)] == [4, 5, 2, 1, 0, 3]


class LinearProbabilities(nn.Module):
    """A teacher whose class probabilities are affine in its input: softmax(log(s)) with scores s whose sum is
    constant. timm's mixing of two images then mixes its probabilities exactly, for mixup and cutmix alike."""

    def __init__(self, channels: int = 3, classes: int = 4):
        super().__init__()
        weights = torch.randn(classes, channels)
        self.register_buffer("weights", weights - weights.mean(0))  # scores sum to a constant over the classes
        self.register_buffer("offset", torch.full((classes,), 50.0))

    def forward(self, x):
        scores = torch.einsum("bchw,kc->bk", x, self.weights) / x[0, 0].numel() + self.offset
        return scores.log()


@pytest.mark.parametrize("mixing", [["augment.cutmix=0.0"], ["augment.mixup=0.0"], NO_MIXING],
                         ids=["mixup", "cutmix", "none"])
def test_cached_outputs_are_mixed_as_the_images_are(write_recipe, mixing):
    """With a teacher linear in probability the cached mixture must equal the live teacher on the mixed image
    (within fp16 storage): right coefficient, right partner, for mixup and cutmix's pasted area, and each
    image's own output when nothing is mixed."""
    recipe = write_recipe(CACHED)
    trainer = make_trainer(recipe, mixing)
    splits = trainer.parts.splits
    for name in trainer.parts.teachers:
        trainer.parts.teachers[name] = Teacher(LinearProbabilities(), mean=splits.mean, std=splits.std)
    fresh = dataclasses.replace(trainer.parts)  # hashes of the new teachers' weights: new caches
    trainer.distill_step.teacher_outputs = teacher_cache.open_caches(trainer.exp, fresh, torch.device("cpu"))
    trainer.parts.loaders.sampler.set_epoch(0)
    mixed_some = False
    for step, (images, labels, indices, views) in enumerate(trainer.parts.loaders.train):
        mixed, _, lam = trainer.distill_step.targets(images, labels, epoch=0, step=step)
        mixed_some |= lam < 1
        cached = trainer.distill_step.cached_teacher_logits(indices, views, lam)
        live = trainer.distill_step.teacher_logits(mixed)
        for name in live:
            torch.testing.assert_close(cached[name].softmax(-1), live[name].softmax(-1), rtol=0, atol=1e-3)
    assert mixed_some == (mixing != NO_MIXING)


def test_an_interrupted_build_resumes_to_the_same_cache(write_recipe, monkeypatch, cache_dir, tmp_path):
    def arrays(root):
        return {p.relative_to(root): np.load(p) for p in root.glob("teacher_outputs/*/*.npy")}

    recipe = write_recipe(CACHED)
    make_trainer(recipe, AUGMENT)  # built without interruption
    whole = arrays(cache_dir)
    assert len(whole) == 2  # one cache per teacher
    monkeypatch.setenv("KDKIT_CACHE", str(tmp_path / "other"))
    real = teacher_cache.TeacherOutputs.write_chunk

    def stop_at_the_third_chunk(self, chunk, outputs, seconds):
        if chunk == 2:
            raise KeyboardInterrupt
        real(self, chunk, outputs, seconds)

    monkeypatch.setattr(teacher_cache.TeacherOutputs, "write_chunk", stop_at_the_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        make_trainer(recipe, AUGMENT)
    assert not list((tmp_path / "other").glob("teacher_outputs/*/complete.json"))
    monkeypatch.setattr(teacher_cache.TeacherOutputs, "write_chunk", real)
    make_trainer(recipe, AUGMENT)  # resumes: chunks 0 and 1 are kept, the rest built
    resumed = arrays(tmp_path / "other")
    assert resumed.keys() == whole.keys()
    for path, array in resumed.items():
        assert np.array_equal(array, whole[path]), path
    for cache in (tmp_path / "other").glob("teacher_outputs/*"):  # its build time counts both sittings
        seconds = [json.loads(marker.read_text())["seconds"] for marker in sorted((cache / "chunks").glob("*.done"))]
        assert all(s > 0 for s in seconds)
        assert json.loads((cache / "complete.json").read_text())["build_s"] == pytest.approx(sum(seconds), abs=0.1)


def test_a_cache_built_for_other_settings_is_refused(write_recipe):
    recipe = write_recipe(CACHED)
    make_trainer(recipe)
    with pytest.raises(KdkitError, match=r"built for another setting: augment.hflip: 0.5 -> 0.0"):
        make_trainer(recipe, ["augment.hflip=0.0"])


def test_a_top_k_cache_keeps_the_top_probabilities_exactly(write_recipe):
    trainer = make_trainer(write_recipe(CACHED), [*NO_MIXING, "teacher_cache.top_k=2"])
    indices, views = torch.tensor([1, 2]), torch.tensor([0, 1])
    images = torch.stack([replay(trainer.parts.train_set, i, v)[0] for i, v in zip(indices.tolist(), views.tolist())])
    live = trainer.distill_step.teacher_logits(images)["conv"].log_softmax(-1)
    cached = trainer.distill_step.cached_teacher_logits(indices, views, 1.0)["conv"]
    top = live.topk(2, dim=-1).indices
    torch.testing.assert_close(cached.gather(-1, top), live.gather(-1, top), rtol=0, atol=2e-3)
    torch.testing.assert_close(cached.exp().sum(-1), torch.ones(2))  # the rest of the mass, spread evenly


@pytest.mark.parametrize("overrides, message", [
    (['losses.1.plugin="dkd"'], "losses.1: mixup/cutmix with a cache mixes the teachers' probabilities"),
    (["losses.1.tau=2.0"], "losses.1: mixup/cutmix with a cache"),
    ([*NO_MIXING, "teacher_cache.top_k=3", "losses.2.tau=4.0"], "losses.2: top_k keeps only the largest logits"),
])
def test_losses_a_cache_cannot_serve_are_refused(overrides, message, write_recipe):
    with pytest.raises(KdkitError, match=message):
        resolve(load_recipe(write_recipe(CACHED), overrides), allow_random_teachers=True)


def test_a_run_trains_from_the_cache_and_records_it(write_recipe, cli, tmp_path, cache_dir):
    recipe = write_recipe(CACHED)
    built = cli("cache", "build", recipe, "--allow-random-teachers")
    assert built.exit_code == 0, built.output
    assert "conv: " in built.output and "32 images x 3 views" in built.output
    result = cli("run", recipe, "--out", tmp_path / "run", "--allow-random-teachers", "-o", "train.epochs=2")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["teacher_cache"]) == {"conv", "other"}
    assert summary["teacher_cache"]["conv"]["views"] == 3 and summary["teacher_top1"]  # live teachers still scored


def test_compare_plans_one_cache_job_per_cache_not_per_recipe(write_recipe):
    """``compare --jobs``: a recipe whose caches an earlier one builds needs no job of its own; one that
    changes what its views depend on, or its teachers, does; the seed changes nothing."""
    from kdkit.tools.compare.runs import cache_identities

    def identities(*overrides):
        exp = resolve(load_recipe(write_recipe(CACHED), list(overrides)), allow_random_teachers=True)
        return cache_identities(exp, {})

    first = identities()
    assert len(first) == 2 and identities("seed=1", "train.lr=1e-3", "losses.0.weight=0.5") == first
    for changed in (["teacher_cache.views=4"], ['augment.crop_scale=[0.5, 1.0]'], ["data.train_size=16"]):
        assert identities(*changed).isdisjoint(first), changed
    assert len(identities('teachers.other.model="resnet10t"') & first) == 1  # the other teacher's cache is new
    views_from_epochs = identities("teacher_cache.views=0", "train.epochs=2")  # views = epochs x repeats
    assert views_from_epochs.isdisjoint(identities("teacher_cache.views=0", "train.epochs=3"))
