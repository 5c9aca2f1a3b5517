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
import time
from dataclasses import dataclass
from pathlib import Path

import kdkit
from kdkit.errors import reason
from kdkit.errors import KdkitError, did_you_mean
from kdkit.recipe.toml import Recipe, load_recipe
from kdkit.store.rundir import RunDir, default_run_dir
from kdkit.store.summary import Summary, is_number

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


def recipe_seed(path, overrides=()) -> int:
    """The seed the recipe itself names (after overrides): the default when no ``--seeds`` are given."""
    return load_recipe(path, list(overrides)).table.get("seed", 0)


def seed_overrides(path, overrides, seed: int) -> list[str]:
    """The overrides ``kdkit run --seeds`` applies: the seed last, so it wins over a ``-o seed=``; none when
    the recipe already gives this seed, so that a plain ``kdkit run`` of it is the same run (same hash)."""
    return list(overrides) if seed == recipe_seed(path, overrides) else [*overrides, f"seed={seed}"]


def seeded_recipe(path, overrides, seed: int) -> Recipe:
    """The recipe exactly as a run of this seed resolves it, so its hash is the one the run records."""
    return load_recipe(path, seed_overrides(path, overrides, seed))


def run_seeds(recipe_path, seeds, overrides=(), out=None, *, force: bool = False, resume: bool = False,
              **options) -> list[Path]:
    """Train the recipe once per seed into sibling directories: ``out/seed<N>``, else ``runs/<name>/seed<N>``.

    Every directory is checked before the first seed trains, so a clash cannot surface hours later.
    ``options`` are ``kdkit.train.run.run``'s.
    """
    from kdkit.train.run import check_resumable, run

    recipes = [seeded_recipe(recipe_path, overrides, seed) for seed in seeds]
    dirs = [Path(out) / f"seed{seed}" if out else default_run_dir(recipe) for seed, recipe in zip(seeds, recipes)]
    for recipe, path in zip(recipes, dirs):
        if resume:
            check_resumable(RunDir(path), recipe, options.get("allow_changes", False))
        else:
            RunDir(path).check_writable(force)
    return [run(recipe_path, seed_overrides(recipe_path, overrides, seed), path, force=force, resume=resume,
                **options) for seed, path in zip(seeds, dirs)]


# --- run directories --------------------------------------------------------------------------------

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
            plans.setdefault(target.resolve(), Planned(target))
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
    from kdkit.recipe.experiment import resolve
    from kdkit.tools.jobs import Job, run_command, run_jobs
    from kdkit.plugin.discovery import default_plugins
    from kdkit.builder.build import teacher_runs, untrained

    random_ok = ["--allow-random-teachers"] if allow_random_teachers else []  # a cache build scores no teacher
    flags = [*random_ok, *(["--allow-weak-teachers"] if allow_weak_teachers else [])]
    plugins = default_plugins()
    teachers, caches = {}, {}
    for plan in todo:
        exp = resolve(plan.recipe, plugins, allow_random_teachers=True)
        for name, out in untrained(teacher_runs(exp, plugins)).items():
            if out not in teachers:
                recipe = exp.teachers[name].recipe
                teachers[out] = run_command(f"teacher {recipe.table['name']}", recipe.path, (), out, flags)
        if exp.teacher_cache and exp.name not in caches:
            args = ["cache", "build", str(plan.recipe.path), *(a for o in plan.overrides for a in ("-o", o)),
                    *random_ok]
            caches[exp.name] = Job(f"caches of {exp.name}", args, plan.path.parent / "teacher_cache.log")
    students = [run_command(f"{plan.recipe.table['name']} seed {plan.recipe.table.get('seed', 0)}", plan.recipe.path,
                            plan.overrides, plan.path, [*flags, "--no-train-teachers"]) for plan in todo]
    stages = {}
    for stage, stage_jobs, parallel in (("teachers", list(teachers.values()), jobs), ("caches", list(caches.values()), 1),
                                        ("students", students, jobs)):
        if stage_jobs:
            stages[stage] = run_jobs(stage, stage_jobs, parallel, console)
    return stages


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
    """One recipe over its seeds: the final students' test top-1 and what they cost."""

    name: str
    student: dict  # the student table's settings (flattened)
    seeds: list[int]
    test_by_seed: dict[int, float]  # the eval prediction's test top-1 per seed, for paired differences
    test: Stat
    heads_mean: Stat  # the mean of every head's logits (the released code's rule); n = 0 with one head
    best_val: Stat  # the test top-1 of the epoch the validation split chose; n = 0 without one
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
        groups.setdefault(run.summary.name, []).append(run)
    return [_row(name, group) for name, group in groups.items()]


