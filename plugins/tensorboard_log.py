"""Callback ``tensorboard``: the run's numbers as TensorBoard scalars (``pip install 'kdkit[tensorboard]'``).

After each epoch it writes that epoch's metrics row, under the epoch number: ``top1/<head>`` (and
``top1/eval``, ``top1/heads_mean``, any plugin's evaluation), ``train/<term>`` (the epoch's mean of
each loss term and of ``loss``), ``lr`` and ``images_per_s``. With ``every_steps`` > 0 it also writes
the loss terms of every ``every_steps``-th optimizer step, as ``step/<term>`` under the step number.
The files go to ``log_dir`` (relative: to the working directory), by default ``tensorboard/`` in the run
directory; a resumed run appends to them, and TensorBoard shows the later value of a step written
twice. Rank 0 alone writes.
"""
from __future__ import annotations

import importlib.util
from typing import Annotated

from kdkit import api


class TensorBoard:
    """Writes scalars with torch's ``SummaryWriter`` (TensorBoard's own event files)."""

    main_process_only = True

    def __init__(self, log_dir: str, every_steps: int):
        self.log_dir, self.every_steps, self.writer = log_dir, every_steps, None

    @api.hookimpl
    def kdkit_run_start(self, trainer) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(self.log_dir or str(trainer.rundir.path / "tensorboard"))

    @api.hookimpl
    def kdkit_step_end(self, trainer, logged: dict[str, float]) -> None:
        if self.every_steps and trainer.step % self.every_steps == 0:
            for term, value in logged.items():
                self.writer.add_scalar(f"step/{term}", value, trainer.step)

    @api.hookimpl
    def kdkit_epoch_end(self, trainer, row: dict) -> None:
        epoch = row["epoch"]
        for group in ("top1", "train"):
            for name, value in row[group].items():
                self.writer.add_scalar(f"{group}/{name}", value, epoch)
        for name in ("lr", "images_per_s"):
            self.writer.add_scalar(name, row[name], epoch)
        self.writer.flush()  # an epoch's numbers are on disk before the next epoch starts

    @api.hookimpl
    def kdkit_run_end(self, trainer, status: str) -> None:
        if self.writer is not None:
            self.writer.close()


def tensorboard(log_dir: str = "", every_steps: Annotated[int, api.Range(ge=0)] = 0) -> TensorBoard:
    """TensorBoard scalars of every epoch (and of every ``every_steps``-th step when > 0) in ``log_dir``
    (default: ``tensorboard/`` in the run directory)."""
    if importlib.util.find_spec("tensorboard") is None:  # torch's SummaryWriter needs it
        raise api.KdkitError("callbacks.tensorboard: the tensorboard package is not installed "
                             "(pip install 'kdkit[tensorboard]')")
    return TensorBoard(log_dir, every_steps)


@api.hookimpl
def kdkit_register_callbacks(registry):
    registry.register_module("tensorboard", module=tensorboard)
