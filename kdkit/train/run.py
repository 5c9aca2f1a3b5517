"""``kdkit run``: check a recipe, build its parts, train missing teachers, then hand over to ``Trainer.fit``.

Nothing is written until every check has passed: the recipe (``recipe.experiment``), the student's
one-image forward and the teachers' weights (``builder.parts``), the first training batch and one validation
batch through the student (``Evaluation.check_first_batches``), the teachers' validation
accuracy, and the run directory (empty, or resumable with the same recipe and teachers).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from kdkit.builder.build import Built, build_all_parts
from kdkit.builder.flops import FlopCount, count_flops, plugin_rules
from kdkit.builder.model import DistillModel, Predictor
from kdkit.builder.parts import Parts
from kdkit.builder.teacher_cache import summary_of
from kdkit.errors import KdkitError
from kdkit.plugin.discovery import Plugins, default_plugins
from kdkit.recipe.experiment import Experiment, resolve
from kdkit.recipe.sections import RUN_CALLBACKS
from kdkit.recipe.toml import Recipe, diff_tables, load_recipe
from kdkit.store.checkpoint import check_fits, load_checkpoint
from kdkit.store.rundir import RunDir, default_run_dir, provenance
from kdkit.store.summary import Summary
from kdkit.train.loop import Trainer
from kdkit.train.processes import Processes
from kdkit.train.processes import processes as current_processes
from kdkit.train.step import build_step


class TeacherWarning(UserWarning):
    """A teacher is at most twice chance on validation, and the run was told to go on anyway."""


class FlopWarning(UserWarning):
    """The FLOP count met operators it has no rule for: the reported count leaves them out."""


def run(recipe_path, overrides=(), out=None, *, force: bool = False, resume: bool = False,
        allow_changes: bool = False, allow_random_teachers: bool = False, allow_weak_teachers: bool = False,
        train_teachers: bool = True, progress: bool = False, console=None, callbacks=()) -> Path:
    """Check, build and train one recipe (its missing teachers first); returns the run directory.

    ``resume`` continues the run in ``out`` from its last checkpoint; a recipe or teacher weights that
    differ from the run's are refused unless ``allow_changes``. A teacher at most twice chance on
    validation is refused unless ``allow_weak_teachers`` (or ``allow_random_teachers``: a random
    teacher is at chance). ``progress`` adds the progress display; ``console`` (a rich Console)
    receives messages about teachers being trained; otherwise nothing prints. ``callbacks`` are objects
    whose hook implementations join this run as a recipe's ``[callbacks]`` do. Under torchrun every
    process runs this: they train together, and only rank 0 writes and prints.
    """
    plugins = default_plugins()
    processes = current_processes()
    progress, console = progress and processes.is_main, console if processes.is_main else None
    recipe = load_recipe(recipe_path, list(overrides))
    exp = resolve(recipe, plugins, allow_random_teachers=allow_random_teachers)
    callbacks = build_callbacks(exp, plugins, progress, processes, callbacks)  # hooks checked with the recipe
    rundir = RunDir(out or default_run_dir(recipe))
    if resume:
        processes.on_main(lambda: check_resumable(rundir, recipe, allow_changes))
    else:
        processes.on_main(lambda: rundir.check_writable(force))
    checkpoint = load_checkpoint(rundir.last, Trainer.CHECKPOINT_KEYS) if resume else None
    device = processes.device()
    parts = build_all_parts(exp, plugins, device, train_teachers=train_teachers, progress=progress, console=console,
                            processes=processes)
    fixed = facts(exp, parts, recipe, plugins, processes)
    summary = Summary(**fixed) if checkpoint is None else Summary.from_json({**checkpoint["summary"], **fixed},
                                                                            rundir.last)
    built = Built(exp, parts, build_step(exp, parts, device, processes))
    trainer = Trainer(built, rundir=rundir, hook=plugins.manager.hook, summary=summary)
    start = (checkpoint["epoch"], checkpoint["batch"]) if checkpoint is not None else (0, 0)
    # the data, before anything is written
    processes.on_main(lambda: trainer.evaluation.check_first_batches(trainer.state.model, *start))
    if checkpoint is None:
        summary.teacher_top1 = evaluate_teachers(trainer, allow_weak_teachers or allow_random_teachers)
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
    parts = build_all_parts(exp, plugins, processes.device(), train_teachers=True, progress=console is not None,
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


def student_flops(model: DistillModel, in_chans: int, image_size: int, plugins: Plugins) -> FlopCount:
    """Multiply-adds of one image through the student's eval prediction; operators left out are a warning."""
    image = torch.zeros(1, in_chans, image_size, image_size, device=next(model.parameters()).device)
    flops = count_flops(Predictor(model), image, plugin_rules(plugins.manager.hook))
    if flops.unsupported:
        warnings.warn(f"the FLOP count leaves out operators it has no rule for: {flops.unsupported}", FlopWarning,
                      stacklevel=2)
    return flops