def _row(name: str, runs: list[Run]) -> Row:
    by_seed: dict[int, Run] = {}
    for run in runs:
        seed = run.summary.seed
        if seed in by_seed:
            raise KdkitError(f"two runs of {name!r} with seed {seed}: {by_seed[seed].path} and {run.path}; "
                             "leave one out, or give one another name (kdkit run -o name=...)")
        by_seed[seed] = run
    seeds = sorted(by_seed)
    summaries = [by_seed[s].summary for s in seeds]
    tests = [s.test_top1 for s in summaries]

    def over(key):
        return stat(getattr(s, key) for s in summaries)

    def per_name(tables):
        names = dict.fromkeys(n for t in tables for n in t)
        return {n: stat(t.get(n) for t in tables) for n in names}

    heads = per_name(tests)
    test, heads_mean = heads.pop("eval"), heads.pop("heads_mean", Stat(None, None, 0))
    flags = [f"{name} seed {seed} ({by_seed[seed].path}): {flag}" for seed in seeds for flag in by_seed[seed].flags]
    return Row(name, student=by_seed[seeds[0]].student, seeds=seeds,
               test_by_seed={seed: t["eval"] for seed, t in zip(seeds, tests)}, test=test, heads_mean=heads_mean,
               best_val=over("best_test_top1"), heads=heads,
               teachers=per_name([s.teacher_top1 for s in summaries]), params=over("params"),
               flops=over("flops"), train_images_per_s=over("train_images_per_s"),
               infer_images_per_s=over("infer_images_per_s"), wall_s=over("wall_s"), flags=flags)


@dataclass
class Difference:
    """A recipe's test top-1 minus the baseline's, paired by seed over the seeds both have.

    ``low``/``high``: the 95% Student's t interval of the mean difference; ``p``: the paired t-test's
    two-sided p-value; ``p_holm``: ``p`` adjusted by Holm's step-down method over every difference
    of the comparison that has a p-value (None below two pairs).
    """

    name: str
    baseline: str
    diff: Stat
    seeds: list[int]
    low: float | None = None
    high: float | None = None
    p: float | None = None
    p_holm: float | None = None


def paired_differences(rows: list[Row], baseline: str) -> list[Difference]:
    by_name = {row.name: row for row in rows}
    if baseline not in by_name:
        raise KdkitError(f"--baseline {baseline!r}: no such recipe in the comparison"
                         f"{did_you_mean(baseline, by_name)}; recipes: {', '.join(by_name)}")
    from scipy import stats

    base = by_name[baseline].test_by_seed
    out = []
    for row in rows:
        if row.name == baseline:
            continue
        common = sorted(row.test_by_seed.keys() & base.keys())
        diffs = [row.test_by_seed[s] - base[s] for s in common]
        d = Difference(row.name, baseline, stat(diffs), common)
        if len(diffs) > 1:
            half = stats.t.ppf(0.975, len(diffs) - 1) * d.diff.std / len(diffs) ** 0.5
            d.low, d.high = d.diff.mean - half, d.diff.mean + half
            if d.diff.std > 0:
                d.p = float(stats.ttest_1samp(diffs, 0.0).pvalue)
            else:  # every pair differs by the same amount: nothing to weigh it against
                d.p = 1.0 if d.diff.mean == 0 else 0.0
        out.append(d)
    for d, adjusted in zip(out, holm([d.p for d in out])):
        d.p_holm = adjusted
    return out


