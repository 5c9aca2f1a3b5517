"""The ``kdkit`` command line (typer). Bad input exits with 2, a failed run with 1, a run stopped by a
signal with 128 + the signal's number (130 for SIGINT, 143 for SIGTERM)."""
from __future__ import annotations

import contextlib
import json
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kdkit.errors import KdkitError, RunFailed, RunInterrupted

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)
err = Console(stderr=True, soft_wrap=True)


def _print_version(value: bool) -> None:
    if value:
        from kdkit import __version__

        typer.echo(f"kdkit {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                          help="Print kdkit's version and exit.")):
    """kdkit: multi-teacher knowledge distillation for vision models."""


def _show_warning(message, category, filename, lineno, file=None, line=None):
    err.print(f"[yellow]warning:[/] {message}", highlight=False)


def fail(exc: BaseException, code: int) -> typer.Exit:
    """One line: the message, then any notes (a second error met while cleaning up after it)."""
    message = "; ".join([str(exc), *getattr(exc, "__notes__", [])])
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)  # torch's messages hold [brackets]
    return typer.Exit(code)


@contextlib.contextmanager
def reported():
    """One line and exit 2 for bad input, 1 for a failed run, 128 + signal for an interrupted one;
    the traceback too for anything unexpected."""
    try:
        yield
    except typer.Exit:
        raise
    except KdkitError as exc:
        raise fail(exc, 2) from None
    except RunFailed as exc:
        raise fail(exc, 1) from None
    except RunInterrupted as exc:
        raise fail(exc, 128 + exc.signum) from None
    except KeyboardInterrupt:
        raise fail(KeyboardInterrupt("interrupted"), 130) from None
    except Exception as exc:
        from kdkit.train.processes import timed_out

        lost = timed_out(exc)  # under torchrun: another process stalled
        if lost is not None:
            raise fail(lost, 1) from None
        err.print_exception()
        raise fail(exc, 1) from None


def wide_console() -> Console:
    """Wide tables stay readable when stdout is narrow or not a terminal."""
    return Console(width=max(Console().width, 160))


def output_path(path: Path) -> Path:
    """An output file's path, its folder created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


ALLOW_RANDOM_HELP = "Allow teachers without weights (smoke tests only)."
ALLOW_WEAK_HELP = "Accept a teacher at most twice chance on validation (a warning instead of an error)."


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="The recipe TOML file."),
    override: List[str] = typer.Option([], "-o", "--override", help="key.path=value (a TOML literal); repeatable."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default runs/<name>/seed<seed>; "
                                       "with --seeds, OUT/seed<seed>)."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Comma-separated seeds, e.g. 0,1,2: one run each, "
                                        "the recipe's seed overridden."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing kdkit run directory (never another folder)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in the run directory from its "
                                "checkpoints/last.pt (the end of an epoch, or where a signal stopped it)."),
    allow_changes: bool = typer.Option(False, "--allow-changes", help="With --resume: accept a recipe or teacher "
                                       "weights that differ from the run's (e.g. more train.epochs)."),
    allow_random_teachers: bool = typer.Option(False, "--allow-random-teachers", help=ALLOW_RANDOM_HELP),
    allow_weak_teachers: bool = typer.Option(False, "--allow-weak-teachers", help=ALLOW_WEAK_HELP),
    no_train_teachers: bool = typer.Option(False, "--no-train-teachers",
                                           help="Fail instead of training a teacher given by a recipe."),
):
    """Train the student described by RECIPE (its missing teachers first) into a run directory (one per seed with --seeds).

    SIGINT (Ctrl-C) or SIGTERM stops the run after the current step with a checkpoint to --resume from.
    """
    from kdkit.tools.compare.seeds import parse_seeds, run_seeds
    from kdkit.train.run import run as run_recipe

    options = dict(force=force, resume=resume, allow_changes=allow_changes, allow_random_teachers=allow_random_teachers,
                   allow_weak_teachers=allow_weak_teachers, train_teachers=not no_train_teachers, progress=True,
                   console=err)
    from kdkit.train.processes import processes

    with reported():
        if seeds is None:
            paths = [run_recipe(recipe, override, out, **options)]
        else:
            paths = run_seeds(recipe, parse_seeds(seeds), override, out, **options)
    if processes().is_main:
        for path in paths:
            typer.echo(str(path))


@app.command()
def check(
    recipe: Path = typer.Argument(..., help="The recipe TOML file."),
    override: List[str] = typer.Option([], "-o", "--override", help="key.path=value (a TOML literal); repeatable."),
    allow_random_teachers: bool = typer.Option(False, "--allow-random-teachers", help=ALLOW_RANDOM_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of the recipe and a table."),
):
    """Check RECIPE and build its parts as `kdkit run` would; print the resolved recipe, each part's
    parameters, the student's multiply-adds and the teachers a run would train first. Trains and writes nothing."""
    from kdkit.tools.check import check as check_recipe

    with reported():
        report = check_recipe(recipe, override, allow_random_teachers=allow_random_teachers)
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
        return
    console = wide_console()
    console.print(report.recipe, markup=False, highlight=False)
    table = Table("part", "parameters")
    for part, count in report.params.items():
        table.add_row(part, f"{count:,}")
    console.print(table)
    left_out = f" (left out: {report.flops_unsupported})" if report.flops_unsupported else ""
    flops = f"{report.flops:,}" if report.flops is not None else "n/a"
    console.print(f"student multiply-adds per image: {flops}{left_out}", markup=False, highlight=False)
    for name, out in report.teachers_to_train.items():
        console.print(f"kdkit run would first train teacher {name!r} into {out}", markup=False, highlight=False)


