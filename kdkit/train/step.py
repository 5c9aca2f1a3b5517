"""One distillation step: the student's optimizer update on one batch, every teacher teaching at once.

``DistillStep`` owns what a step needs and nothing of the run around it: the trainable module (the
student and its heads, wrapped for data parallelism and compiled when asked), the teachers or their
output caches, the mixing of images and targets, the weighted loss terms and the optimizer. The loop
(``kdkit.train.loop.Trainer``) keeps the state, the schedule, signals, bookkeeping and hooks, and calls
the step once per batch; a notebook can build one with ``kdkit.build`` and call it just the same.

Follow one batch: ``__call__`` seeds drop-path from (seed, epoch, step), mixes the batch
(``Targets``), splits it into ``train.accum_steps`` micro-batches, gets the teachers' outputs for the
very images the student sees (``teacher_logits``, or ``cached_teacher_logits``), computes every term
(``losses``), refuses a non-finite one before it reaches the weights (``check_finite``), and steps the
optimizer once.
"""
from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass

import torch
from timm.optim import create_optimizer_v2
from torch import nn

from kdkit.builder.data import Targets, sample_seed
from kdkit.builder.model import DistillModel
from kdkit.builder.parts import Parts
from kdkit.builder.teacher import Teacher
from kdkit.builder.teacher_cache import mix_teacher_outputs
from kdkit.errors import RunFailed
from kdkit.recipe.experiment import Experiment, LossTerm
from kdkit.recipe.sections import TrainConfig
from kdkit.train.precision import autocast
from kdkit.train.processes import Processes

DROP_PATH_STREAM = 0x64726F70  # "drop": the per-step seed of drop-path and dropout


class NonFiniteLoss(RunFailed):
    """A loss term, or the weighted sum of finite terms, is not finite: the step stops before the update."""


@dataclass
class StepResult:
    """What one step logs: the batch's loss and each weighted term (averaged over micro-batches and processes)."""

    logged: dict[str, float]