def facts(exp: Experiment, parts: Parts, recipe: Recipe, plugins: Plugins, processes: Processes) -> dict:
    """What the summary says about the run that training does not change (recomputed on resume)."""
    flops = student_flops(parts.model, parts.splits.in_chans, exp.data.image_size, plugins)
    return {
        "name": exp.name, "seed": exp.seed, "world_size": processes.world,
        "best_selected_on": "validation" if exp.data.val_split > 0 else "test",
        "params": parts.model.eval_parameters(), "flops": flops.total,
        "flops_unsupported": flops.unsupported,
        "teacher_hashes": parts.teacher_hashes, "teacher_models": teacher_models(exp),
        "teacher_cache": summary_of(parts.teacher_outputs) if parts.teacher_outputs else None,
        **provenance(recipe.hash()),
    }


def teacher_models(exp: Experiment) -> dict[str, str]:
    """Each teacher's network in a few words, for tables: a timm model's name, else its plugin with its depth
    or preset (and a width other than 1); a teacher given by a recipe, that recipe's student's; a kdkit
    export, its file's name."""
    def network(table: dict) -> str:
        if "model" in table:
            label = str(table["model"])
        elif "plugin" in table:
            label = f"{table['plugin']}{table.get('depth', '')}" + (f"-{table['preset']}" if "preset" in table else "")
        else:
            label = Path(str(table.get("checkpoint", "?"))).name
        return label + (f" x{table['width']}" if table.get("width", 1) != 1 else "")

    return {name: network(spec.recipe.table.get("student", {}) if spec.recipe else exp.recipe.table["teachers"][name])
            for name, spec in exp.teachers.items() if name in exp.needed_teachers}


def evaluate_teachers(trainer: Trainer, allow_weak: bool) -> dict[str, float]:
    """Each teacher's validation top-1 (%); one at most twice chance is refused (wrong weights,
    normalization or class order?) unless ``allow_weak``, which makes it a warning."""
    chance = 100.0 / trainer.parts.splits.num_classes
    top1 = trainer.evaluation.teachers_top1()
    for name in top1:
        if top1[name] <= 2 * chance:
            message = (f"teachers.{name}: validation top-1 {top1[name]:.2f}% is at most twice chance "
                       f"({chance:.2f}%): wrong weights, input normalization or class order (teachers.{name}.classes "
                       "maps a teacher's own classes), or network keys other than the weights were trained with "
                       "(small_input, width, model_kwargs)?")
            if not allow_weak:
                raise KdkitError(f"{trainer.exp.recipe.where(f'teachers.{name}')}: {message} "
                                 "--allow-weak-teachers accepts it")
            warnings.warn(message, TeacherWarning, stacklevel=2)
    return top1


def build_callbacks(exp: Experiment, plugins: Plugins, progress: bool, processes: Processes,
                    given=()) -> dict[str, object]:
    """Every run's callbacks (files, checkpoints, export), the progress display if asked, the recipe's, and
    the objects ``given`` (from Python: ``kdkit.run(..., callbacks=[...])``).

    A callback marked ``main_process_only`` (one that writes files or prints) joins rank 0's run alone.
    A function meant as a hook that is none (a misspelt name) is a PluginError, exit 2.
    """
    names = [*RUN_CALLBACKS, *(["progress"] if progress else [])]
    callbacks = {name: plugins.get("callback", name)() for name in names if name not in exp.callbacks}
    callbacks.update({name: spec.build(plugins) for name, spec in exp.callbacks.items()})
    callbacks.update({f"{type(callback).__name__} #{i}": callback for i, callback in enumerate(given)})
    plugins.check_callbacks(callbacks)
    return {name: callback for name, callback in callbacks.items()
            if processes.is_main or not getattr(callback, "main_process_only", False)}


