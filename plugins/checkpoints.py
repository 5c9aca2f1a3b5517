"""Callback ``checkpoints``: ``checkpoints/last.pt`` after every epoch and when a signal stops the run,
``checkpoints/best.pt`` whenever the eval top-1 improves.

Every run uses it. Each file is written atomically (``api.save_checkpoint``), so a checkpoint that cannot
be written (a full disk, an unwritable folder) leaves the previous one intact and fails the run
(``RunFailed``, naming the file and the reason).
"""
from __future__ import annotations

from kdkit import api


class Checkpoints:
    """Writes the trainer's whole state (``Trainer.checkpoint()``) into the run directory."""

    main_process_only = True

    @api.hookimpl
    def kdkit_epoch_end(self, trainer: api.Run, row: dict) -> None:
        checkpoint = trainer.checkpoint()
        api.save_checkpoint(trainer.rundir.last, checkpoint)
        if trainer.best_epoch == trainer.epoch:
            api.save_checkpoint(trainer.rundir.best, checkpoint)

    @api.hookimpl
    def kdkit_run_end(self, trainer: api.Run, status: str) -> None:
        if status == "interrupted":  # mid-epoch: the state after the last finished step
            api.save_checkpoint(trainer.rundir.last, trainer.checkpoint())


def checkpoints() -> Checkpoints:
    """checkpoints/last.pt every epoch and on a signal, best.pt on a better eval top-1; every run has it."""
    return Checkpoints()


@api.hookimpl
def kdkit_register_callbacks(registry):
    registry.register_module("checkpoints", module=checkpoints)
