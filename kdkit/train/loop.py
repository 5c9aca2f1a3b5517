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

import copy
import signal
import sys
import time
from dataclasses import dataclass, field

import torch
from timm.scheduler import create_scheduler_v2

from kdkit.builder.build import Built
from kdkit.recipe.sections import TrainConfig
from kdkit.errors import KdkitError, RunFailed, RunInterrupted, UnreadableImage, keep_first_error
from kdkit.builder.model import DistillModel, prediction_names, predictions
from kdkit.train.precision import autocast
from kdkit.train.run_view import Run
from kdkit.store.rundir import RunDir
from kdkit.train.signals import StopOnSignal
from kdkit.store.summary import Summary
from kdkit.train.step import NonFiniteLoss
from kdkit.train.top1 import top1


@dataclass
class TrainState:
    """Everything that changes while training: what a checkpoint saves and a resume restores.

    The learning-rate schedule is not saved: it is a function of the recipe and ``step``, rebuilt on
    resume. No random generator state is saved either: every random draw is seeded from
    (seed, epoch, sample or step).
    """

    model: DistillModel
    optimizer: torch.optim.Optimizer
    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer updates so far
    batch: int = 0  # batches trained in the unfinished epoch
    sums: dict[str, float] = field(default_factory=dict)  # that epoch's sums of the logged values
    seen: int = 0  # images trained on in that epoch, by every process together
    train_s: float = 0.0  # seconds spent training in that epoch
    best_top1: float = -1.0
    best_epoch: int = 0
    best_model: dict | None = None  # the best epoch's weights, kept when a held-out split selects it
    history: list[dict] = field(default_factory=list)  # one metrics row per completed epoch

    PLAIN = ("epoch", "step", "batch", "sums", "seen", "train_s", "best_top1", "best_epoch", "best_model", "history")

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                **{key: getattr(self, key) for key in self.PLAIN}}

    def load_state_dict(self, state: dict) -> None:
        """Restore weights, optimizer moments and counters; the optimizer's hyperparameters stay the recipe's."""
        self.model.load_state_dict(state["model"])
        optimizer = self.optimizer.state_dict()
        optimizer["state"] = state["optimizer"]["state"]
        self.optimizer.load_state_dict(optimizer)
        for key in self.PLAIN:
            setattr(self, key, state[key])


def create_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Warmup then cosine, stepped per optimizer update (timm's scheduler, as DeiT uses it)."""
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=max(cfg.epochs, 1), min_lr=cfg.min_lr,
                                       warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs,
                                       step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    return scheduler


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
                self.summary.update(**self.evaluate_test(), infer_images_per_s=self.inference_speed())
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

    @torch.no_grad()
    def check_first_batches(self, epoch: int = 0, batch: int = 0) -> None:
        """Load the first global batch the run trains on from (``epoch``, ``batch``) and one validation
        batch, and pass them through the student (one micro-batch of the training batch) in eval mode,
        so unreadable data stops the run before anything is written. Nothing the run uses changes: the
        items are taken from the datasets as the loaders take them (each training sample seeded by its
        own key), torch's generators are forked meanwhile, and eval mode updates no BatchNorm statistic."""
        loaders, model, cfg = self.parts.loaders, self.state.model, self.cfg
        micro_batch = cfg.batch_size // (self.processes.world * cfg.accum_steps)
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                train = [loaders.train.dataset[key] for key in
                         loaders.sampler.first_global_batch(epoch, batch * cfg.batch_size)]
                val = [loaders.val.dataset[i] for i in range(min(len(loaders.val.dataset), loaders.val.batch_size))]
                for items in (train[:micro_batch], val):
                    if items:  # a resume with a changed batch size may have no batch left in its epoch
                        with autocast(self.device, cfg.precision):
                            model(loaders.train.collate_fn(items)[0].to(self.device))
        finally:
            model.train(was_training)

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

    # --- evaluation -------------------------------------------------------------------------------

    def evaluate_test(self) -> dict:
        """The test split's top-1, for the summary: the final student's (``test_top1``, per head and
        ``eval``) and, when a held-out validation split chose the best epoch, that epoch's student's
        (``best_test_top1``). Without a held-out split the validation set is the test split."""
        if self.parts.loaders.test is None:
            return {"test_top1": self.summary.top1, "best_test_top1": None}
        best = None
        if self.state.best_model is not None:
            best = copy.deepcopy(self.state.model)
            best.load_state_dict(self.state.best_model)
        return {"test_top1": self.evaluate(loader=self.parts.loaders.test),
                "best_test_top1": self.evaluate(best, loader=self.parts.loaders.test)["eval"] if best else None}

    def evaluate(self, model: DistillModel | None = None, loader=None) -> dict[str, float]:
        """Top-1 (%) per head and for the eval prediction (``eval``) on the validation set (or ``loader``).

        ``model`` defaults to the trained one; a plugin may pass another with the same heads (an EMA copy).
        Each process evaluates its shard and the counts are summed: every image counts exactly once.
        """
        model = self.state.model if model is None else model

        def predict(images: torch.Tensor) -> dict[str, torch.Tensor]:
            with autocast(self.device, self.cfg.precision):
                return predictions(model(images), model.eval_heads)

        was_training = model.training
        model.eval()
        try:
            return top1(predict, prediction_names(list(model.heads)), self.parts.loaders.val if loader is None
                        else loader, device=self.device, processes=self.processes)
        finally:
            model.train(was_training)

    @torch.no_grad()
    def inference_speed(self, warmup: int = 2, repeats: int = 5) -> float:
        """Images/s of the eval prediction on a fixed batch (``data.batch_size_eval``, at most 64), timed
        after ``warmup`` batches with the device synchronised, so a GPU's queued kernels are counted."""
        model = self.state.model
        model.eval()
        batch = torch.zeros(min(64, self.exp.data.batch_size_eval), self.parts.splits.in_chans,
                            self.exp.data.image_size, self.exp.data.image_size, device=self.device)
        synchronize = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        with autocast(self.device, self.cfg.precision):
            for _ in range(warmup):
                model.predict(batch)
            synchronize()
            start = time.perf_counter()
            for _ in range(repeats):
                model.predict(batch)
            synchronize()
        model.train()
        return repeats * len(batch) / (time.perf_counter() - start)

    def teachers_top1(self) -> dict[str, float]:
        """Validation top-1 (%) of every teacher, on the inputs it gets during training: one pass for all."""
        step = self.distill_step
        return top1(step.teacher_logits, list(step.teachers), self.parts.loaders.val, device=self.device,
                    processes=self.processes)
