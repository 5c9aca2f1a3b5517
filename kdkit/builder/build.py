"""From a checked experiment to everything a run trains with, and ``kdkit.build``: a recipe built for a notebook.

Building reads the data and the weights and trains what is missing (teachers given by their own
recipes, teacher-output caches); it writes nothing else. ``build_all_parts`` is what every command
builds with; ``build`` adds the distillation step and hands the lot to a user.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from kdkit.builder.parts import Parts, build_parts, build_splits, build_teachers
from kdkit.builder.teacher_cache import open_caches
from kdkit.plugin.discovery import Plugins, default_plugins
from kdkit.recipe.experiment import Experiment, resolve
from kdkit.recipe.sections import cache_root
from kdkit.recipe.toml import Recipe, load_recipe
from kdkit.store.rundir import RunDir
from kdkit.train.processes import Processes
from kdkit.train.step import DistillStep, build_step


@dataclass
class Built:
    """A recipe built as ``kdkit run`` builds it, with nothing written: its checked ``experiment``, its
    ``parts`` (data, loaders, the student with its heads, teachers or their caches) and its distillation
    ``step``, whose optimizer starts at ``train.lr`` (the schedule belongs to a run)."""

    experiment: Experiment
    parts: Parts
    step: DistillStep

    @property
    def model(self):
        """The student with its heads (``kdkit.builder.model.DistillModel``): what the step trains."""
        return self.parts.model

    @property
    def teachers(self) -> dict:
        return self.parts.teachers

    @property
    def loaders(self):
        """``train`` (its sampler's epoch set with ``loaders.sampler.set_epoch``), ``val`` and ``test``."""
        return self.parts.loaders


def build(recipe, overrides=(), *, train_teachers: bool = False, allow_random_teachers: bool = False,
          device=None) -> Built:
    """``recipe`` (a file, or a table as a dict: ``load_recipe``) with ``overrides`` checked and built,
    nothing written. A teacher that its recipe has not trained yet, or a teacher-output cache not built
    yet, is a ``KdkitError`` naming the command that makes it, unless ``train_teachers`` (then they are trained or built, as ``kdkit run`` would)."""
    plugins = default_plugins()
    exp = resolve(load_recipe(recipe, list(overrides)), plugins, allow_random_teachers=allow_random_teachers)
    device = torch.device(device) if device is not None else Processes().device()  # one process
    parts = build_all_parts(exp, plugins, device, train_teachers=train_teachers, build_caches=train_teachers)
    return Built(exp, parts, build_step(exp, parts, device))


class BuildProgress:
    """A progress bar for work before the run's own display starts (building teacher-output caches)."""

    def __init__(self, console):
        self.console, self.bar = console, None

    def start(self, title: str, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            console=self.console)
        self.bar.start()
        self.task = self.bar.add_task(title, total=total)

    def advance(self, count: int) -> None:
        self.bar.update(self.task, advance=count)

    def stop(self) -> None:
        self.bar.stop()


def build_all_parts(exp: Experiment, plugins: Plugins, device: torch.device, *, train_teachers: bool,
                    caches: bool = True, build_caches: bool = True, progress: bool = False, console=None,
                    processes: Processes = Processes(), wait_for_caches: bool = True) -> Parts:
    """Every part of ``exp``, built as every run builds it: the student (seeded first), then the teachers
    (trained by their recipes first where missing, if ``train_teachers``), then their output caches
    (unless ``caches`` is false: live teachers), built first where missing if ``build_caches``; one that
    another process builds is waited for, unless ``wait_for_caches`` is false: then refused)."""
    torch.manual_seed(exp.seed)  # model initialisation; random teachers are built after the student
    parts = build_parts(exp, plugins, device, processes)
    with torch.random.fork_rng(devices=[]):  # teachers trained now leave this run's random stream alone
        runs = ensure_teachers(exp, plugins, train_teachers=train_teachers, progress=progress, console=console,
                               processes=processes)
    parts = dataclasses.replace(parts, teachers=build_teachers(exp, plugins, parts, device, runs))
    if exp.teacher_cache and caches:
        outputs = open_caches(exp, parts, device, build=build_caches, processes=processes,
                              progress=BuildProgress(console) if console else None,
                              waiting=say(console) if wait_for_caches else None)
        parts = dataclasses.replace(parts, teacher_outputs=outputs)
    return parts


def say(console):
    """A lock's ``waiting`` callback: the message goes to ``console``, when there is one."""
    def waiting(message: str) -> None:
        if console is not None:
            console.print(message, markup=False, highlight=False)
    return waiting


def teacher_run_dir(recipe: Recipe, plugins: Plugins) -> Path:
    """Where the teacher trained by ``recipe`` is cached: keyed by the resolved recipe and the identity of
    its data (``DatasetSplits.identity``), so a teacher trained on other data is never reused."""
    data = build_splits(resolve(recipe, plugins), plugins).identity()
    key = hashlib.sha256(f"{recipe.hash()} {data}".encode()).hexdigest()[:16]
    return cache_root() / "teachers" / f"{recipe.table['name']}-{key}"


def teacher_runs(exp: Experiment, plugins: Plugins) -> dict[str, Path]:
    """The run directory of every teacher given by a recipe (trained there already, or to be), by name."""
    return {name: teacher_run_dir(spec.recipe, plugins) for name, spec in exp.teachers.items() if spec.recipe}


def untrained(runs: dict[str, Path], processes: Processes = Processes()) -> dict[str, Path]:
    """Those of ``runs`` that have not completed."""
    return {name: out for name, out in runs.items() if processes.on_main(RunDir(out).status) != "completed"}


def ensure_teachers(exp: Experiment, plugins: Plugins, *, train_teachers: bool, progress: bool = False,
                    console=None, processes: Processes = Processes()) -> dict[str, Path]:
    """Train (or resume) every teacher given by a recipe that is not cached yet; returns every such
    teacher's run directory, by name (what ``build_teachers`` loads them from).

    A teacher that another process is training is waited for (its run directory's lock), then reused.
    Under torchrun the same processes train it, data-parallel, as its own run (rank 0 decides what to do).
    """
    runs = teacher_runs(exp, plugins)
    for name, out in untrained(runs, processes).items():
        spec = exp.teachers[name]
        if not train_teachers:
            raise exp.recipe.error(f"teachers.{name}.recipe", f"teacher not trained yet ({out} is missing "
                                   "or unfinished): kdkit run trains it first, unless --no-train-teachers "
                                   "(kdkit.build: with train_teachers=True)")
        rundir = RunDir(out)
        processes.on_main(lambda: rundir.claim(waiting=say(console)))
        try:
            status, resume = processes.on_main(lambda: (rundir.status(), rundir.last.is_file()))
            if status != "completed":
                if console is not None:
                    console.print(f"[bold]{'resuming' if resume else 'training'} teacher {name!r}[/] from "
                                  f"{spec.recipe.path} in {out}")
                from kdkit.train.run import run  # training a teacher is a run of its own recipe

                run(spec.recipe.path, out=out, force=not resume, resume=resume, progress=progress,
                    console=console)
        finally:
            if processes.is_main:
                rundir.release()
    return runs
