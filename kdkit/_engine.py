"""The one place a run happens: ``Trainer.fit`` trains, evaluates and keeps best and last.

Follow one batch: ``train_epoch`` takes it from the loader, ``train_step`` mixes it, splits it into
micro-batches, computes every loss term (``losses``) with the teachers seeing exactly the student's
batch, and steps the optimizer and the schedule. Follow one epoch: ``fit`` calls ``train_epoch``,
then ``end_epoch`` evaluates, updates best/last and calls the ``kdkit_epoch_end`` hook, where the
built-in callbacks append the metrics line and write the checkpoints. This module is the only code
that changes ``TrainState``; every side effect (progress, files, checkpoints, export) is a plugin
on the lifecycle hooks of ``kdkit._hookspecs``.

Randomness (augmentation, mixing, drop-path) is a function of (seed, epoch, sample or step), so a
resumed run, given the state a checkpoint holds, continues exactly as if it had never stopped.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn

from kdkit._config import TrainConfig
from kdkit._data import Targets, sample_seed
from kdkit._distributed import Processes
from kdkit._errors import KdkitError, RunFailed, RunInterrupted, UnreadableImage, keep_first_error
from kdkit._experiment import Experiment
from kdkit._model import DistillModel, prediction_names, predictions
from kdkit._parts import Parts
from kdkit._rundir import RunDir
from kdkit._teacher_cache import mix_teacher_outputs

DROP_PATH_STREAM = 0x64726F70  # "drop": the per-step seed of drop-path and dropout


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


def create_optimizer(model: DistillModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    """timm's optimizer factory: no weight decay on norms, biases and the student's ``no_weight_decay()``."""
    return create_optimizer_v2(model, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               momentum=cfg.momentum)


def create_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Warmup then cosine, stepped per optimizer update (timm's scheduler, as DeiT uses it)."""
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=max(cfg.epochs, 1), min_lr=cfg.min_lr,
                                       warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs,
                                       step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    return scheduler


def autocast(device: torch.device, precision: str):
    """``auto``: bf16 autocast on CUDA, fp32 elsewhere; ``bf16`` everywhere; ``fp32`` never."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


class StopOnSignal:
    """SIGINT and SIGTERM ask the run to stop after the current step; a second one exits at once.

    Only the main thread can install signal handlers; elsewhere signals keep their default effect.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self.previous = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame) -> None:
        if self.signum is not None:
            os._exit(128 + signum)  # everything on disk was written atomically: nothing is torn
        self.signum = signum


class _Stop(Exception):
    """Raised inside ``fit`` once a requested stop has been reached at a step boundary."""


