"""Commands around runs: check a recipe, compare runs, evaluate, predict, several runs at once."""