def create_optimizer(model: DistillModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    """timm's optimizer factory: no weight decay on norms, biases and the student's ``no_weight_decay()``."""
    return create_optimizer_v2(model, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               momentum=cfg.momentum)


def build_step(exp: Experiment, parts: Parts, device: torch.device, processes: Processes = Processes()) -> DistillStep:
    """The step of a built experiment: its student and heads, teachers (or their caches), loss terms and
    mixing, with a fresh optimizer."""
    return DistillStep(parts.model, create_optimizer(parts.model, exp.train), terms=exp.losses, teachers=parts.teachers,
                       targets=Targets(exp.augment, parts.splits.num_classes, exp.seed),
                       normalization=parts.normalization(device), cfg=exp.train, seed=exp.seed, device=device,
                       teacher_outputs=parts.teacher_outputs, processes=processes)


class DistillStep:
    """The student's update on one batch, taught by ``teachers`` (or their ``teacher_outputs`` caches).

    ``model`` is the student with its heads; ``normalization`` the data's (mean, std), from which each
    teacher re-normalizes its input. With several processes (``processes.active``) the model trains in
    DistributedDataParallel and the logged values are the same on every process.
    """

    def __init__(self, model: DistillModel, optimizer: torch.optim.Optimizer, *, terms: list[LossTerm],
                 teachers: dict[str, Teacher], targets: Targets, normalization: tuple[torch.Tensor, torch.Tensor],
                 cfg: TrainConfig, seed: int, device: torch.device, teacher_outputs: dict | None = None,
                 processes: Processes = Processes()):
        self.model, self.optimizer, self.terms, self.teachers = model, optimizer, terms, teachers
        self.teacher_outputs, self.targets, self.cfg, self.seed = teacher_outputs, targets, cfg, seed
        self.device, self.processes = device, processes
        self.mean, self.std = normalization
        self.forward = self.data_parallel(model) if processes.active else model
        if cfg.compile:
            self.forward = torch.compile(self.forward)

    def data_parallel(self, model: DistillModel) -> nn.Module:
        """The student and its heads in DistributedDataParallel; the teachers stay outside it, replicated.
        A head no loss trains gets no gradient, which DDP must be told to expect."""
        trained = {term.head for term in self.terms}
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=not trained >= set(model.heads))

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, *, epoch: int, step: int,
                 views=None) -> StepResult:
        """One optimizer update (the ``step``-th of the run, in ``epoch``); all terms kept in every micro-batch.

        ``views`` (image indices, view numbers) says which cached views the batch replays: the
        teachers' outputs are then read from their caches (mixed as the images were) instead of computed.
        """
        cfg = self.cfg
        process = (self.processes.rank,) if self.processes.active else ()  # each process its own masks
        torch.manual_seed(sample_seed(self.seed, epoch, step, DROP_PATH_STREAM, *process))
        images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        mixed, target, lam = self.targets(images, labels, epoch=epoch, step=step)
        cached = self.cached_teacher_logits(*views, lam) if views else None
        totals: dict[str, float] = defaultdict(float)
        for i, chunk in enumerate(zip(*(t.chunk(cfg.accum_steps) for t in (mixed, target, labels)))):
            teachers = ({name: value.chunk(cfg.accum_steps)[i] for name, value in cached.items()} if cached
                        else self.teacher_logits(chunk[0]))
            last = i == cfg.accum_steps - 1  # DDP averages the gradients once, after the last micro-batch
            with contextlib.nullcontext() if last or not self.processes.active else self.forward.no_sync():
                loss, values = self.losses(*chunk, teachers)
                logged = self.logged(loss, values)
                self.check_finite(logged)
                (loss / cfg.accum_steps).backward()
            for name, value in logged.items():
                totals[name] += value / cfg.accum_steps
        if cfg.clip_grad > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(dict(totals))

    def teacher_logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every needed teacher's fp32 logits for the very (mixed) batch the student sees."""
        return {name: teacher.logits(images, self.mean, self.std) for name, teacher in self.teachers.items()}

    def cached_teacher_logits(self, indices: torch.Tensor, views: torch.Tensor, lam: float) -> dict[str, torch.Tensor]:
        """Every needed teacher's cached output for these (image, view) pairs, mixed with coefficient ``lam``."""
        return {name: mix_teacher_outputs(cache.log_probs(indices, views), lam).to(self.device)
                for name, cache in self.teacher_outputs.items()}

    def losses(self, images: torch.Tensor, target: torch.Tensor, labels: torch.Tensor,
               teacher_logits: dict[str, torch.Tensor]):
        """Total loss and each weighted term, for one (micro-)batch."""
        with autocast(self.device, self.cfg.precision):
            logits = self.forward(images)
        values = {}
        for term in self.terms:
            value = term.fn(logits[term.head], target=target, labels=labels,
                            teacher_logits=[teacher_logits[t] for t in term.teachers])
            values[term.name] = term.weight * value
        return sum(values.values()), values

    def logged(self, loss: torch.Tensor, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """The micro-batch's loss and terms as numbers, averaged over the processes (the same on each)."""
        names = ["loss", *values]
        stacked = torch.stack([loss.detach(), *(v.detach() for v in values.values())]).float()
        return dict(zip(names, (self.processes.sum(stacked) / self.processes.world).tolist()))

    @staticmethod
    def check_finite(logged: dict[str, float]) -> None:
        """Stop at the first non-finite loss term, or a non-finite total of finite terms (their weighted
        sum overflowed), before it reaches the weights (every process alike)."""
        for name, value in logged.items():
            if name != "loss" and not math.isfinite(value):
                raise NonFiniteLoss(f"the loss term {name!r} is {value}")
        if not math.isfinite(logged["loss"]):
            raise NonFiniteLoss(f"the weighted sum of the loss terms is {logged['loss']}")
