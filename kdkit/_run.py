"""``kdkit run``: check a recipe, build its parts, train missing teachers, then hand over to ``Trainer.fit``.

Nothing is written until every check has passed: the recipe (``_experiment``), the student's
one-image forward and the teachers' weights (``_parts``), the first training batch and one validation
batch through the student (``Trainer.check_first_batches``), the teachers' validation
accuracy, and the run directory (empty, or resumable with the same recipe and teachers).
"""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch

from kdkit._checkpoint import check_fits, load_checkpoint
from kdkit._config import RUN_CALLBACKS, cache_root
from kdkit._distributed import Processes
from kdkit._distributed import processes as current_processes
from kdkit._engine import Trainer
from kdkit._errors import KdkitError
from kdkit._experiment import Experiment, resolve
from kdkit._flops import FlopCount, count_flops, plugin_rules
from kdkit._model import Predictor
from kdkit._parts import Parts, build_parts, build_splits, build_teachers
from kdkit._plugins import Plugins, default_plugins
from kdkit._recipe import Recipe, diff_tables, load_recipe
from kdkit._rundir import RunDir, default_run_dir, provenance
from kdkit._teacher_cache import open_caches, summary_of


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


class TeacherWarning(UserWarning):
    """A teacher is at most twice chance on validation, and the run was told to go on anyway."""


class FlopWarning(UserWarning):
    """The FLOP count met operators it has no rule for: the reported count leaves them out."""


def run(recipe_path, overrides=(), out=None, *, force: bool = False, resume: bool = False,
        allow_changes: bool = False, allow_random_teachers: bool = False, allow_weak_teachers: bool = False,
        train_teachers: bool = True, progress: bool = False, console=None) -> Path:
    """Check, build and train one recipe (its missing teachers first); returns the run directory.

    ``resume`` continues the run in ``out`` from its last checkpoint; a recipe or teacher weights that
    differ from the run's are refused unless ``allow_changes``. A teacher at most twice chance on
    validation is refused unless ``allow_weak_teachers`` (or ``allow_random_teachers``: a random
    teacher is at chance). ``progress`` adds the progress display; ``console`` (a rich Console)
    receives messages about teachers being trained; otherwise nothing prints. Under torchrun every
    process runs this: they train together, and only rank 0 writes and prints.
    """
    plugins = default_plugins()
    processes = current_processes()
    progress, console = progress and processes.is_main, console if processes.is_main else None
    recipe = load_recipe(recipe_path, list(overrides))
    exp = resolve(recipe, plugins, allow_random_teachers=allow_random_teachers)
    callbacks = build_callbacks(exp, plugins, progress, processes)  # their hooks are checked with the recipe
    rundir = RunDir(out or default_run_dir(recipe))
    if resume:
        processes.on_main(lambda: check_resumable(rundir, recipe, allow_changes))
    else:
        processes.on_main(lambda: rundir.check_writable(force))
    checkpoint = load_checkpoint(rundir.last, Trainer.CHECKPOINT_KEYS) if resume else None
    device = processes.device()
    parts = prepare(exp, plugins, device, train_teachers=train_teachers, progress=progress, console=console,
                    processes=processes)
    fixed = facts(exp, parts, recipe, plugins, processes)
    summary = {**STARTING, **fixed} if checkpoint is None else {**checkpoint["summary"], **fixed}
    trainer = Trainer(exp, parts, device=device, rundir=rundir, hook=plugins.manager.hook, summary=summary,
                      processes=processes)
    start = (checkpoint["epoch"], checkpoint["batch"]) if checkpoint is not None else (0, 0)
    processes.on_main(lambda: trainer.check_first_batches(*start))  # the data, before anything is written
    if checkpoint is None:
        summary["teacher_top1"] = evaluate_teachers(trainer, allow_weak_teachers or allow_random_teachers)
        processes.on_main(lambda: rundir.create(recipe.to_toml(), force))
    else:
        check_teachers_unchanged(rundir, checkpoint, fixed["teacher_hashes"], allow_changes)
        check_fits(parts.model, checkpoint["model"], rundir.last)
        processes.on_main(lambda: rundir.reopen(recipe.to_toml()))
    try:
        with plugins.joined(callbacks):
            if checkpoint is not None:
                trainer.resume(checkpoint)
            trainer.fit()
    finally:
        processes.barrier()  # rank 0 has written everything (the export) before any process goes on
        if processes.is_main:
            rundir.release()
    return rundir.path


