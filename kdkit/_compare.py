"""Several seeds of a recipe, and recipes side by side: mean ± std over seeds, paired differences.

One seed says little about a distillation recipe, so ``kdkit run --seeds`` trains sibling run
directories and ``kdkit compare`` tabulates them, one row per recipe. Everything from run
directories to rows, cells and records is a pure function; the CLI only prints and writes.
"""
from __future__ import annotations

import csv
import io
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import kdkit
from kdkit._errors import KdkitError, did_you_mean
from kdkit._recipe import Recipe, load_recipe
from kdkit._rundir import RunDir, default_run_dir

MARK = "†"  # a run that its recipe, as it is now, or this kdkit would not reproduce


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``, in the order given, repeats dropped."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        raise KdkitError(f"--seeds {text!r}: expected comma-separated integers such as 0,1,2")
    return list(dict.fromkeys(seeds))


def seed_overrides(overrides, seed: int) -> list[str]:
    """The overrides ``kdkit run --seeds`` applies: the seed last, so it wins over a ``-o seed=``."""
    return [*overrides, f"seed={seed}"]


def seeded_recipe(path, overrides, seed: int) -> Recipe:
    """The recipe exactly as a run of this seed resolves it, so its hash is the one the run records."""
    return load_recipe(path, seed_overrides(overrides, seed))


def recipe_seed(path, overrides=()) -> int:
    """The seed the recipe itself names (after overrides): the default when no ``--seeds`` are given."""
    return load_recipe(path, list(overrides)).table.get("seed", 0)


def run_seeds(recipe_path, seeds, overrides=(), out=None, *, force: bool = False, resume: bool = False,
              **options) -> list[Path]:
    """Train the recipe once per seed into sibling directories: ``out/seed<N>``, else ``runs/<name>/seed<N>``.

    Every directory is checked before the first seed trains, so a clash cannot surface hours later.
    ``options`` are ``kdkit._run.run``'s.
    """
    from kdkit._run import run

    dirs = [Path(out) / f"seed{seed}" if out else default_run_dir(seeded_recipe(recipe_path, overrides, seed))
            for seed in seeds]
    if not resume:
        for path in dirs:
            RunDir(path).check_writable(force)
    return [run(recipe_path, seed_overrides(overrides, seed), path, force=force, resume=resume, **options)
            for seed, path in zip(seeds, dirs)]


# --- run directories --------------------------------------------------------------------------------

@dataclass
class Run:
    """One completed run directory: its summary, its student in words, and why it may be stale."""

    path: Path
    summary: dict
    student: str
    flags: list[str]


def _read_summary(rundir: RunDir) -> dict:
    try:
        return rundir.read_summary()
    except (OSError, json.JSONDecodeError) as exc:
        raise KdkitError(f"{rundir.summary}: cannot read the run's summary: {exc}") from None


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
    summary = _read_summary(rundir)
    missing = [key for key in ("name", "seed", "status", "top1", "best_top1") if key not in summary]
    missing += [] if "eval" in summary.get("top1", {}) else ["top1.eval"]
    if missing:
        raise KdkitError(f"{rundir.summary}: not a kdkit summary (no {', '.join(missing)})")
    if summary["status"] != "completed":
        raise KdkitError(f"{path}: the run is {summary['status']}, not completed: "
                         "run it again (kdkit run --force) or leave it out")
    recipe = load_recipe(rundir.recipe)
    expected = expected_hash or recipe.hash()
    flags = []
    if summary.get("recipe_hash") != expected:
        flags.append(f"recipe hash {summary.get('recipe_hash')}, but the recipe now gives {expected}")
    if summary.get("kdkit_version") != kdkit.__version__:
        flags.append(f"made by kdkit {summary.get('kdkit_version')}, this is kdkit {kdkit.__version__}")
    return Run(rundir.path, summary, describe_student(recipe.table.get("student", {})), flags)


def describe_student(table: dict) -> str:
    """``plugin: key=value, ...`` of the student table's scalar settings."""
    settings = ", ".join(f"{k}={v}" for k, v in table.items() if k != "plugin" and not isinstance(v, (dict, list)))
    return f"{table.get('plugin', '?')}: {settings}" if settings else str(table.get("plugin", "?"))


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
            plans.setdefault(target.resolve(), Planned(target))
        elif target.is_file() and target.suffix == ".toml":
            for seed in seeds or [recipe_seed(target, overrides)]:
                recipe = seeded_recipe(target, overrides, seed)
                path = default_run_dir(recipe, runs_root)
                plans.setdefault(path.resolve(), Planned(path, recipe.hash(), recipe,
                                                         tuple(seed_overrides(overrides, seed))))
        else:
            raise KdkitError(f"{target}: neither a run directory nor a recipe (.toml) file")
    return list(plans.values())


