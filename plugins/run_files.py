"""Callback ``run_files``: the run's record on disk, ``metrics.jsonl`` and ``summary.json``.

Every run uses it. At the start it removes the temporaries a killed run left behind. ``metrics.jsonl``
is rewritten from the run's history at every completed epoch (atomically, like every run file; a
resumed run's history is its checkpoint's, so lines written after that checkpoint go and every epoch
appears exactly once). ``summary.json`` is rewritten at every event, last of all when the run ends.
"""
from __future__ import annotations

import dataclasses

from kdkit import api


class RunFiles:
    """Writes ``metrics.jsonl`` and ``summary.json`` into the run directory."""

    main_process_only = True

    @api.hookimpl
    def kdkit_run_start(self, trainer: api.Run) -> None:
        trainer.rundir.remove_temporaries()
        if trainer.resumed:
            trainer.rundir.write_metrics(trainer.history)
        trainer.rundir.write_summary(trainer.summary)

    @api.hookimpl
    def kdkit_epoch_end(self, trainer: api.Run, row: dict) -> None:
        trainer.rundir.write_metrics(trainer.history)
        trainer.rundir.write_summary(trainer.summary)

    @api.hookimpl(wrapper=True)
    def kdkit_run_end(self, trainer: api.Run, status: str):
        """Around the other run-end hooks, so the summary comes last ('completed' means the export is written)
        and says 'failed' when one of them failed (the export or the checkpoint could not be written)."""
        try:
            yield
        except Exception as exc:
            with api.keep_first_error(exc):
                trainer.rundir.write_summary(dataclasses.replace(trainer.summary, status="failed"))
            raise
        trainer.rundir.write_summary(trainer.summary)


def run_files() -> RunFiles:
    """metrics.jsonl (a line per epoch) and summary.json; every run has it."""
    return RunFiles()


@api.hookimpl
def kdkit_register_callbacks(registry):
    registry.register_module("run_files", module=run_files)