@app.command()
def plugins(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")):
    """List every registered plugin: kind, name, recipe keys and the distribution it came from."""
    from kdkit.plugin.discovery import default_plugins

    try:
        rows = default_plugins().describe()
    except KdkitError as exc:
        raise fail(exc, 2) from None
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    table = Table("kind", "name", "keys", "distribution", "description")
    for row in rows:
        keys = ", ".join(k["key"] + ("" if "default" in k else "*") + (f" ({k['range']})" if "range" in k else "")
                         for k in row["keys"])
        table.add_row(row["kind"], row["name"], keys, row["distribution"], row["doc"])
    wide_console().print(table)
    typer.echo("* required")


@app.command()
def predict(
    run_dir: Path = typer.Argument(..., help="A run directory or student.safetensors."),
    images: List[Path] = typer.Argument(..., help="Image files, or folders of them."),
    top: int = typer.Option(5, "--top", help="How many classes to print per image."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON: per image its path and top classes with "
                                 "their probabilities."),
):
    """Print the top classes the trained student predicts for image files (a folder: every image under it)."""
    from kdkit.tools.predict import predict_files

    try:
        results = predict_files(run_dir, images, top)
    except KdkitError as exc:
        raise fail(exc, 2) from None
    if as_json:
        typer.echo(json.dumps([{"image": str(path), "top": [{"class": name, "probability": prob}
                                                               for name, prob in classes]}
                               for path, classes in results], indent=2))
        return
    for path, classes in results:
        typer.echo(f"{path}: " + ", ".join(f"{name} {prob:.1%}" for name, prob in classes))


@app.command("export")
def export_command(
    run_dir: Path = typer.Argument(..., help="A run directory or student.safetensors."),
    fmt: str = typer.Option("onnx", "--format", help="onnx (ONNX, with kdkit[onnx]) or pt2 (torch.export)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="The file (default: student.<format> beside "
                                       "student.safetensors)."),
    force: bool = typer.Option(False, "--force", help="Replace the file if kdkit export wrote it."),
):
    """Write the trained student's eval prediction for other runtimes (batch of any size; class names,
    mean and std in the file's metadata)."""
    from kdkit.tools.convert import export_student

    with reported():
        typer.echo(export_student(run_dir, fmt, out, force=force))


@app.command()
def compare(
    targets: List[Path] = typer.Argument(..., help="Run directories and/or recipe TOML files."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="For recipe arguments: the seeds to compare, "
                                        "e.g. 0,1,2 (default: the recipe's seed); missing runs are trained."),
    override: List[str] = typer.Option([], "-o", "--override", help="key.path=value for recipe arguments, as "
                                       "given to kdkit run; repeatable."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Where recipe arguments' runs live: RUNS/<name>/seed<seed>."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="A recipe name: print every other recipe's "
                                           "eval top-1 minus this one's, paired by seed."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Also write the table as Markdown."),
    latex: Optional[Path] = typer.Option(None, "--latex", help="Also write the tables as LaTeX (booktabs)."),
    csv_file: Optional[Path] = typer.Option(None, "--csv", help="Also write the table as CSV (numbers)."),
    plot_file: Optional[Path] = typer.Option(None, "--plot", help="Also write a bar chart PNG of eval top-1."),
    curves_file: Optional[Path] = typer.Option(None, "--curves", help="Also write a PNG of every recipe's "
                                               "validation top-1 per epoch (mean and range over seeds)."),
    allow_random_teachers: bool = typer.Option(False, "--allow-random-teachers", help=ALLOW_RANDOM_HELP),
    allow_weak_teachers: bool = typer.Option(False, "--allow-weak-teachers", help=ALLOW_WEAK_HELP),
    jobs: int = typer.Option(1, "--jobs", min=1, help="Train missing runs N at a time, each a process with "
                             "cores / N threads (teachers first, then teacher-output caches, then students)."),
):
    """Compare recipes over seeds: one row per recipe with mean ± std; trains what a recipe argument lacks."""
    from kdkit.tools.compare import plots, report, stats
    from kdkit.tools.compare.runs import collect_runs, validation_curves
    from kdkit.tools.compare.seeds import parse_seeds

    with reported():
        found, stages = collect_runs(targets, parse_seeds(seeds) if seeds else None, override, runs,
                                     allow_random_teachers=allow_random_teachers,
                                     allow_weak_teachers=allow_weak_teachers, jobs=jobs, console=err)
        if stages:
            err.print("wall time of what trained: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in stages.items()),
                      highlight=False)
        rows = stats.summarize(found)
        differences = stats.paired_differences(rows, baseline) if baseline else []
        curves = validation_curves(found) if curves_file else {}  # read before anything is written
        if markdown:
            output_path(markdown).write_text(report.to_markdown(rows, differences))
        if latex:
            output_path(latex).write_text(report.to_latex(rows, differences))
        if csv_file:
            output_path(csv_file).write_text(report.to_csv(rows, differences))
        if plot_file:
            plots.plot(rows, output_path(plot_file))
        if curves_file:
            plots.plot_curves(curves, {run.summary.best_selected_on for run in found}, output_path(curves_file))
    console = Console(width=COMPARE_WIDTH)
    for table in report.tables(rows, differences):
        console.print(_table(table))
    for note in report.footnotes(rows):
        console.print(note, highlight=False, soft_wrap=True)


COMPARE_WIDTH = 100  # compare's tables read in a 100-column terminal (or log)
SHORT_CELL = 14  # "52.41 ± 0.65", "+2.00 ± 1.41": never broken


def _table(table) -> Table:
    """Recipe names and short cells (the numbers) whole; longer text wraps to fit, breaking words only
    where it must (headers wrap at spaces)."""
    out = Table(*table.headers, title=table.title)
    out.columns[0].no_wrap = True
    for column, header, cells in zip(out.columns[1:], table.headers[1:], list(zip(*table.body))[1:]):
        longest = max(map(len, cells))
        if longest <= SHORT_CELL:
            column.width = max(longest, *map(len, header.split()))
        else:
            column.overflow = "fold"
    for row in table.body:
        out.add_row(*row)
    return out


cache_app = typer.Typer(no_args_is_help=True, help="Teacher-output caches (a recipe's teacher_cache table).")
app.add_typer(cache_app, name="cache")


@cache_app.command("build")
def cache_build(
    recipe: Path = typer.Argument(..., help="The recipe TOML file (with a teacher_cache table)."),
    override: List[str] = typer.Option([], "-o", "--override", help="key.path=value (a TOML literal); repeatable."),
    allow_random_teachers: bool = typer.Option(False, "--allow-random-teachers", help=ALLOW_RANDOM_HELP),
    verify: bool = typer.Option(False, "--verify", help="Then check every chunk against the checksum recorded "
                                "when it was written (training checks each chunk when it first reads it)."),
):
    """Run every teacher of RECIPE once on each training image's views and store the outputs (resumable)."""
    from kdkit.train.run import build_teacher_caches

    with reported():
        caches = build_teacher_caches(recipe, override, allow_random_teachers=allow_random_teachers, verify=verify,
                                      console=err)
    for name, record in caches.items():
        unverified = record.get("unverified_chunks")
        checked = ("" if unverified is None else ", every chunk verified" if not unverified else
                   f", {unverified} chunks built before checksums were recorded: not verified")
        typer.echo(f"{name}: {record['path']} ({record['images']} images x {record['views']} views, "
                   f"{record['bytes'] / 2**20:.1f} MiB, {record['bytes_per_image']:.0f} bytes per image, "
                   f"{record['build_s']:.0f} s to build, summed over its chunks{checked})")


@app.command()
def flops(
    targets: List[Path] = typer.Argument(..., help="Recipe TOML files and/or run directories."),
    override: List[str] = typer.Option([], "-o", "--override", help="key.path=value for recipe arguments; "
                                       "repeatable."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON: per target its count and the operators "
                                 "left out."),
):
    """Multiply-adds of one image through each student's eval prediction (what summary.json's flops counts).

    A run directory is counted from its student.safetensors; a recipe from its student as built, which
    reads only the dataset's class list and channels (no training batch). A target that fails is reported
    and the others counted; the exit status is then 2."""
    from kdkit.tools.flops import target_flops

    counts, failed = [], False
    for target in targets:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # operators left out are part of the answer here
                count = target_flops(target, override)
        except KdkitError as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
            failed = True
            continue
        counts.append({"target": str(target), "flops": count.total, "unsupported": count.unsupported})
    if as_json:
        typer.echo(json.dumps(counts, indent=2))
    else:
        for count in counts:
            left_out = f" (left out: {count['unsupported']})" if count["unsupported"] else ""
            typer.echo(f"{count['target']}: {count['flops'] if count['flops'] is not None else 'n/a'}{left_out}")
    if failed:
        raise typer.Exit(2)


@app.command("eval")
def evaluate(
    run_dir: Path = typer.Argument(..., help="A run directory."),
    figure: Optional[Path] = typer.Option(None, "--figure", help="Write a PNG of teachers' and heads' class "
                                          "probabilities on validation images."),
    images: int = typer.Option(4, "--images", min=1, help="How many validation images the figure shows."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Also write the numbers as JSON."),
    allow_random_teachers: bool = typer.Option(False, "--allow-random-teachers",
                                               help="Evaluate against the run's random teachers (smoke tests)."),
):
    """Per-head top-1 and KL(teacher || head) between every head and teacher, on the run's validation set."""
    from kdkit.tools import evaluate as heads_vs_teachers

    with reported():
        rebuilt = heads_vs_teachers.rebuild(run_dir, allow_random_teachers=allow_random_teachers)
        result = heads_vs_teachers.evaluate(rebuilt)
        if json_file:
            output_path(json_file).write_text(json.dumps(result.to_json(), indent=2) + "\n")
        if figure:
            heads_vs_teachers.figure(rebuilt, output_path(figure), images)
    wide_console().print(heads_vs_teachers.table(result))


def main() -> None:
    from kdkit.train.processes import shutdown

    warnings.showwarning = _show_warning
    try:
        app()
    finally:
        shutdown()


if __name__ == "__main__":
    sys.exit(main())