def collect_runs(targets, seeds=None, overrides=(), runs_root: str | Path = "runs", *,
                 allow_random_teachers: bool = False, console=None) -> list[Run]:
    """The completed runs behind ``targets``, training first what a recipe argument lacks.

    Only a missing or unfinished run trains: one with a checkpoint resumes, one without starts over.
    Every recipe to train is validated and every directory checked before the first one starts.
    """
    from kdkit._experiment import resolve
    from kdkit._run import run

    plans = plan_runs(targets, seeds, overrides, runs_root)
    todo = [p for p in plans if p.recipe is not None and RunDir(p.path).status() != "completed"]
    for plan in todo:
        resolve(plan.recipe, allow_random_teachers=allow_random_teachers)
        rundir = RunDir(plan.path)
        rundir.check_writable(force=rundir.summary.is_file())  # only a kdkit run is ever overwritten
    for plan in todo:
        resume = RunDir(plan.path).last.is_file()
        run(plan.recipe.path, plan.overrides, plan.path, force=not resume, resume=resume,
            allow_random_teachers=allow_random_teachers, progress=console is not None, console=console)
    return [load_run(p.path, p.expected_hash) for p in plans]


# --- rows -------------------------------------------------------------------------------------------

@dataclass
class Stat:
    """Mean and sample standard deviation (None below two values) of the values that exist."""

    mean: float | None
    std: float | None
    n: int


def stat(values) -> Stat:
    values = [v for v in values if v is not None]
    mean = statistics.fmean(values) if values else None
    return Stat(mean, statistics.stdev(values) if len(values) > 1 else None, len(values))


@dataclass
class Row:
    """One recipe over its seeds."""

    name: str
    student: str
    seeds: list[int]
    eval_by_seed: dict[int, float]  # last-epoch eval top-1, kept per seed for paired differences
    eval_top1: Stat
    best_top1: Stat
    heads: dict[str, Stat]
    teachers: dict[str, Stat]
    params: Stat
    flops: Stat
    train_images_per_s: Stat
    infer_images_per_s: Stat
    wall_s: Stat
    flags: list[str]


