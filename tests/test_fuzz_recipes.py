"""Property-based fuzz of recipe values (issue 21): whatever number, NaN, infinity, string or list a
recipe key is given, kdkit either refuses it with one line (KdkitError, exit 2, no run directory) or
trains; never another exception. Most examples are only checked (the recipe resolved, as every
command does first); a few are run end to end through the CLI on a tiny recipe."""
from __future__ import annotations

import dataclasses
import json
import math

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kdkit.errors import KdkitError
from kdkit.recipe.experiment import resolve
from kdkit.recipe.toml import load_recipe

RECIPE = """
seed = 0

[data]
dataset = "fake"
image_size = 16
num_classes = 2
train_size = 8
val_size = 4
batch_size_eval = 4
workers = 0

[student]
plugin = "mixer"
patch_size = 8
depth = 1
embed_dim = 8

[teachers.t]
plugin = "timm"
model = "test_resnet"

[[losses]]
plugin = "ce"
head = "pool"

[[losses]]
plugin = "kl"
head = "pool"
teachers = ["t"]

[train]
epochs = 1
batch_size = 4
lr = 1e-3
warmup_epochs = 0

[eval]
heads = ["pool"]
"""

# Keys whose values only change what one step computes: safe to train with any accepted value.
CHEAP_KEYS = [
    "seed", "train.lr", "train.min_lr", "train.warmup_lr", "train.weight_decay", "train.momentum",
    "train.clip_grad", "augment.mixup", "augment.cutmix", "augment.label_smoothing", "augment.random_erasing",
    "augment.hflip", "augment.crop_scale", "losses.0.weight", "losses.1.weight", "losses.1.tau",
    "student.drop_path_rate",
]
# Keys that also set how much work a run is: only checked.
SIZE_KEYS = [
    "train.epochs", "train.batch_size", "train.accum_steps", "train.warmup_epochs", "augment.repeated_aug",
    "data.image_size", "data.num_classes", "data.limit_train", "data.limit_val", "data.val_split",
    "data.batch_size_eval", "data.workers", "data.train_size", "data.val_size", "data.in_chans",
    "student.patch_size", "student.depth", "student.embed_dim", "teacher_cache.views", "teacher_cache.top_k",
]

SPECIAL = [math.nan, math.inf, -math.inf, 0, 0.0, -0.0, -1, -1.0, 0.5, 1, 1.0, 2, 1e-300, 1e300, 2**63 - 1, -2**63,
           10**18]
numbers = st.one_of(st.sampled_from(SPECIAL), st.floats(allow_nan=True, allow_infinity=True),
                    st.integers(min_value=-2**63, max_value=2**63 - 1))
values = st.one_of(numbers, numbers, st.booleans(), st.text(alphabet="ab1.", max_size=3),
                   st.lists(numbers, max_size=3))
# For trained examples: out-of-range and non-finite values, and ordinary ones that train.
cheap_values = st.one_of(st.sampled_from([math.nan, math.inf, -1.0, 0.0, 0.1, 0.5, 1.0, 2.0, 3, "x"]),
                         st.lists(st.sampled_from([math.nan, 0.0, 0.3, 1.0, 2.0]), max_size=3))


def toml_literal(value) -> str:
    """``value`` as the right-hand side of an ``-o key=value`` override."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_literal, value)) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def overrides_of(assignments: dict) -> list[str]:
    return [f"{key}={toml_literal(value)}" for key, value in assignments.items()]


def floats_in(value):
    """Every float in a resolved value: dataclasses, dicts and lists searched."""
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [f for item in value for f in floats_in(item)]
    return [value] if isinstance(value, float) else []


@settings(derandomize=True, database=None, max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(CHEAP_KEYS + SIZE_KEYS), values, min_size=1, max_size=3))
def test_fuzzed_values_are_accepted_or_refused_with_one_line(write_recipe, assignments):
    recipe = write_recipe(RECIPE)
    try:
        exp = resolve(load_recipe(recipe, overrides_of(assignments)), allow_random_teachers=True)
    except KdkitError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    resolved = [exp.data, exp.train, exp.augment, exp.teacher_cache, exp.student.kwargs, exp.dataset.kwargs,
                [(loss.weight, loss.spec.kwargs) for loss in exp.losses]]
    assert all(math.isfinite(f) for f in floats_in(resolved)), assignments


@settings(derandomize=True, database=None, max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(CHEAP_KEYS), cheap_values, min_size=1, max_size=2))
@example({"losses.1.tau": math.nan}).via("issue 21: a non-finite loss after the run directory was written")
def test_fuzzed_runs_train_or_exit_2_writing_nothing(write_recipe, cli, tmp_path_factory, assignments):
    recipe = write_recipe(RECIPE)
    out = tmp_path_factory.mktemp("fuzz") / "run"
    args = ["run", recipe, "--out", out, "--allow-random-teachers"]
    for override in overrides_of(assignments):
        args += ["-o", override]
    result = cli(*args)
    if result.exit_code == 2:
        assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
        assert not out.exists()
    else:
        assert result.exit_code == 0, (assignments, result.output)
        assert json.loads((out / "summary.json").read_text())["status"] == "completed"
