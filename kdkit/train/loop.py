"""The one place a run happens: ``Trainer.fit`` trains, evaluates and keeps best and last.

Follow one batch: ``train_epoch`` takes it from the loader and ``train_step`` hands it to the
distillation step (``kdkit.train.step.DistillStep``: mixing, micro-batches, every loss term with the
teachers seeing exactly the student's batch, the optimizer update), then steps the schedule.
Follow one epoch: ``fit`` calls ``train_epoch``, then ``end_epoch`` evaluates, updates best/last and
calls the ``kdkit_epoch_end`` hook, where the built-in callbacks append the metrics line and write
the checkpoints. This module and the step it calls are the only code that changes ``TrainState``;
every side effect (progress, files, checkpoints, export) is a plugin on the lifecycle hooks of
``kdkit.plugin.hookspecs``.

Randomness (augmentation, mixing, drop-path) is a function of (seed, epoch, sample or step), so a
resumed run, given the state a checkpoint holds, continues exactly as if it had never stopped.
"""
from __future__ import annotations

import signal
import sys
import time

import torch

from kdkit.builder.build import Built
from kdkit.builder.model import DistillModel
from kdkit.errors import KdkitError, RunFailed, RunInterrupted, UnreadableImage, keep_first_error
from kdkit.store.rundir import RunDir
from kdkit.store.summary import Summary
from kdkit.train.evaluation import Evaluation
from kdkit.train.run_view import Run
from kdkit.train.signals import StopOnSignal
from kdkit.train.state import TrainState, create_schedule
from kdkit.train.step import NonFiniteLoss


class _Stop(Exception):
    """Raised inside ``fit`` once a requested stop has been reached at a step boundary."""


