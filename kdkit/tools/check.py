"""``kdkit check``: a recipe checked and its parts built as ``kdkit run`` builds them; nothing trained or written.

It answers before a long run starts: what the recipe resolves to (after ``extends`` and the
overrides), how large each part is, how many multiply-adds the student's prediction costs, and which
teachers a run would train first. The data is read (its first images pass through the student) and
every teacher with weights is loaded, so what would fail in ``kdkit run``'s checks fails here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from kdkit.builder.build import teacher_runs, untrained
from kdkit.builder.parts import build_parts, build_teachers
from kdkit.plugin.discovery import default_plugins
from kdkit.recipe.experiment import resolve
from kdkit.recipe.toml import load_recipe
from kdkit.train.run import student_flops


@dataclass
class CheckReport:
    """What ``kdkit check`` prints, or writes as JSON."""

    recipe: str  # the resolved recipe, as TOML
    params: dict[str, int]  # "student", "heads.<name>", "teachers.<name>" (every teacher but those to train)
    flops: int | None  # multiply-adds of one image through the eval prediction
    flops_unsupported: dict[str, int]  # operators the count has no rule for, left out
    teachers_to_train: dict[str, str]  # teacher -> the run directory its recipe would be trained into

    def to_json(self) -> dict:
        return asdict(self)


def parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def check(recipe_path, overrides=(), *, allow_random_teachers: bool = False) -> CheckReport:
    """Check ``recipe_path`` with ``overrides`` and build its student, heads and existing teachers on the CPU."""
    plugins = default_plugins()
    exp = resolve(load_recipe(recipe_path, list(overrides)), plugins, allow_random_teachers=allow_random_teachers)
    device = torch.device("cpu")
    torch.manual_seed(exp.seed)
    parts = build_parts(exp, plugins, device)
    runs = teacher_runs(exp, plugins)
    to_train = untrained(runs)
    teachers = build_teachers(exp, plugins, parts, device, runs, skip=to_train)
    params = {"student": parameters(parts.model.student),
              **{f"heads.{name}": parameters(head) for name, head in parts.model.heads.items()},
              **{f"teachers.{name}": parameters(teacher.model) for name, teacher in teachers.items()}}
    flops = student_flops(parts.model, parts.splits.in_chans, exp.data.image_size, plugins)
    return CheckReport(exp.recipe.to_toml(), params, flops.total, flops.unsupported,
                       {name: str(out) for name, out in to_train.items()})
