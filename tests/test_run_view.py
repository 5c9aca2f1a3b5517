"""What lifecycle hooks see: ``api.Run``, the run read-only; 0.1's names still work, deprecated."""
from __future__ import annotations

import types
import warnings
from pathlib import Path

import pytest

import kdkit
from kdkit import api
from conftest import TWO_TEACHER_RECIPE, contributing_example, make_trainer, plugins_with

FIXTURES = Path(__file__).parent / "fixtures"


class Spy:
    """Keeps the run its hooks receive."""

    @api.hookimpl
    def kdkit_run_start(self, trainer):
        self.run = trainer


def test_hooks_receive_the_run_read_only(write_recipe):
    spy = Spy()
    trainer = make_trainer(write_recipe(TWO_TEACHER_RECIPE), plugins=plugins_with(spy))
    trainer.hook.kdkit_run_start(trainer=trainer.view)
    trainer.train_epoch(0)
    trainer.end_epoch(0)
    run = spy.run
    assert isinstance(run, api.Run) and run.model is trainer.state.model
    assert (run.epoch, run.step, run.batch, run.epochs, run.steps_per_epoch) == (1, 4, 0, 2, 4)
    assert run.lr == trainer.lr and run.best_epoch == 1 and run.best_top1 == trainer.state.best_top1
    run.history[0]["top1"]["eval"] = -1.0  # a copy
    assert trainer.state.history[0]["top1"]["eval"] != -1.0
    with pytest.raises(TypeError):
        run.summary["status"] = "completed"
    with pytest.raises(AttributeError):
        run.step = 0
    assert not hasattr(run, "optimizer") and not hasattr(run, "scheduler") and not hasattr(run, "distill_step")
    with pytest.warns(DeprecationWarning, match="trainer.state is deprecated"):
        state = run.state
    assert state.step == 4 and state.model is trainer.state.model
    with pytest.raises(AttributeError, match="read-only"):
        state.step = 0
    with pytest.raises(AttributeError, match="cannot reach trainer.state.optimizer"):
        state.optimizer


def test_the_0_1_ema_callback_runs_unchanged(write_recipe):
    """CONTRIBUTING.md's EMA example as 0.1 wrote it (tests/fixtures/kdkit_ema_0_1.py): its numbers are
    the current example's, with DeprecationWarnings for trainer.state and api.Trainer."""
    def load(name, code):
        module = types.ModuleType(name)
        exec(compile(code, name, "exec", dont_inherit=True), module.__dict__)  # no __future__ of this file
        return module.ema(decay=0.5)

    recipe = write_recipe(TWO_TEACHER_RECIPE)
    tops = []
    for code, old in (((FIXTURES / "kdkit_ema_0_1.py").read_text(), True), (contributing_example("kdkit_ema.py"), False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = make_trainer(recipe, plugins=plugins_with(load("kdkit_ema", code)))
            trainer.hook.kdkit_run_start(trainer=trainer.view)
            trainer.train_epoch(0)
            trainer.end_epoch(0)
        tops.append(trainer.state.history[0]["top1"]["ema"])
        deprecated = {str(w.message).split(":")[0] for w in caught if w.category is DeprecationWarning}
        assert deprecated == ({"trainer.state is deprecated", "kdkit.api.Trainer is deprecated"} if old else set())
    assert tops[0] == tops[1]


def test_the_0_1_names_still_import_with_a_warning():
    with pytest.warns(DeprecationWarning, match="kdkit.api.Trainer is deprecated"):
        assert api.Trainer is api.Run
    with pytest.warns(DeprecationWarning, match="use kdkit.api.hookimpl"):
        assert kdkit.hookimpl is api.hookimpl
    with pytest.raises(AttributeError):
        kdkit.no_such_name
