"""Callback ``progress``: a progress bar, a line per epoch and a closing summary table, on stderr.

The command line turns it on; the Python API ``kdkit.run`` prints nothing unless ``progress=True``.
"""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from kdkit import api


class ProgressDisplay:
    """Shows the run as it goes: teachers' top-1, steps with loss terms and speed, epochs' top-1."""

    main_process_only = True

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.progress: Progress | None = None
        self.task = None

    @api.hookimpl
    def kdkit_run_start(self, trainer: api.Run) -> None:
        for name, value in trainer.summary.teacher_top1.items():
            self.console.print(f"teacher {name!r}: validation top-1 {value:.2f}%", soft_wrap=True)
        if trainer.resumed:
            self.console.print(f"resuming {trainer.rundir.path} at epoch {trainer.epoch + 1}, step {trainer.batch}",
                               soft_wrap=True)
        columns = [TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"), BarColumn(),
                   MofNCompleteColumn(), TextColumn("{task.fields[info]}"), TimeRemainingColumn()]
        self.progress = Progress(*columns, console=self.console)
        self.progress.start()
        steps = trainer.steps_per_epoch
        self.task = self.progress.add_task("train", total=steps * trainer.epochs,
                                           completed=steps * trainer.epoch + trainer.batch,
                                           epoch=trainer.epoch + 1, epochs=trainer.epochs, info="")

    @api.hookimpl
    def kdkit_step_end(self, trainer: api.Run, logged: dict[str, float]) -> None:
        info = " ".join(f"{k} {v:.3f}" for k, v in logged.items())
        self.progress.update(self.task, advance=1, epoch=trainer.epoch + 1,
                             info=f"{info} lr {trainer.lr:.2e} {trainer.epoch_images_per_s:.0f} img/s")

    @api.hookimpl
    def kdkit_epoch_end(self, trainer: api.Run, row: dict) -> None:
        self.progress.console.print(f"epoch {row['epoch']}: " +
                                    " ".join(f"{k} {v:.2f}%" for k, v in row["top1"].items()))

    @api.hookimpl
    def kdkit_run_end(self, trainer: api.Run, status: str) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.console.print(summary_table(trainer.summary, trainer.rundir.path))


def summary_table(s: api.Summary, path) -> Table:
    table = Table(title=f"{s.name} (seed {s.seed}): {s.status}", show_header=False)
    table.add_row("run directory", str(path))
    table.add_row("epochs", str(s.epochs) + (f" (stopped early: {s.stop_reason})" if s.stopped_early else ""))
    validation = s.best_selected_on == "validation"
    for head, value in s.top1.items():
        table.add_row(f"{'validation' if validation else 'test'} top-1 {head}", f"{value:.2f}%")
    if s.best_top1 is not None:
        table.add_row("best epoch", f"{s.best_epoch}: {s.best_top1:.2f}% (selected on the {s.best_selected_on} split)")
    if validation and s.best_test_top1 is not None:
        for head, value in s.test_top1.items():
            table.add_row(f"test top-1 {head}", f"{value:.2f}%")
        table.add_row("test top-1, best epoch", f"{s.best_test_top1:.2f}%")
    for name, value in s.teacher_top1.items():
        table.add_row(f"teacher {name}", f"{value:.2f}%")
    table.add_row("parameters", f"{s.params:,}")
    table.add_row("FLOPs / image", f"{s.flops:,}" if s.flops else "n/a")
    for value, label in ((s.train_images_per_s, "train img/s"), (s.infer_images_per_s, "infer img/s")):
        if value is not None:
            table.add_row(label, f"{value:.0f}")
    table.add_row("wall time", f"{s.wall_s:.1f} s")
    return table


def progress() -> ProgressDisplay:
    """A progress bar, a line per epoch and a summary table on stderr (kdkit run turns it on)."""
    return ProgressDisplay()


@api.hookimpl
def kdkit_register_callbacks(registry):
    registry.register_module("progress", module=progress)