def summarize(runs: list[Run]) -> list[Row]:
    """Group runs by recipe name (first-seen order) into rows."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.summary["name"], []).append(run)
    return [_row(name, group) for name, group in groups.items()]


def _row(name: str, runs: list[Run]) -> Row:
    by_seed: dict[int, Run] = {}
    for run in runs:
        seed = run.summary["seed"]
        if seed in by_seed:
            raise KdkitError(f"two runs of {name!r} with seed {seed}: {by_seed[seed].path} and {run.path}; "
                             "leave one out, or give one another name (kdkit run -o name=...)")
        by_seed[seed] = run
    seeds = sorted(by_seed)
    summaries = [by_seed[s].summary for s in seeds]

    def over(key):
        return stat(s.get(key) for s in summaries)

    def per_name(key):
        names = dict.fromkeys(n for s in summaries for n in s.get(key) or {})
        return {n: stat((s.get(key) or {}).get(n) for s in summaries) for n in names}

    heads = per_name("top1")
    eval_by_seed = {seed: s["top1"]["eval"] for seed, s in zip(seeds, summaries)}
    flags = [f"{name} seed {seed} ({by_seed[seed].path}): {flag}" for seed in seeds for flag in by_seed[seed].flags]
    return Row(name, by_seed[seeds[0]].student, seeds, eval_by_seed, heads.pop("eval"), over("best_top1"), heads,
               per_name("teacher_top1"), over("params"), over("flops"), over("train_images_per_s"),
               over("infer_images_per_s"), over("wall_s"), flags)


@dataclass
class Difference:
    """A recipe's eval top-1 minus the baseline's, paired by seed over the seeds both have."""

    name: str
    baseline: str
    diff: Stat
    seeds: list[int]


def paired_differences(rows: list[Row], baseline: str) -> list[Difference]:
    by_name = {row.name: row for row in rows}
    if baseline not in by_name:
        raise KdkitError(f"--baseline {baseline!r}: no such recipe in the comparison"
                         f"{did_you_mean(baseline, by_name)}; recipes: {', '.join(by_name)}")
    base = by_name[baseline].eval_by_seed
    out = []
    for row in rows:
        if row.name != baseline:
            common = sorted(row.eval_by_seed.keys() & base.keys())
            out.append(Difference(row.name, baseline, stat(row.eval_by_seed[s] - base[s] for s in common), common))
    return out


# --- output -----------------------------------------------------------------------------------------

HEADERS = ["recipe", "student", "teachers (top-1)", "eval top-1", "best top-1", "heads (top-1)", "params",
           "FLOPs", "train img/s", "infer img/s", "wall s", "seeds"]


def _pm(s: Stat, signed: bool = False) -> str:
    if s.mean is None:
        return "n/a"
    mean = f"{s.mean:+.2f}" if signed else f"{s.mean:.2f}"
    return f"{mean} ± {s.std:.2f}" if s.std is not None else mean


def _number(s: Stat, fmt: str = "{:.0f}") -> str:
    return "n/a" if s.mean is None else fmt.format(s.mean)


def _si(s: Stat) -> str:
    if s.mean is None:
        return "n/a"
    for factor, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if s.mean >= factor:
            return f"{s.mean / factor:.2f}{unit}"
    return f"{s.mean:.0f}"


def _named(stats: dict[str, Stat], sep: str) -> str:
    return ", ".join(f"{name}{sep}{_number(s, '{:.2f}')}" for name, s in stats.items())


def cells(row: Row) -> list[str]:
    """The row as display text, in ``HEADERS`` order (the terminal and Markdown tables)."""
    return [row.name + (f" {MARK}" if row.flags else ""), row.student, _named(row.teachers, ": "),
            _pm(row.eval_top1), _number(row.best_top1, "{:.2f}"), _named(row.heads, " "), _si(row.params),
            _si(row.flops), _number(row.train_images_per_s), _number(row.infer_images_per_s),
            _number(row.wall_s), str(len(row.seeds))]


def footnotes(rows: list[Row]) -> list[str]:
    return [f"{MARK} {flag}" for row in rows for flag in row.flags]


def difference_cells(d: Difference) -> list[str]:
    return [d.name, d.baseline, _pm(d.diff, signed=True) if d.seeds else "no common seeds", str(len(d.seeds))]


DIFFERENCE_HEADERS = ["recipe", "baseline", "Δ eval top-1 (paired by seed)", "pairs"]


def records(rows: list[Row]) -> list[dict]:
    """The table as numbers (means; std for eval top-1), one dict per row: the CSV."""
    heads = dict.fromkeys(h for row in rows for h in row.heads)
    teachers = dict.fromkeys(t for row in rows for t in row.teachers)
    out = []
    for row in rows:
        record = {"recipe": row.name, "student": row.student, "seeds": " ".join(map(str, row.seeds)),
                  "eval_top1_mean": row.eval_top1.mean, "eval_top1_std": row.eval_top1.std,
                  "best_top1_mean": row.best_top1.mean}
        record.update({f"top1_{h}": row.heads[h].mean if h in row.heads else None for h in heads})
        record.update({f"teacher_{t}_top1": row.teachers[t].mean if t in row.teachers else None for t in teachers})
        for key in ("params", "flops", "train_images_per_s", "infer_images_per_s", "wall_s"):
            record[key] = getattr(row, key).mean
        record["flags"] = "; ".join(row.flags)
        out.append(record)
    return out


def to_csv(rows: list[Row]) -> str:
    table = records(rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(table[0]) if table else ["recipe"], lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in record.items()} for record in table)
    return buffer.getvalue()


def _markdown_table(headers: list[str], body: list[list[str]]) -> list[str]:
    def line(values):
        return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"

    return [line(headers), line(["---"] * len(headers)), *map(line, body)]


def to_markdown(rows: list[Row], differences: list[Difference] = ()) -> str:
    lines = _markdown_table(HEADERS, [cells(row) for row in rows])
    notes = footnotes(rows)
    if notes:
        lines += ["", *(f"{note}  " for note in notes)]
    if differences:
        lines += ["", f"Paired differences against {differences[0].baseline} (mean ± std over shared seeds):", ""]
        lines += _markdown_table(DIFFERENCE_HEADERS, [difference_cells(d) for d in differences])
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: str | Path) -> None:
    """A PNG bar chart: eval top-1 mean per recipe with std error bars, teachers' top-1 as markers."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    fig = Figure(figsize=(max(4.0, 1.3 * len(rows) + 2), 4.5), layout="constrained")
    ax = fig.add_subplot()
    x = list(range(len(rows)))
    ax.bar(x, [row.eval_top1.mean for row in rows], yerr=[row.eval_top1.std or 0 for row in rows], capsize=5,
           color="tab:blue", label="student eval top-1 (mean ± std over seeds)")
    labelled = False
    for i, row in enumerate(rows):
        for name, s in row.teachers.items():
            ax.scatter([i], [s.mean], marker="_", s=500, color="tab:red",
                       label=None if labelled else "teacher top-1", zorder=3)
            ax.annotate(name, (i + 0.42, s.mean), fontsize=7, va="center")
            labelled = True
    ax.set_xticks(x, [f"{row.name}\n({len(row.seeds)} seeds)" for row in rows], fontsize=8)
    ax.set_ylabel("validation top-1 (%)")
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(path, format="png", dpi=120)
