"""Control callbacks: ``early_stopping`` ends a run as completed, decides the same across a resume, and
a stopped run compares like any other."""
from __future__ import annotations

import itertools
import json
import os
import signal

import pytest
from safetensors.torch import load_file

from conftest import TWO_TEACHER_RECIPE, make_trainer, plugins_with
from kdkit import api
from kdkit_plugins.early_stopping import EarlyStopping, early_stopping

# lr falls every epoch (cosine, no warmup): with patience 1 the run stops after its second epoch of five
STOPS_AFTER_TWO = ["-o", "train.epochs=5", "-o", "train.warmup_epochs=0",
                   "-o", 'callbacks.early_stopping={ metric = "lr", patience = 1 }', "--allow-random-teachers"]


def summary_of(out):
    return json.loads((out / "summary.json").read_text())


def test_early_stopping_ends_the_run_completed_and_decides_again_after_a_resume(write_recipe, cli, tmp_path,
                                                                                 monkeypatch):
    recipe = write_recipe(TWO_TEACHER_RECIPE)
    stopped = tmp_path / "stopped"
    result = cli("run", recipe, "--out", stopped, *STOPS_AFTER_TWO)
    assert result.exit_code == 0, result.output
    summary = summary_of(stopped)
    assert summary["status"] == "completed" and summary["epochs"] == 2 and summary["stopped_early"] is True
    assert summary["stop_reason"].startswith("lr has not improved by more than 0 for 1 epochs (best ")
    assert summary["test_top1"] and (stopped / "student.safetensors").is_file()
    assert len((stopped / "metrics.jsonl").read_text().splitlines()) == 2

    real = EarlyStopping.kdkit_epoch_end

    @api.hookimpl
    def decide_then_signal(self, trainer, row):  # SIGTERM right after the decision, before the run acts on it
        real(self, trainer, row)
        if trainer.epoch == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    interrupted = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        patch.setattr(EarlyStopping, "kdkit_epoch_end", decide_then_signal)
        result = cli("run", recipe, "--out", interrupted, "-o", 'name="again"', *STOPS_AFTER_TWO)
    assert result.exit_code == 143 and summary_of(interrupted)["status"] == "interrupted", result.output
    result = cli("run", recipe, "--out", interrupted, "--resume", "-o", 'name="again"', *STOPS_AFTER_TWO)
    assert result.exit_code == 0, result.output
    resumed = summary_of(interrupted)
    assert (resumed["status"], resumed["epochs"], resumed["stop_reason"]) == ("completed", 2, summary["stop_reason"])
    assert load_file(interrupted / "student.safetensors").keys() == load_file(stopped / "student.safetensors").keys()
    assert all((load_file(interrupted / "student.safetensors")[k] == v).all()
               for k, v in load_file(stopped / "student.safetensors").items())  # the same student, bit for bit

    compared = cli("compare", stopped, interrupted)
    assert compared.exit_code == 0, compared.output
    assert "│ recipe " in compared.output and "│ again " in compared.output  # a row each, as any runs


def test_a_metric_no_epoch_row_has_is_refused_or_fails_the_run_at_once(write_recipe, cli, tmp_path):
    recipe = write_recipe(TWO_TEACHER_RECIPE)
    out = tmp_path / "run"
    for metric in ("accuracy", "images_per_s"):  # not a row's number, or a timing
        result = cli("run", recipe, "--out", out, "-o", f'callbacks.early_stopping={{ metric = "{metric}" }}',
                     "--allow-random-teachers")
        assert result.exit_code == 2 and f"{metric!r} is not in an epoch's metrics row" in result.output
        assert not out.exists()  # refused before anything was written
    result = cli("run", recipe, "--out", out, "-o", 'callbacks.early_stopping={ metric = "train.kl/nope" }',
                 "--allow-random-teachers")
    assert result.exit_code == 1 and "they have train.loss, train.ce/cls, train.kl/conv" in result.output
    result = cli("run", recipe, "--out", tmp_path / "top1", "-o", 'callbacks.early_stopping={ metric = "top1.nope" }',
                 "--allow-random-teachers")
    assert result.exit_code == 1 and "the epochs' rows have no 'top1.nope'; they have lr, train.loss" in result.output


class StopAtStart:
    @api.hookimpl
    def kdkit_run_start(self, trainer):
        trainer.request_stop("asked at the start")


def test_a_stop_asked_when_a_run_resumes_mid_epoch_comes_after_that_epoch(write_recipe):
    """A resumed run finishes the epoch it stopped in before a stop takes effect: never half an epoch."""
    recipe = write_recipe(TWO_TEACHER_RECIPE)
    stopped = make_trainer(recipe)
    stopped.parts.loaders.sampler.set_epoch(0)
    for images, labels in itertools.islice(stopped.parts.loaders.train, 2):
        stopped.train_step(images, labels, epoch=0)
        stopped.state.batch += 1
    resumed = make_trainer(recipe, plugins=plugins_with(StopAtStart()))
    resumed.resume(stopped.checkpoint())
    resumed.fit()
    assert resumed.summary["stopped_early"] and resumed.summary["stop_reason"] == "asked at the start"
    assert resumed.state.step == 4 and resumed.summary["epochs"] == 1 and len(resumed.state.history) == 1


class History:
    """A run as early_stopping reads it: its history, and where a stop request goes."""

    def __init__(self, values, key="eval"):
        self.history = [{"top1": {key: v}, "train": {"loss": v}, "lr": v} for v in values]
        self.reasons = []

    def request_stop(self, reason):
        self.reasons.append(reason)


@pytest.mark.parametrize("mode, values, stops", [
    ("max", [50.0, 50.5, 50.4], True),   # +0.5 is not more than min_delta: two epochs without improvement
    ("max", [50.0, 50.6, 50.4], False),  # +0.6 is: one epoch since the best
    ("min", [2.0, 1.5, 1.6], True),      # -0.5 is not an improvement by more than min_delta
    ("min", [2.0, 1.4, 1.6], False)])
def test_an_improvement_must_beat_min_delta_in_the_metrics_direction(mode, values, stops):
    run = History(values)
    early_stopping(metric="top1.eval" if mode == "max" else "train.loss", mode=mode, patience=2,
                   min_delta=0.5).decide(run)
    assert bool(run.reasons) is stops
