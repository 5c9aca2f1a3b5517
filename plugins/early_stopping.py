"""Callback ``early_stopping``: end the run once a metric of the epochs has not improved for ``patience`` epochs.

``metric`` names a number of each epoch's ``metrics.jsonl`` row by its dotted path: ``top1.eval``
(the default; any head, ``heads_mean`` or a plugin's evaluation entry), ``train.loss`` or a loss term
such as ``train.kl/conv`` (with ``mode = "min"``), ``lr``; never a timing, which would make runs differ.
An epoch improves on the best so far when it is better by more than ``min_delta``. A ``train.`` path is
checked against the first step's terms, a ``top1.`` path against the first epoch's row: a path the run
does not have fails it (exit 1) then, naming what it has.

The decision is a function of the run's history alone (``trainer.history``, which checkpoints
hold), so the callback keeps no state: a run interrupted between an epoch and its decision decides
again when it resumes, at its start. The run then ends ``completed`` like any other (test split
evaluated, student exported), and its summary says ``stopped_early`` and why.
"""
from __future__ import annotations

from typing import Annotated, Literal

from kdkit import api


ROW_NUMBERS = ("top1", "train", "lr")  # a metrics row's numbers that do not depend on timing


class EarlyStopping:
    """Asks the run to stop (``trainer.request_stop``) after ``patience`` epochs without improvement."""

    def __init__(self, metric: str, mode: str, patience: int, min_delta: float):
        self.metric, self.mode, self.patience, self.min_delta = metric, mode, patience, min_delta

    def value(self, row: dict) -> float:
        """The metric in one metrics row; a path the row does not have fails the run, naming what it has."""
        value = row
        for part in self.metric.split("."):
            if not isinstance(value, dict) or part not in value:
                raise api.RunFailed(f"callbacks.early_stopping.metric: the epochs' rows have no {self.metric!r}; "
                                    f"they have {', '.join(paths(row))}")
            value = value[part]
        return float(value)

    def decide(self, trainer) -> None:
        sign = 1.0 if self.mode == "max" else -1.0
        best, best_epoch = None, 0
        history = trainer.history  # a copy each time it is read
        for epoch, row in enumerate(history, start=1):
            value = self.value(row)
            if best is None or sign * (value - best) > self.min_delta:
                best, best_epoch = value, epoch
        waited = len(history) - best_epoch
        if best is not None and waited >= self.patience:
            trainer.request_stop(f"{self.metric} has not improved by more than {self.min_delta:g} for {waited} "
                                 f"epochs (best {best:.4g}, epoch {best_epoch})")

    @api.hookimpl
    def kdkit_run_start(self, trainer) -> None:
        self.decide(trainer)  # a resumed run: the decision its last epoch may not have acted on

    @api.hookimpl
    def kdkit_step_end(self, trainer, logged: dict[str, float]) -> None:
        if self.metric.startswith("train.") and trainer.step == 1:  # the first step names every term
            self.value({"train": logged})

    @api.hookimpl
    def kdkit_epoch_end(self, trainer, row: dict) -> None:
        self.decide(trainer)


def paths(row: dict, prefix: str = "") -> list[str]:
    """The dotted paths of a row's numbers."""
    out = []
    for key, value in row.items():
        if isinstance(value, dict):
            out += paths(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)) and key != "epoch":
            out.append(prefix + key)
    return out


def early_stopping(metric: str = "top1.eval", mode: Literal["max", "min"] = "max",
                   patience: Annotated[int, api.Range(ge=1)] = 10,
                   min_delta: Annotated[float, api.Range(ge=0)] = 0.0) -> EarlyStopping:
    """Stop the run once ``metric`` (a metrics row's dotted path) has not improved for ``patience`` epochs."""
    if metric.split(".")[0] not in ROW_NUMBERS:  # the rest of the path is checked against the first epoch's row
        raise api.KdkitError(f"callbacks.early_stopping.metric: {metric!r} is not in an epoch's metrics row: it "
                             f"starts with one of {', '.join(ROW_NUMBERS)} (e.g. top1.eval, train.loss)")
    return EarlyStopping(metric, mode, patience, min_delta)


@api.hookimpl
def kdkit_register_callbacks(registry):
    registry.register_module("early_stopping", module=early_stopping)
