"""What lifecycle hooks see of a run: ``Run``, a read-only view of the ``Trainer`` (``kdkit.api.Run``).

Hooks read the run's counters, history and summary, evaluate a model, ask for a checkpoint or for the
run to stop; they cannot reach the optimizer, the schedule or the loop, so nothing a callback does
can make a resumed run differ from one never stopped (beyond its own ``kdkit_state_dict``). The hook
argument keeps its name, ``trainer`` (pluggy matches implementations by argument name).

``state``, the ``TrainState`` that 0.1 callbacks read, stays one release as a read-only alias.
"""
from __future__ import annotations

import copy
import warnings
import weakref
from typing import TYPE_CHECKING

import torch

from kdkit.store.summary import Summary

if TYPE_CHECKING:
    from kdkit.train.loop import Trainer


def _read(part: str | None, name: str) -> property:
    """A read-only property: the trainer's ``name`` (or that of its ``part``, e.g. its ``state``)."""
    def get(self):
        owner = self._trainer if part is None else getattr(self._trainer, part)
        return getattr(owner, name)
    return property(get)


class Run:
    """A run as its callbacks see it. Counters: ``epoch`` (completed epochs), ``batch`` (batches trained
    in the unfinished epoch), ``step`` (optimizer updates so far), ``epochs`` (``train.epochs``),
    ``steps_per_epoch``; ``lr``; ``history`` (one metrics row per completed epoch, a copy);
    ``best_top1`` and ``best_epoch``; ``epoch_images_per_s`` (the unfinished epoch's speed so far);
    ``summary`` (an ``api.Summary``, a copy); ``rundir``; ``export_meta`` (a copy); ``model`` (the trained student with
    its heads: read it, never change it); ``is_main`` (rank 0: the process that writes and prints);
    ``resumed``. Methods: ``evaluate(model)``, ``checkpoint()``, ``request_stop(reason)``."""

    def __init__(self, trainer: Trainer):
        # The engine's, for the engine's own tests only. Weakly: the trainer holds its view, and a cycle
        # would keep the run (its loader workers too) alive until a garbage collection, whose shutdown
        # of the workers waits for each in vain (torch's queues are finalized first).
        self._trainer = weakref.proxy(trainer)

    epoch = _read("state", "epoch")
    batch = _read("state", "batch")
    step = _read("state", "step")
    best_top1 = _read("state", "best_top1")
    best_epoch = _read("state", "best_epoch")
    model = _read("state", "model")
    steps_per_epoch = _read(None, "steps_per_epoch")
    lr = _read(None, "lr")
    rundir = _read(None, "rundir")
    is_main = _read(None, "is_main")
    resumed = _read(None, "resumed")
    epochs = _read("cfg", "epochs")

    @property
    def history(self) -> list[dict]:
        return copy.deepcopy(self._trainer.state.history)

    @property
    def epoch_images_per_s(self) -> float:
        state = self._trainer.state
        return state.seen / state.train_s if state.train_s else 0.0

    @property
    def summary(self) -> Summary:
        return copy.deepcopy(self._trainer.summary)

    @property
    def export_meta(self) -> dict:
        return copy.deepcopy(self._trainer.export_meta)

    def evaluate(self, model: torch.nn.Module | None = None) -> dict[str, float]:
        """Validation top-1 (%) per head and ``eval`` of ``model`` (default: the trained one; e.g. an EMA copy)."""
        return self._trainer.evaluate(model)

    def checkpoint(self) -> dict:
        """The whole training state, the summary and every plugin's ``kdkit_state_dict``: what ``last.pt`` holds."""
        return self._trainer.checkpoint()

    def request_stop(self, reason: str) -> None:
        """End the run after the current epoch, completed (``Trainer.request_stop``)."""
        self._trainer.request_stop(reason)

    @property
    def state(self) -> ReadOnlyState:
        """Deprecated (0.1): read ``model``, ``epoch``, ``step``, ``batch``, ``history``... on the run itself."""
        warnings.warn("trainer.state is deprecated: read trainer.model, trainer.epoch, trainer.step, "
                      "trainer.history... (kdkit.api.Run)", DeprecationWarning, stacklevel=2)
        return ReadOnlyState(self._trainer.state)


class ReadOnlyState:
    """The ``TrainState`` that 0.1 callbacks read (``trainer.state.model``, ``.step``...), without setters."""

    def __init__(self, state):
        object.__setattr__(self, "_state", state)

    def __getattr__(self, name: str):
        if name.startswith("_") or name in ("optimizer", "state_dict", "load_state_dict"):
            raise AttributeError(f"a run's callbacks cannot reach trainer.state.{name}")
        return getattr(self._state, name)

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"trainer.state.{name} is read-only: callbacks never change the training state")