class Trainer:
    """One run of ``exp``: its parts, state, the run directory and the summary it keeps.

    ``hook`` is the plugin manager's hook relay (every plugin and the run's callbacks); the hooks receive
    ``view``, the run read-only (``kdkit.train.run_view.Run``). With several processes (torchrun) every process
    runs the hooks; only the main one (``is_main``, rank 0) should write files or print.
    ``distill_step`` makes each optimizer update.
    """

    def __init__(self, built: Built, *, rundir: RunDir, hook, summary: Summary | None = None):
        self.exp, self.parts, self.distill_step = built.experiment, built.parts, built.step
        self.cfg, self.device = self.exp.train, self.distill_step.device
        self.rundir, self.hook = rundir, hook
        self.summary = summary or Summary(name=self.exp.name, seed=self.exp.seed)
        self.is_main = self.processes.is_main
        self.export_meta = self.parts.export_meta
        self.steps_per_epoch = len(self.parts.loaders.train)
        self.state = TrainState(self.parts.model, self.distill_step.optimizer)
        self.scheduler = create_schedule(self.state.optimizer, self.cfg, self.steps_per_epoch)
        self.scheduler.step_update(0)
        self.evaluation = Evaluation(built)
        self.resumed = False
        self.stop = StopOnSignal()
        self.stop_reason: str | None = None  # a callback's request_stop
        self.view = Run(self)  # what the lifecycle hooks receive
        self.clock = (time.perf_counter(), 0.0)

    @property
    def processes(self):
        """This process's place among the run's processes (the step's: one truth for both)."""
        return self.distill_step.processes

    # --- checkpoints ------------------------------------------------------------------------------

    CHECKPOINT_KEYS = ("model", "optimizer", *TrainState.PLAIN, "summary", "plugins")  # what checkpoint() holds

    def checkpoint(self) -> dict:
        """The whole training state, the summary, and every plugin's ``kdkit_state_dict`` entries."""
        extra = {}
        for part in self.hook.kdkit_state_dict(trainer=self.view):
            clash = extra.keys() & part.keys()
            if clash:
                raise KdkitError(f"two plugins keep checkpoint state under {sorted(clash)}")
            extra.update(part)
        return {**self.state.state_dict(), "summary": self.summary.to_json(), "plugins": extra}

    def resume(self, checkpoint: dict) -> None:
        """Continue from ``checkpoint`` (made by ``checkpoint()``), in the middle of an epoch or at its end."""
        self.state.load_state_dict(checkpoint)
        self.scheduler.step_update(self.state.step)
        self.hook.kdkit_load_state_dict(trainer=self.view, state=checkpoint["plugins"])
        self.resumed = True

    # --- the run ----------------------------------------------------------------------------------

    def fit(self) -> None:
        """Train the remaining epochs, calling the lifecycle hooks; raises ``RunInterrupted`` on a signal."""
        status = "failed"
        self.clock = (time.perf_counter(), self.summary.wall_s or 0.0)
        with self.stop:  # also while the run-end hooks write the checkpoint: a second signal exits at once
            try:
                self.summary.status = "running"
                self.hook.kdkit_run_start(trainer=self.view)
                for epoch in range(self.state.epoch, self.cfg.epochs):
                    if self.state.batch == 0 and self.in_any_process(self.stop_reason is not None):
                        self.summary.update(stopped_early=True, stop_reason=self.stop_reason
                                            or "a callback in another process asked to stop")
                        break
                    self.train_epoch(epoch)
                    self.end_epoch(epoch)
                    if self.stopping():
                        raise _Stop
                if not self.state.history:  # train.epochs = 0: the student as it came, evaluated
                    self.summary.top1 = self.evaluate()
                model = self.state.model
                self.summary.update(**self.evaluation.test(model, self.state.best_model, self.summary.top1),
                                    infer_images_per_s=self.evaluation.inference_speed(model))
                status = "completed"
            except UnreadableImage as exc:
                raise RunFailed(f"{exc} ({self.where()}); the run stops, its last checkpoint is kept") from None
            except _Stop:
                status = "interrupted"
                signum = self.stop.signum or signal.SIGTERM  # another process may have been the one signalled
                raise RunInterrupted(f"{signal.Signals(signum).name}: stopped {self.where()}; resume with --resume",
                                     signum) from None
            finally:
                self.summary.update(status=status, wall_s=self.wall_s)
                with keep_first_error(sys.exc_info()[1]):  # a second error (the summary cannot be written) is a note
                    self.hook.kdkit_run_end(trainer=self.view, status=status)


    def where(self) -> str:
        """Where the run is, for messages: after an epoch, or at a step of the next one."""
        if self.state.batch == 0:
            return f"after epoch {self.state.epoch}"
        return f"at epoch {self.state.epoch + 1}, step {self.state.batch} of {self.steps_per_epoch}"

    def stopping(self) -> bool:
        """Whether a signal asked to stop, in any process: all processes stop after the same step."""
        return self.in_any_process(self.stop.signum is not None)

    def request_stop(self, reason: str) -> None:
        """End the run after the current epoch (asked at the start of a run resumed after an epoch: before
        the next one) as completed: the test split is evaluated and the student exported as after the
        last epoch, and the summary says ``stopped_early`` and ``stop_reason``. For control callbacks, e.g.
        early stopping. The request is not checkpointed: a callback that decides from the run's history
        decides again on resume."""
        if self.stop_reason is None:
            self.stop_reason = reason

    def in_any_process(self, flag: bool) -> bool:
        """``flag`` in this process or any other: every process takes the same turn."""
        if not self.processes.active:
            return flag
        return bool(self.processes.sum(torch.tensor([float(flag)], device=self.device)).item())

    @property
    def wall_s(self) -> float:
        """Seconds this run has taken so far, over every session that resumed it."""
        start, before = self.clock
        return round(before + time.perf_counter() - start, 2)

    def train_epoch(self, epoch: int) -> None:
        """Train the epoch's remaining batches (all of them, unless resumed in its middle)."""
        state = self.state
        state.model.train()
        self.parts.loaders.sampler.set_epoch(epoch, skip=state.batch * self.cfg.batch_size)
        last = time.perf_counter()
        for images, labels, *views in self.parts.loaders.train:
            logged = self.train_step(images, labels, epoch, views or None)
            now = time.perf_counter()
            state.batch, state.train_s = state.batch + 1, state.train_s + now - last
            state.seen += len(labels) * self.processes.world  # each process trains an equal share
            for key, value in logged.items():
                state.sums[key] = state.sums.get(key, 0.0) + value
            self.hook.kdkit_step_end(trainer=self.view, logged=logged)
            if self.stopping():
                raise _Stop
            last = time.perf_counter()

    def end_epoch(self, epoch: int) -> None:
        """Evaluate, count the epoch, keep best/last, and hand the metrics row to the hooks."""
        state = self.state
        top1 = self.evaluate()
        for extra in self.hook.kdkit_evaluate(trainer=self.view):
            clash = top1.keys() & extra.keys()
            if clash:
                raise KdkitError(f"a plugin's kdkit_evaluate reports {sorted(clash)}, which the run already has")
            top1.update(extra)
        row = {"epoch": epoch + 1, "lr": self.lr, "train": {k: v / state.batch for k, v in state.sums.items()},
               "top1": top1, "images_per_s": state.seen / state.train_s if state.train_s else 0.0,
               "wall_s": state.train_s}
        state.epoch, state.batch, state.sums, state.seen, state.train_s = epoch + 1, 0, {}, 0, 0.0
        state.history.append(row)
        if top1["eval"] > state.best_top1:
            state.best_top1, state.best_epoch = top1["eval"], epoch + 1
            if self.parts.loaders.test is not None:
                state.best_model = {k: v.detach().to("cpu", copy=True) for k, v in state.model.state_dict().items()}
        speeds = [r["images_per_s"] for r in state.history]
        self.summary.update(epochs=state.epoch, top1=top1, best_top1=state.best_top1, best_epoch=state.best_epoch,
                            train_images_per_s=sum(speeds) / len(speeds), wall_s=self.wall_s)
        self.hook.kdkit_epoch_end(trainer=self.view, row=row)

    @property
    def lr(self) -> float:
        return self.state.optimizer.param_groups[0]["lr"]

    # --- one step ---------------------------------------------------------------------------------

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, epoch: int, views=None) -> dict[str, float]:
        """One optimizer update by the distillation step, then the schedule's; returns what the step logs.
        A non-finite loss fails the run here, before it reaches the weights."""
        state = self.state
        try:
            result = self.distill_step(images, labels, epoch=epoch, step=state.step, views=views)
        except NonFiniteLoss as exc:
            raise RunFailed(f"{exc} at epoch {epoch + 1}, step {state.batch + 1} of {self.steps_per_epoch} "
                            f"(optimizer step {state.step + 1}); the run stops, its last good checkpoint is kept") from None
        state.step += 1
        self.scheduler.step_update(state.step)
        return result.logged

    def evaluate(self, model: DistillModel | None = None, loader=None) -> dict[str, float]:
        """Top-1 (%) per head and ``eval`` on the validation set (or ``loader``) of ``model``: by default the
        trained one; a plugin may pass another with the same heads (an EMA copy)."""
        return self.evaluation.top1(self.state.model if model is None else model, loader)
