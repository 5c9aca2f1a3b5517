"""The ``kdkit`` command line (typer). Bad input exits with 2, other failures with 1."""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from kdkit.errors import KdkitError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="kdkit: multi-teacher knowledge distillation for vision models.")
err = Console(stderr=True, soft_wrap=True)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    err.print(f"[yellow]warning:[/] {message}", highlight=False)


def fail(exc: BaseException, code: int) -> typer.Exit:
    err.print(f"[bold red]error:[/] {exc}", highlight=False)
    return typer.Exit(code)


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="The recipe TOML file."),
    override: List[str] = typer.Option([], "-o", "--override", help="key.path=value (a TOML literal); repeatable."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default runs/<name>/seed<seed>)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing non-empty run directory."),
    allow_random_teachers: bool = typer.Option(False, "--allow-random-teachers",
                                               help="Allow teachers without weights (smoke tests only)."),
    no_train_teachers: bool = typer.Option(False, "--no-train-teachers",
                                           help="Fail instead of training a teacher given by a recipe."),
):
    """Train the teachers' student described by RECIPE and write its run directory."""
    from kdkit.runner import run as run_recipe

    try:
        path = run_recipe(recipe, override, out, force=force, allow_random_teachers=allow_random_teachers,
                          train_teachers=not no_train_teachers)
    except KdkitError as exc:
        raise fail(exc, 2) from None
    except KeyboardInterrupt:
        raise fail(KeyboardInterrupt("interrupted; the run directory records status 'interrupted'"), 1) from None
    except Exception as exc:
        err.print_exception()
        raise fail(exc, 1) from None
    typer.echo(str(path))


@app.command()
def plugins(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")):
    """List every registered plugin: kind, name, recipe keys and the distribution it came from."""
    from kdkit.plugins import default_plugins

    try:
        rows = default_plugins().describe()
    except KdkitError as exc:
        raise fail(exc, 2) from None
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    table = Table("kind", "name", "keys", "distribution", "description")
    for row in rows:
        keys = ", ".join(k["key"] + ("" if "default" in k else "*") for k in row["keys"])
        table.add_row(row["kind"], row["name"], keys, row["distribution"], row["doc"])
    Console(width=max(Console().width, 160)).print(table)
    typer.echo("* required")


@app.command()
def predict(
    run_dir: Path = typer.Argument(..., help="A run directory or student.safetensors."),
    images: List[Path] = typer.Argument(..., help="Image files."),
    top: int = typer.Option(5, "--top", help="How many classes to print per image."),
):
    """Print the top classes the trained student predicts for image files."""
    from kdkit.predict import predict_files

    try:
        results = predict_files(run_dir, images, top)
    except KdkitError as exc:
        raise fail(exc, 2) from None
    for path, classes in results:
        typer.echo(f"{path}: " + ", ".join(f"{name} {prob:.1%}" for name, prob in classes))


def main() -> None:
    warnings.showwarning = _show_warning
    app()


if __name__ == "__main__":
    sys.exit(main())