def prepare(exp: Experiment, plugins: Plugins, device: torch.device, *, train_teachers: bool, caches: bool = True,
            progress: bool = False, console=None, processes: Processes = Processes(),
            wait_for_caches: bool = True) -> Parts:
    """Every part of ``exp``, built as every run builds it: the student (seeded first), then the teachers
    (trained by their recipes first where missing), then their output caches (built first where missing;
    one that another process builds is waited for, unless ``wait_for_caches`` is false: then refused)."""
    torch.manual_seed(exp.seed)  # model initialisation; random teachers are built after the student
    parts = build_parts(exp, plugins, device, processes)
    with torch.random.fork_rng(devices=[]):  # teachers trained now leave this run's random stream alone
        ensure_teachers(exp, plugins, train_teachers=train_teachers, progress=progress, console=console,
                        processes=processes)
    parts.teachers = build_teachers(exp, plugins, parts, device)
    if exp.teacher_cache and caches:
        parts.teacher_outputs = open_caches(exp, parts, device, processes=processes,
                                            progress=BuildProgress(console) if console else None,
                                            waiting=say(console) if wait_for_caches else None)
    return parts


def build_teacher_caches(recipe_path, overrides=(), *, allow_random_teachers: bool = False, verify: bool = False,
                         console=None) -> dict:
    """``kdkit cache build``: the recipe's teacher-output caches, built where missing; their records.
    ``verify`` then checks every chunk's checksums (``unverified_chunks``: those built without any)."""
    plugins = default_plugins()
    exp = resolve(load_recipe(recipe_path, list(overrides)), plugins, allow_random_teachers=allow_random_teachers)
    if exp.teacher_cache is None:
        raise exp.recipe.error("teacher_cache", "the recipe reads no teacher-output cache: add a [teacher_cache] table")
    processes = current_processes()
    console = console if processes.is_main else None
    parts = prepare(exp, plugins, processes.device(), train_teachers=True, progress=console is not None,
                    console=console, processes=processes, wait_for_caches=False)
    records = summary_of(parts.teacher_outputs)
    if verify:
        for name, cache in parts.teacher_outputs.items():
            records[name]["unverified_chunks"] = cache.verify()
    return records


def check_resumable(rundir: RunDir, recipe: Recipe, allow_changes: bool) -> None:
    """The run has a ``last.pt``, its recipe is this one (or changes are allowed), and no other process writes it."""
    rundir.check_free()
    if not rundir.recipe.is_file():
        raise KdkitError(f"{rundir.path}: nothing to resume (no run directory with a recipe.toml there)")
    if not rundir.last.is_file():
        raise KdkitError(f"{rundir.path}: nothing to resume: the run stopped before its first checkpoint "
                         "(start it again with --force)")
    changes = diff_tables(load_recipe(rundir.recipe).table, recipe.table)
    if changes and not allow_changes:
        raise KdkitError(f"{rundir.recipe}: the recipe differs from the run's; --allow-changes resumes anyway. "
                         f"Changed: {'; '.join(changes)}")


def check_teachers_unchanged(rundir: RunDir, checkpoint: dict, hashes: dict[str, str], allow_changes: bool) -> None:
    before = checkpoint["summary"].get("teacher_hashes", {})
    changed = sorted(name for name in before.keys() | hashes.keys() if before.get(name) != hashes.get(name))
    if changed and not allow_changes:
        raise KdkitError(f"{rundir.path}: the weights of teacher(s) {', '.join(changed)} differ from the ones the "
                         "run was trained with; --allow-changes resumes anyway")


# The summary's values before the first epoch; training and the engine update them.
STARTING = {"status": "running", "epochs": 0, "top1": {}, "best_top1": None, "best_epoch": None, "test_top1": {},
            "best_test_top1": None, "teacher_top1": {}, "train_images_per_s": None, "infer_images_per_s": None,
            "wall_s": 0.0}


def student_flops(exp: Experiment, parts: Parts, plugins: Plugins) -> FlopCount:
    """Multiply-adds of one image through the student's eval prediction; operators left out are a warning."""
    device = next(parts.model.parameters()).device
    image = torch.zeros(1, parts.splits.in_chans, exp.data.image_size, exp.data.image_size, device=device)
    flops = count_flops(Predictor(parts.model), image, plugin_rules(plugins.manager.hook))
    if flops.unsupported:
        warnings.warn(f"the FLOP count leaves out operators it has no rule for: {flops.unsupported}", FlopWarning,
                      stacklevel=2)
    return flops


