"""Callback ``export``: ``student.safetensors`` when the run completes (every run uses it)."""
from __future__ import annotations

from kdkit import api


class Export:
    """Writes the trained student and its heads, with what ``kdkit.load`` needs to rebuild them."""

    main_process_only = True

    @api.hookimpl
    def kdkit_run_end(self, trainer: api.Run, status: str) -> None:
        if status == "completed":
            api.save_export(trainer.rundir.export, trainer.model, trainer.export_meta)


def export() -> Export:
    """student.safetensors when the run completes; every run has it."""
    return Export()


@api.hookimpl
def kdkit_register_callbacks(registry):
    registry.register_module("export", module=export)
