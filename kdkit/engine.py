"""The one generic multi-teacher distillation loop.

Every teacher sees exactly the batch the student sees (after mixup/cutmix); every loss term is
kept under gradient accumulation; randomness (augmentation, mixing, drop-path) is a function of
(seed, epoch, step or sample), and all training state lives in ``TrainState``.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn

from kdkit.config import TrainConfig
from kdkit.data import Loaders, Targets, sample_seed
from kdkit.model import DistillModel, combine
from kdkit.teacher import Teacher


@dataclass
class LossTerm:
    """One weighted entry of ``[[losses]]``: a loss on one head, taught by zero or more teachers."""

    name: str
    fn: object
    head: str
    teachers: list[str]
    weight: float


@dataclass
class TrainState:
    """Everything that changes while training: what a checkpoint saves and a resume restores."""

    model: DistillModel
    optimizer: torch.optim.Optimizer
    scheduler: object
    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer updates so far
    best_top1: float = -1.0
    best_epoch: int = 0
    history: list[dict] = field(default_factory=list)

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "history": self.history,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for key in ("epoch", "step", "best_top1", "best_epoch", "history"):
            setattr(self, key, state[key])


def create_state(model: DistillModel, cfg: TrainConfig, steps_per_epoch: int) -> TrainState:
    """AdamW (no decay on norms, biases, position embeddings, tokens) and warmup + cosine per step."""
    optimizer = create_optimizer_v2(model, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    momentum=cfg.momentum)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=cfg.epochs, min_lr=cfg.min_lr,
                                       warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs,
                                       step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    scheduler.step_update(0)
    return TrainState(model, optimizer, scheduler)


def autocast(device: torch.device, precision: str):
    """``auto``: bf16 autocast on CUDA, fp32 elsewhere; ``bf16`` everywhere; ``fp32`` never."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


class Trainer:
    """Runs epochs of distillation and evaluation over a ``TrainState``."""

    def __init__(self, state: TrainState, teachers: dict[str, Teacher], terms: list[LossTerm], loaders: Loaders,
                 targets: Targets, cfg: TrainConfig, *, seed: int, device: torch.device, mean, std):
        self.state, self.teachers, self.terms = state, teachers, terms
        self.loaders, self.targets, self.cfg, self.seed, self.device = loaders, targets, cfg, seed, device
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.needed_teachers = sorted({t for term in terms for t in term.teachers})

    def losses(self, images: torch.Tensor, target: torch.Tensor, labels: torch.Tensor):
        """Total loss and each weighted term, for one (micro-)batch."""
        with autocast(self.device, self.cfg.precision):
            logits = self.state.model(images)
        teacher_logits = {name: self.teachers[name].logits(images, self.mean, self.std)
                          for name in self.needed_teachers}
        values = {}
        for term in self.terms:
            value = term.fn(logits[term.head], target=target, labels=labels,
                            teacher_logits=[teacher_logits[t] for t in term.teachers])
            values[term.name] = term.weight * value
        return sum(values.values()), values

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, epoch: int) -> dict[str, float]:
        """One optimizer update; the batch is split into ``accum_steps`` micro-batches, all terms kept."""
        state, cfg = self.state, self.cfg
        torch.manual_seed(sample_seed(self.seed, epoch, state.step, 0x64726F70))  # drop-path, dropout
        images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        mixed, target = self.targets(images, labels, epoch=epoch, step=state.step)
        totals: dict[str, float] = defaultdict(float)
        for chunk in zip(*(t.chunk(cfg.accum_steps) for t in (mixed, target, labels))):
            loss, values = self.losses(*chunk)
            (loss / cfg.accum_steps).backward()
            totals["loss"] += loss.item() / cfg.accum_steps
            for name, value in values.items():
                totals[name] += value.item() / cfg.accum_steps
        if cfg.clip_grad > 0:
            nn.utils.clip_grad_norm_(state.model.parameters(), cfg.clip_grad)
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.scheduler.step_update(state.step)
        return dict(totals)

    def train_epoch(self, epoch: int, on_step=None) -> dict:
        """Train one epoch; ``on_step(step_in_epoch, totals, lr)`` reports progress."""
        self.state.model.train()
        self.loaders.sampler.set_epoch(epoch)
        sums: dict[str, float] = defaultdict(float)
        count, seen, start = 0, 0, time.perf_counter()
        lr = self.state.optimizer.param_groups[0]["lr"]
        for i, (images, labels) in enumerate(self.loaders.train):
            lr = self.state.optimizer.param_groups[0]["lr"]
            values = self.train_step(images, labels, epoch)
            for key, value in values.items():
                sums[key] += value
            count, seen = count + 1, seen + len(labels)
            if on_step:
                on_step(i + 1, values, lr, seen / (time.perf_counter() - start))
        wall = time.perf_counter() - start
        return {"lr": lr, "train": {k: v / max(count, 1) for k, v in sums.items()},
                "images_per_s": seen / wall if wall else 0.0, "wall_s": wall}

    @torch.no_grad()
    def evaluate(self, loader=None) -> tuple[dict[str, float], float]:
        """Top-1 (%) per head and for the eval prediction; and inference images/s."""
        model = self.state.model
        model.eval()
        correct: dict[str, int] = defaultdict(int)
        total, elapsed = 0, 0.0
        for images, labels in loader or self.loaders.val:
            images, labels = images.to(self.device), labels.to(self.device)
            start = time.perf_counter()
            with autocast(self.device, self.cfg.precision):
                logits = model(images)
            logits["eval"] = combine(logits, model.eval_heads)
            elapsed += time.perf_counter() - start
            for name, value in logits.items():
                correct[name] += (value.argmax(-1) == labels).sum().item()
            total += len(labels)
        return {k: 100.0 * v / total for k, v in correct.items()}, (total / elapsed if elapsed else 0.0)

    @torch.no_grad()
    def evaluate_teacher(self, name: str) -> float:
        """Validation top-1 (%) of one teacher, on the inputs it gets during training."""
        correct = total = 0
        for images, labels in self.loaders.val:
            images, labels = images.to(self.device), labels.to(self.device)
            logits = self.teachers[name].logits(images, self.mean, self.std)
            correct += (logits.argmax(-1) == labels).sum().item()
            total += len(labels)
        return 100.0 * correct / total
