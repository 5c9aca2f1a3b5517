"""The completed runs a comparison reads: run directories as given, recipes as their seeds' run directories,
trained first where they are missing or unfinished.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import kdkit
from kdkit.errors import KdkitError, reason
from kdkit.recipe.toml import Recipe, load_recipe
from kdkit.store.rundir import RunDir, default_run_dir
from kdkit.store.summary import Summary, is_number
from kdkit.tools.compare.seeds import recipe_seed, seed_overrides, seeded_recipe


@dataclass
class Run:
    """One completed run directory: its summary, its student's settings, and why it may be stale."""

    path: Path
    summary: Summary
    student: dict
    flags: list[str]


def load_run(path: str | Path, expected_hash: str | None = None) -> Run:
    """Read a completed run; flag it when its recipe hash is not ``expected_hash`` or its kdkit not this one.

    Without ``expected_hash`` (a run directory named directly) the reference is the hash of the run's
    own resolved ``recipe.toml``, which catches a summary and recipe that do not belong together.
    """
    rundir = RunDir(path)
    if not rundir.path.is_dir():
        raise KdkitError(f"{path}: no such run directory")
    if not rundir.summary.is_file() or not rundir.recipe.is_file():
        raise KdkitError(f"{path}: not a run directory (it needs summary.json and recipe.toml)")
    summary = Summary.from_json(rundir.read_summary(), rundir.summary)
    if summary.status != "completed":  # before its first epoch a run has no top1.eval yet
        raise KdkitError(f"{path}: the run is {summary.status}, not completed: "
                         "run it again (kdkit run --resume, or --force) or leave it out")
    if "eval" not in summary.top1:
        raise KdkitError(f"{rundir.summary}: not a kdkit summary (no top1.eval)")
    recipe = load_recipe(rundir.recipe)
    expected = expected_hash or recipe.hash()
    flags = list(summary.notes)
    if summary.recipe_hash != expected:
        flags.append(f"recipe hash {summary.recipe_hash}, but the recipe now gives {expected}")
    if summary.kdkit_version != kdkit.__version__:
        flags.append(f"made by kdkit {summary.kdkit_version}, this is kdkit {kdkit.__version__}")
    return Run(rundir.path, summary, student_settings(recipe.table.get("student", {})), flags)


