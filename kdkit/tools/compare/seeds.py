"""Several seeds of one recipe: ``kdkit run --seeds`` trains sibling run directories, one per seed.

A seed is an override applied last, and none when the recipe already names it, so that a plain
``kdkit run`` of the recipe and its seed of a comparison are the same run (same recipe hash).
"""
from __future__ import annotations

from pathlib import Path

from kdkit.errors import KdkitError
from kdkit.recipe.toml import Recipe, load_recipe
from kdkit.store.rundir import RunDir, default_run_dir


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
