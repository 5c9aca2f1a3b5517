"""What changes while training (``TrainState``, what a checkpoint saves) and the schedule rebuilt from it."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from timm.scheduler import create_scheduler_v2

from kdkit.builder.model import DistillModel
from kdkit.recipe.sections import TrainConfig


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