def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment (family-wise error): the k-th smallest of m p-values is multiplied by
    m - k + 1, made non-decreasing, capped at 1. Missing p-values stay missing and do not count in m."""
    present = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for k, (p, i) in enumerate(present):
        running = max(running, min(1.0, (len(present) - k) * p))
        adjusted[i] = running
    return adjusted


# --- output -----------------------------------------------------------------------------------------

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


def _named(stats: dict[str, Stat]) -> str:
    return ", ".join(f"{name} {_number(s, '{:.1f}')}" for name, s in stats.items())


def _settings(settings: dict, keys: bool = True) -> str:
    """``key=value, ...`` (or the values alone), lists written ``a+b+c`` so that a narrow column wraps
    between settings."""
    return ", ".join(f"{k + '=' if keys else ''}{'+'.join(map(str, v)) if isinstance(v, list) else v}"
                     for k, v in settings.items())


@dataclass
class Table:
    """A table as text cells: the terminal and Markdown show the same thing."""

    title: str
    headers: list[str]
    body: list[list[str]]


def student_caption(rows: list[Row]) -> tuple[dict, list[dict]]:
    """The student settings every row shares, and per row the ones that differ."""
    first = rows[0].student if rows else {}
    shared = {k: v for k, v in first.items() if all(k in r.student and r.student[k] == v for r in rows)}
    return shared, [{k: v for k, v in row.student.items() if k not in shared} for row in rows]


def results_table(rows: list[Row]) -> Table:
    """Test top-1 of the final students (mean ± std over seeds), with the teachers and the other rule.
    What every row shares (student settings, the number of seeds) goes in the title rather than a column;
    when the students differ in one setting only, its column is named after it."""
    shared, differing = student_caption(rows)
    keys = list(dict.fromkeys(k for d in differing for k in d))
    seeds = {len(row.seeds) for row in rows}
    selected = any(row.best_val.n for row in rows)
    headers = ["recipe", *([f"student {keys[0]}" if len(keys) == 1 else "student"] if keys else []),
               "teachers (top-1)", "test top-1", "mean of heads", *(["best-val epoch"] if selected else []),
               *(["seeds"] if len(seeds) > 1 else [])]
    body = [[row.name + (f" {MARK}" if row.flags else ""), *([_settings(d, keys=len(keys) > 1)] if keys else []),
             _named(row.teachers), _pm(row.test), _pm(row.heads_mean), *([_pm(row.best_val)] if selected else []),
             *([str(len(row.seeds))] if len(seeds) > 1 else [])] for row, d in zip(rows, differing)]
    over = f"{seeds.pop()} seeds" if len(seeds) == 1 else "seeds"
    title = (f"test top-1 (%) of the final students, mean ± std over {over}; student "
             f"{_settings(shared) or '(see the column)'}")
    return Table(title, headers, body)


def cost_table(rows: list[Row]) -> Table:
    return Table("cost per student (FLOPs: multiply-adds per image)", ["recipe", "params", "FLOPs", "train img/s",
                                                                       "infer img/s", "wall s"],
                 [[row.name, _si(row.params), _si(row.flops), _number(row.train_images_per_s),
                   _number(row.infer_images_per_s), _number(row.wall_s)] for row in rows])


def _p(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.3f}" if p >= 0.001 else "<0.001"


def difference_table(differences: list[Difference]) -> Table:
    baseline = differences[0].baseline if differences else ""
    body = [[d.name, _pm(d.diff, signed=True) if d.seeds else "no common seeds",
             f"[{d.low:+.2f}, {d.high:+.2f}]" if d.low is not None else "n/a", _p(d.p), _p(d.p_holm),
             str(len(d.seeds))] for d in differences]
    return Table(f"test top-1 minus {baseline}'s, paired by seed (95% t interval; p: paired t-test, Holm-adjusted)",
                 ["recipe", f"Δ vs {baseline}", "95% CI", "p", "p (Holm)", "pairs"], body)


def tables(rows: list[Row], differences: list[Difference] = ()) -> list[Table]:
    return [results_table(rows), *([difference_table(differences)] if differences else []), cost_table(rows)]


def footnotes(rows: list[Row]) -> list[str]:
    return [f"{MARK} {flag}" for row in rows for flag in row.flags]


def records(rows: list[Row], differences: list[Difference] = ()) -> list[dict]:
    """The comparison as numbers, one dict per row: the CSV."""
    heads = dict.fromkeys(h for row in rows for h in row.heads)
    teachers = dict.fromkeys(t for row in rows for t in row.teachers)
    by_name = {d.name: d for d in differences}
    out = []
    for row in rows:
        record = {"recipe": row.name, "student": _settings(row.student), "seeds": " ".join(map(str, row.seeds)),
                  "test_top1_mean": row.test.mean, "test_top1_std": row.test.std,
                  "heads_mean_top1_mean": row.heads_mean.mean, "heads_mean_top1_std": row.heads_mean.std,
                  "best_val_epoch_test_top1_mean": row.best_val.mean}
        record.update({f"test_top1_{h}": row.heads[h].mean if h in row.heads else None for h in heads})
        record.update({f"teacher_{t}_top1": row.teachers[t].mean if t in row.teachers else None for t in teachers})
        for key in ("params", "flops", "train_images_per_s", "infer_images_per_s", "wall_s"):
            record[key] = getattr(row, key).mean
        if differences:
            d = by_name.get(row.name)
            record.update(diff_mean=d and d.diff.mean, diff_std=d and d.diff.std, diff_ci_low=d and d.low,
                          diff_ci_high=d and d.high, diff_p=d and d.p, diff_p_holm=d and d.p_holm,
                          diff_pairs=d and len(d.seeds))
        record["flags"] = "; ".join(row.flags)
        out.append(record)
    return out


def to_csv(rows: list[Row], differences: list[Difference] = ()) -> str:
    table = records(rows, differences)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(table[0]) if table else ["recipe"], lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in record.items()} for record in table)
    return buffer.getvalue()


def _markdown_table(table: Table) -> list[str]:
    def line(values):
        return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"

    return [f"**{table.title}**", "", line(table.headers), line(["---"] * len(table.headers)),
            *map(line, table.body)]


def to_markdown(rows: list[Row], differences: list[Difference] = ()) -> str:
    lines = []
    for table in tables(rows, differences):
        lines += [*_markdown_table(table), ""]
    lines += [f"{note}  " for note in footnotes(rows)]
    return "\n".join(lines).rstrip() + "\n"


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


def plot_curves(curves: dict[str, dict[int, list[float]]], path: str | Path) -> None:
    """A PNG of each recipe's validation top-1 after every epoch (``validation_curves``): the mean over seeds
    and their range."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for name, epochs in curves.items():
        x = sorted(epochs)
        seeds = max(len(values) for values in epochs.values())
        line, = ax.plot(x, [statistics.fmean(epochs[e]) for e in x], label=f"{name} ({seeds} seeds)")
        ax.fill_between(x, [min(epochs[e]) for e in x], [max(epochs[e]) for e in x], color=line.get_color(),
                        alpha=0.15)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 (%)")
    ax.legend(fontsize=7, loc="lower right")
    fig.savefig(path, format="png", dpi=120)


def plot(rows: list[Row], path: str | Path) -> None:
    """A PNG bar chart: test top-1 mean per recipe with std error bars, teachers' top-1 as markers."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    fig = Figure(figsize=(max(4.0, 1.3 * len(rows) + 2), 4.5), layout="constrained")
    ax = fig.add_subplot()
    x = list(range(len(rows)))
    ax.bar(x, [row.test.mean for row in rows], yerr=[row.test.std or 0 for row in rows], capsize=5,
           color="tab:blue", label="student test top-1 (mean ± std over seeds)")
    labelled = False
    for i, row in enumerate(rows):
        for name, s in row.teachers.items():
            ax.scatter([i], [s.mean], marker="_", s=500, color="tab:red",
                       label=None if labelled else "teacher top-1", zorder=3)
            ax.annotate(name, (i + 0.42, s.mean), fontsize=7, va="center")
            labelled = True
    ax.set_xticks(x, [f"{row.name}\n({len(row.seeds)} seeds)" for row in rows], fontsize=8)
    ax.set_ylabel("test top-1 (%)")
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(path, format="png", dpi=120)
