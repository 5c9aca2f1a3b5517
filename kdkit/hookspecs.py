"""The hooks a kdkit plugin implements: one per kind, each given that kind's mmengine Registry.

The built-in plugins in ``kdkit_plugins`` use exactly these hooks and are found through the
same ``kdkit`` entry-point group as third-party packages.
"""
from __future__ import annotations

import pluggy
from mmengine.registry import Registry

hookspec = pluggy.HookspecMarker("kdkit")
hookimpl = pluggy.HookimplMarker("kdkit")

KINDS = ("student", "teacher", "head", "loss", "dataset")


@hookspec
def kdkit_register_students(registry: Registry) -> None:
    """Register student factories: each builds an nn.Module returning ``dict[str, Tensor]`` embeddings."""


@hookspec
def kdkit_register_teachers(registry: Registry) -> None:
    """Register teacher factories: each builds an nn.Module returning logits."""


@hookspec
def kdkit_register_heads(registry: Registry) -> None:
    """Register token-head factories: each maps one embedding to logits."""


@hookspec
def kdkit_register_losses(registry: Registry) -> None:
    """Register loss factories: each returns ``loss(logits, *, target, labels, teacher_logits)``."""


@hookspec
def kdkit_register_datasets(registry: Registry) -> None:
    """Register dataset factories: each returns a ``kdkit.data.DatasetSplits``."""


def hook_name(kind: str) -> str:
    return f"kdkit_register_{'losses' if kind == 'loss' else kind + 's'}"