class Trainer:
    """One run of ``exp``: its parts, state, the run directory and the summary it keeps.

    ``hook`` is the plugin manager's hook relay (every plugin and the run's callbacks). Plugins read
    ``state``, ``summary``, ``rundir``, ``export_meta``, ``resumed`` and ``is_main``; they never change
    the state. With several processes (torchrun) every process runs the hooks; only the main one
    (``is_main``, rank 0) should write files or print.
    """

    def __init__(self, exp: Experiment, parts: Parts, *, device: torch.device, rundir: RunDir, hook,
                 summary: dict, processes: Processes = Processes()):
        self.exp, self.parts, self.cfg, self.device = exp, parts, exp.train, device
        self.rundir, self.hook, self.summary, self.processes = rundir, hook, summary, processes
        self.is_main = processes.is_main
        self.export_meta = parts.export_meta
        self.steps_per_epoch = len(parts.loaders.train)
        self.state = TrainState(parts.model, create_optimizer(parts.model, self.cfg))
        self.forward = self.data_parallel(parts.model) if processes.active else parts.model
        if self.cfg.compile:
            self.forward = torch.compile(self.forward)
        self.scheduler = create_schedule(self.state.optimizer, self.cfg, self.steps_per_epoch)
        self.scheduler.step_update(0)
        self.targets = Targets(exp.augment, parts.splits.num_classes, exp.seed)
        self.mean, self.std = parts.normalization(device)
        self.resumed = False
        self.stop = StopOnSignal()
        self.clock = (time.perf_counter(), 0.0)

    def data_parallel(self, model: DistillModel) -> nn.Module:
        """The student and its heads in DistributedDataParallel; the teachers stay outside it, replicated.
        A head no loss trains gets no gradient, which DDP must be told to expect."""
        trained = {term.head for term in self.parts.terms}
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=not trained >= set(model.heads))

    # --- checkpoints ------------------------------------------------------------------------------

    CHECKPOINT_KEYS = ("model", "optimizer", *TrainState.PLAIN, "summary", "plugins")  # what checkpoint() holds

    def checkpoint(self) -> dict:
        """The whole training state, the summary, and every plugin's ``kdkit_state_dict`` entries."""
        extra = {}
        for part in self.hook.kdkit_state_dict(trainer=self):
            clash = extra.keys() & part.keys()
            if clash:
                raise KdkitError(f"two plugins keep checkpoint state under {sorted(clash)}")
            extra.update(part)
        return {**self.state.state_dict(), "summary": self.summary, "plugins": extra}

    def resume(self, checkpoint: dict) -> None:
        """Continue from ``checkpoint`` (made by ``checkpoint()``), in the middle of an epoch or at its end."""
        self.state.load_state_dict(checkpoint)
        self.scheduler.step_update(self.state.step)
        self.hook.kdkit_load_state_dict(trainer=self, state=checkpoint["plugins"])
        self.resumed = True

    # --- the run ----------------------------------------------------------------------------------

    def fit(self) -> None:
        """Train the remaining epochs, calling the lifecycle hooks; raises ``RunInterrupted`` on a signal."""
        status = "failed"
        self.clock = (time.perf_counter(), self.summary.get("wall_s") or 0.0)
        with self.stop:  # also while the run-end hooks write the checkpoint: a second signal exits at once
            try:
                self.summary["status"] = "running"
                self.hook.kdkit_run_start(trainer=self)
                for epoch in range(self.state.epoch, self.cfg.epochs):
                    self.train_epoch(epoch)
                    self.end_epoch(epoch)
                    if self.stopping():
                        raise _Stop
                if not self.state.history:  # train.epochs = 0: the student as it came, evaluated
                    self.summary["top1"] = self.evaluate()
                self.summary.update(self.evaluate_test(), infer_images_per_s=self.inference_speed())
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
                    self.hook.kdkit_run_end(trainer=self, status=status)

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
        asked = torch.tensor([float(self.stop.signum is not None)], device=self.device)
        return bool(self.processes.sum(asked).item()) if self.processes.active else self.stop.signum is not None

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
            self.hook.kdkit_step_end(trainer=self, logged=logged)
            if self.stopping():
                raise _Stop
            last = time.perf_counter()

    def end_epoch(self, epoch: int) -> None:
        """Evaluate, count the epoch, keep best/last, and hand the metrics row to the hooks."""
        state = self.state
        top1 = self.evaluate()
        for extra in self.hook.kdkit_evaluate(trainer=self):
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
        self.hook.kdkit_epoch_end(trainer=self, row=row)

    @property
    def lr(self) -> float:
        return self.state.optimizer.param_groups[0]["lr"]

    # --- one step ---------------------------------------------------------------------------------

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, epoch: int, views=None) -> dict[str, float]:
        """One optimizer update; the batch is split into ``accum_steps`` micro-batches, all terms kept.

        ``views`` (image indices, view numbers) says which cached views the batch replays: the
        teachers' outputs are then read from their caches (mixed as the images were) instead of computed.
        """
        state, cfg = self.state, self.cfg
        process = (self.processes.rank,) if self.processes.active else ()  # each process its own masks
        torch.manual_seed(sample_seed(self.exp.seed, epoch, state.step, DROP_PATH_STREAM, *process))
        images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        mixed, target, lam = self.targets(images, labels, epoch=epoch, step=state.step)
        cached = self.cached_teacher_logits(*views, lam) if views else None
        totals: dict[str, float] = defaultdict(float)
        for i, chunk in enumerate(zip(*(t.chunk(cfg.accum_steps) for t in (mixed, target, labels)))):
            teachers = ({name: value.chunk(cfg.accum_steps)[i] for name, value in cached.items()} if cached
                        else self.teacher_logits(chunk[0]))
            last = i == cfg.accum_steps - 1  # DDP averages the gradients once, after the last micro-batch
            with contextlib.nullcontext() if last or not self.processes.active else self.forward.no_sync():
                loss, values = self.losses(*chunk, teachers)
                logged = self.logged(loss, values)
                self.check_finite(logged, epoch)
                (loss / cfg.accum_steps).backward()
            for name, value in logged.items():
                totals[name] += value / cfg.accum_steps
        if cfg.clip_grad > 0:
            nn.utils.clip_grad_norm_(state.model.parameters(), cfg.clip_grad)
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        self.scheduler.step_update(state.step)
        return dict(totals)

    def teacher_logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every needed teacher's fp32 logits for the very (mixed) batch the student sees."""
        return {name: self.parts.teachers[name].logits(images, self.mean, self.std)
                for name in self.parts.needed_teachers}

    def cached_teacher_logits(self, indices: torch.Tensor, views: torch.Tensor, lam: float) -> dict[str, torch.Tensor]:
        """Every needed teacher's cached output for these (image, view) pairs, mixed with coefficient ``lam``."""
        return {name: mix_teacher_outputs(cache.log_probs(indices, views), lam).to(self.device)
                for name, cache in self.parts.teacher_outputs.items()}

    def losses(self, images: torch.Tensor, target: torch.Tensor, labels: torch.Tensor,
               teacher_logits: dict[str, torch.Tensor]):
        """Total loss and each weighted term, for one (micro-)batch."""
        with autocast(self.device, self.cfg.precision):
            logits = self.forward(images)
        values = {}
        for term in self.parts.terms:
            value = term.fn(logits[term.head], target=target, labels=labels,
                            teacher_logits=[teacher_logits[t] for t in term.teachers])
            values[term.name] = term.weight * value
        return sum(values.values()), values

    def logged(self, loss: torch.Tensor, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """The micro-batch's loss and terms as numbers, averaged over the processes (the same on each)."""
        names = ["loss", *values]
        stacked = torch.stack([loss.detach(), *(v.detach() for v in values.values())]).float()
        return dict(zip(names, (self.processes.sum(stacked) / self.processes.world).tolist()))

    def check_finite(self, logged: dict[str, float], epoch: int) -> None:
        """Stop at the first non-finite loss term, or a non-finite total of finite terms (their weighted
        sum overflowed), before it reaches the weights (every process alike)."""
        where = (f"at epoch {epoch + 1}, step {self.state.batch + 1} of {self.steps_per_epoch} (optimizer step "
                 f"{self.state.step + 1}); the run stops, its last good checkpoint is kept")
        for name, value in logged.items():
            if name != "loss" and not math.isfinite(value):
                raise RunFailed(f"the loss term {name!r} is {value} {where}")
        if not math.isfinite(logged["loss"]):
            raise RunFailed(f"the weighted sum of the loss terms is {logged['loss']} {where}")

    # --- evaluation -------------------------------------------------------------------------------

    def evaluate_test(self) -> dict:
        """The test split's top-1, for the summary: the final student's (``test_top1``, per head and
        ``eval``) and, when a held-out validation split chose the best epoch, that epoch's student's
        (``best_test_top1``). Without a held-out split the validation set is the test split."""
        if self.parts.loaders.test is None:
            return {"test_top1": self.summary["top1"], "best_test_top1": None}
        best = None
        if self.state.best_model is not None:
            best = copy.deepcopy(self.state.model)
            best.load_state_dict(self.state.best_model)
        return {"test_top1": self.evaluate(loader=self.parts.loaders.test),
                "best_test_top1": self.evaluate(best, loader=self.parts.loaders.test)["eval"] if best else None}

    @torch.no_grad()
    def evaluate(self, model: DistillModel | None = None, loader=None) -> dict[str, float]:
        """Top-1 (%) per head and for the eval prediction (``eval``) on the validation set (or ``loader``).

        ``model`` defaults to the trained one; a plugin may pass another with the same heads (an EMA copy).
        Each process evaluates its shard and the counts are summed: every image counts exactly once.
        """
        model = self.state.model if model is None else model
        was_training = model.training
        model.eval()
        names = prediction_names(list(model.heads))
        hits = torch.zeros(len(names) + 1, dtype=torch.float64)  # per prediction, then the image count
        for images, labels in self.parts.loaders.val if loader is None else loader:
            images, labels = images.to(self.device), labels.to(self.device)
            with autocast(self.device, self.cfg.precision):
                logits = predictions(model(images), model.eval_heads)
            hits += torch.tensor([(logits[n].argmax(-1) == labels).sum().item() for n in names] + [len(labels)])
        model.train(was_training)
        return self.top1(names, hits)

    def top1(self, names: list[str], hits: torch.Tensor) -> dict[str, float]:
        """Top-1 (%) from each process's hits (one count per name, then the images), summed over processes."""
        hits = self.processes.sum(hits.to(self.device)).cpu()
        counts = hits.tolist()
        return {name: 100.0 * counts[i] / counts[-1] for i, name in enumerate(names)}

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

    @torch.no_grad()
    def evaluate_teacher(self, name: str) -> float:
        """Validation top-1 (%) of one teacher, on the inputs it gets during training."""
        hits = torch.zeros(2, dtype=torch.float64)
        for images, labels in self.parts.loaders.val:
            images, labels = images.to(self.device), labels.to(self.device)
            logits = self.parts.teachers[name].logits(images, self.mean, self.std)
            hits += torch.tensor([(logits.argmax(-1) == labels).sum().item(), len(labels)])
        return self.top1([name], hits)[name]