def facts(exp: Experiment, parts: Parts, recipe: Recipe, plugins: Plugins, processes: Processes) -> dict:
    """What the summary says about the run that training does not change (recomputed on resume)."""
    flops = student_flops(exp, parts, plugins)
    return {
        "name": exp.name, "seed": exp.seed, "world_size": processes.world,
        "best_selected_on": "validation" if exp.data.val_split > 0 else "test",
        "params": parts.model.eval_parameters(), "flops": flops.total,
        "flops_unsupported": flops.unsupported,
        "teacher_hashes": parts.teacher_hashes,
        "teacher_cache": summary_of(parts.teacher_outputs) if parts.teacher_outputs else None,
        **provenance(recipe.hash()),
    }


def evaluate_teachers(trainer: Trainer, allow_weak: bool) -> dict[str, float]:
    """Each teacher's validation top-1 (%); one at most twice chance is refused (wrong weights,
    normalization or class order?) unless ``allow_weak``, which makes it a warning."""
    chance = 100.0 / trainer.parts.splits.num_classes
    top1 = {}
    for name in trainer.parts.teachers:
        top1[name] = trainer.evaluate_teacher(name)
        if top1[name] <= 2 * chance:
            message = (f"teachers.{name}: validation top-1 {top1[name]:.2f}% is at most twice chance "
                       f"({chance:.2f}%): wrong weights, input normalization or class order (teachers.{name}.classes "
                       "maps a teacher's own classes)?")
            if not allow_weak:
                raise KdkitError(f"{trainer.exp.recipe.where(f'teachers.{name}')}: {message} "
                                 "--allow-weak-teachers accepts it")
            warnings.warn(message, TeacherWarning, stacklevel=2)
    return top1


def build_callbacks(exp: Experiment, plugins: Plugins, progress: bool, processes: Processes) -> dict[str, object]:
    """Every run's callbacks (files, checkpoints, export), the progress display if asked, and the recipe's.

    A callback marked ``main_process_only`` (one that writes files or prints) joins rank 0's run alone.
    A function meant as a hook that is none (a misspelt name) is a PluginError, exit 2.
    """
    names = [*RUN_CALLBACKS, *(["progress"] if progress else [])]
    callbacks = {name: plugins.get("callback", name)() for name in names if name not in exp.callbacks}
    callbacks.update({name: spec.build(plugins) for name, spec in exp.callbacks.items()})
    plugins.check_callbacks(callbacks)
    return {name: callback for name, callback in callbacks.items()
            if processes.is_main or not getattr(callback, "main_process_only", False)}


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


def ensure_teachers(exp: Experiment, plugins: Plugins, *, train_teachers: bool, progress: bool = False,
                    console=None, processes: Processes = Processes()) -> None:
    """Train (or resume) every teacher given by a recipe that is not cached yet, then point it at its run.

    A teacher that another process is training is waited for (its run directory's lock), then reused.
    Under torchrun the same processes train it, data-parallel, as its own run (rank 0 decides what to do).
    """
    for name, spec in exp.teachers.items():
        if spec.recipe is None:
            continue
        out = teacher_run_dir(spec.recipe, plugins)
        rundir = RunDir(out)
        if processes.on_main(rundir.status) == "completed":
            spec.checkpoint = str(out)
            continue
        if not train_teachers:
            raise exp.recipe.error(f"teachers.{name}.recipe", f"teacher not trained yet ({out} is missing "
                                   "or unfinished); run without --no-train-teachers to train it")
        processes.on_main(lambda: rundir.claim(waiting=say(console)))
        try:
            status, resume = processes.on_main(lambda: (rundir.status(), rundir.last.is_file()))
            if status != "completed":
                if console is not None:
                    console.print(f"[bold]{'resuming' if resume else 'training'} teacher {name!r}[/] from "
                                  f"{spec.recipe.path} in {out}")
                run(spec.recipe.path, out=out, force=not resume, resume=resume, progress=progress,
                    console=console)
        finally:
            if processes.is_main:
                rundir.release()
        spec.checkpoint = str(out)