def student_settings(table: dict, prefix: str = "") -> dict:
    """The student table as flat ``key: value`` settings (nested tables as ``a.b``)."""
    out = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(student_settings(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@dataclass
class Planned:
    """A run directory to read, and for a recipe argument how to train it when it is missing."""

    path: Path
    expected_hash: str | None = None
    recipe: Recipe | None = None
    overrides: tuple = ()


def plan_runs(targets, seeds=None, overrides=(), runs_root: str | Path = "runs") -> list[Planned]:
    """Run directories as given; recipes as ``runs_root/<name>/seed<N>`` for each seed (default: the recipe's)."""
    plans: dict[Path, Planned] = {}
    for target in map(Path, targets):
        if not target.exists():
            raise KdkitError(f"{target}: no such run directory or recipe file")
        if target.is_dir():
            for path in seed_folders(target) or [target]:
                plans.setdefault(path.resolve(), Planned(path))
        elif target.is_file() and target.suffix == ".toml":
            for seed in seeds or [recipe_seed(target, overrides)]:
                recipe = seeded_recipe(target, overrides, seed)
                path = default_run_dir(recipe, runs_root)
                planned = plans.get(path.resolve())
                if planned and planned.recipe and planned.expected_hash != recipe.hash():
                    raise KdkitError(f"{target} and {planned.recipe.path} both name their runs "
                                     f"'{recipe.table['name']}' ({path}): give one of them another name")
                plans[path.resolve()] = Planned(path, recipe.hash(), recipe,
                                                tuple(seed_overrides(target, overrides, seed)))
        else:
            raise KdkitError(f"{target}: neither a run directory nor a recipe (.toml) file")
    return list(plans.values())


def seed_folders(folder: Path) -> list[Path]:
    """The ``seed<N>`` run directories of a folder that ``kdkit run --seeds`` filled, by seed; none when
    ``folder`` is a run directory itself."""
    if (folder / "summary.json").exists():
        return []
    seeds = [path for path in folder.glob("seed*") if path.name[4:].isdigit() and path.is_dir()]
    return sorted(seeds, key=lambda path: int(path.name[4:]))


def collect_runs(targets, seeds=None, overrides=(), runs_root: str | Path = "runs", *,
                 allow_random_teachers: bool = False, allow_weak_teachers: bool = False, jobs: int = 1,
                 console=None) -> tuple[list[Run], dict[str, float]]:
    """The completed runs behind ``targets``, training first what a recipe argument lacks; and the wall
    time of each stage that trained (teachers, caches, students: with ``jobs`` > 1, in parallel).

    Only a missing or unfinished run trains: one with a checkpoint resumes, one without starts over.
    Every recipe to train is validated and every directory checked before the first one starts.
    """
    from kdkit.recipe.experiment import resolve
    from kdkit.train.run import run

    plans = plan_runs(targets, seeds, overrides, runs_root)
    todo = [p for p in plans if p.recipe is not None and RunDir(p.path).status() != "completed"]
    for plan in todo:
        resolve(plan.recipe, allow_random_teachers=allow_random_teachers)
        RunDir(plan.path).check_writable(force=True)  # only a kdkit run, and one no other process writes
    if jobs > 1 and todo:
        stages = train_in_stages(todo, jobs, console, allow_random_teachers=allow_random_teachers,
                                 allow_weak_teachers=allow_weak_teachers)
        return [load_run(p.path, p.expected_hash) for p in plans], stages
    start = time.perf_counter()
    for plan in todo:
        resume = RunDir(plan.path).last.is_file()
        run(plan.recipe.path, plan.overrides, plan.path, force=not resume, resume=resume,
            allow_random_teachers=allow_random_teachers, allow_weak_teachers=allow_weak_teachers,
            progress=console is not None, console=console)
    stages = {"runs": time.perf_counter() - start} if todo else {}
    return [load_run(p.path, p.expected_hash) for p in plans], stages


def train_in_stages(todo: list[Planned], jobs: int, console=None, *, allow_random_teachers: bool = False,
                    allow_weak_teachers: bool = False) -> dict[str, float]:
    """Train the missing runs in subprocesses, shared parts first (``kdkit.tools.jobs``); each stage's wall time."""
    from kdkit.builder.build import teacher_runs, untrained
    from kdkit.plugin.discovery import default_plugins
    from kdkit.recipe.experiment import resolve
    from kdkit.tools.jobs import Job, run_command, run_jobs

    random_ok = ["--allow-random-teachers"] if allow_random_teachers else []  # a cache build scores no teacher
    flags = [*random_ok, *(["--allow-weak-teachers"] if allow_weak_teachers else [])]
    plugins = default_plugins()
    teachers, caches, cached = {}, [], set()
    for plan in todo:
        exp = resolve(plan.recipe, plugins, allow_random_teachers=True)
        runs = teacher_runs(exp, plugins)
        for name, out in untrained(runs).items():
            if out not in teachers:
                recipe = exp.teachers[name].recipe
                teachers[out] = run_command(f"teacher {recipe.table['name']}", recipe.path, (), out, flags)
        needed = cache_identities(exp, runs) if exp.teacher_cache else set()
        if not needed <= cached:  # a cache no job builds yet
            cached |= needed
            args = ["cache", "build", str(plan.recipe.path), *(a for o in plan.overrides for a in ("-o", o)),
                    *random_ok]
            caches.append(Job(f"caches of {exp.name}", args, plan.path.parent / "teacher_cache.log"))
    students = [run_command(f"{plan.recipe.table['name']} seed {plan.recipe.table.get('seed', 0)}", plan.recipe.path,
                            plan.overrides, plan.path, [*flags, "--no-train-teachers"]) for plan in todo]
    stages = {}
    for stage, stage_jobs, parallel in (("teachers", list(teachers.values()), jobs), ("caches", caches, 1),
                                        ("students", students, jobs)):
        if stage_jobs:
            stages[stage] = run_jobs(stage, stage_jobs, parallel, console)
    return stages


def cache_identities(exp, teacher_runs: dict[str, Path]) -> set[str]:
    """The teacher-output caches ``exp`` reads, told apart before its teachers are trained: per teacher, its
    name and where its weights come from (its recipe's run directory, else its table), with everything of
    the recipe that its cached views depend on. Two equal identities are one cache (keyed by the teacher's
    name and weights, its views by the data, the view augmentation and their count, not by the seed)."""
    from kdkit.builder.teacher_cache import VIEW_AUGMENTATION, views_of

    table = exp.recipe.table
    views = {"data": table.get("data"), "teacher_cache": table.get("teacher_cache"), "views": views_of(exp),
             "augment": {k: v for k, v in table.get("augment", {}).items() if k in VIEW_AUGMENTATION}}
    return {json.dumps([name, str(teacher_runs.get(name) or table["teachers"][name]), views], sort_keys=True)
            for name in exp.needed_teachers}


def validation_curves(runs: list[Run]) -> dict[str, dict[int, list[float]]]:
    """Per recipe, every epoch's validation top-1 (the eval prediction) of each of its seeds' runs."""
    out: dict[str, dict[int, list[float]]] = {}
    for run in runs:
        epochs = out.setdefault(run.summary.name, {})
        for epoch, top1 in _epoch_top1(RunDir(run.path).metrics):
            epochs.setdefault(epoch, []).append(top1)
    return out


def _epoch_top1(path: Path) -> list[tuple[int, float]]:
    """(epoch, eval top-1) of every line of a run's metrics.jsonl; a garbled one is refused, naming it."""
    try:
        rows = [json.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
        points = [(row["epoch"], row["top1"]["eval"]) for row in rows]
    except (OSError, ValueError, LookupError, TypeError) as exc:  # unreadable, not JSON, keys missing
        problem = f"no {exc}" if isinstance(exc, LookupError) else reason(exc)
        raise KdkitError(f"{path}: cannot read the run's per-epoch metrics ({problem}); --curves needs them") from None
    if not all(isinstance(epoch, int) and is_number(top1) for epoch, top1 in points):
        raise KdkitError(f"{path}: not kdkit metrics (an epoch or top1.eval of the wrong type); --curves needs them")
    return points
