"""The hooks a kdkit plugin implements.

Two families. Registration hooks, one per kind, each given that kind's mmengine Registry: plugins
add students, teachers, heads, losses, datasets and callbacks by name. Lifecycle hooks, called by
``Trainer.fit`` on every registered plugin and on the callbacks a run builds: they receive the run,
read-only, as ``trainer`` (``kdkit.api.Run``: its counters, history, summary, run directory, model).

The built-in plugins in ``kdkit_plugins`` use exactly these hooks and are found through the same
``kdkit`` entry-point group as third-party packages; the progress display, ``metrics.jsonl`` and
``summary.json``, the checkpoints and the safetensors export are callbacks like any other.
"""
from __future__ import annotations

import pluggy
from mmengine.registry import Registry

hookspec = pluggy.HookspecMarker("kdkit")
hookimpl = pluggy.HookimplMarker("kdkit")

KINDS = ("student", "teacher", "head", "loss", "dataset", "callback")


# --- registration ---------------------------------------------------------------------------------

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
    """Register dataset factories: each returns a ``kdkit.api.DatasetSplits``."""


@hookspec
def kdkit_register_callbacks(registry: Registry) -> None:
    """Register callback factories: each returns an object whose ``@hookimpl`` methods join one run."""


@hookspec
def kdkit_flop_rules() -> dict | None:
    """FLOP rules for operators the count does not know, by traced name (a custom autograd Function
    traces as ``prim::PythonOp.<its class name>``): ``rule(inputs, outputs) -> multiply-adds``, where
    ``inputs`` and ``outputs`` are the traced values (``api.traced_shape(value)`` gives a shape)."""


@hookspec(firstresult=True)
def kdkit_convert_checkpoint(state_dict: dict) -> dict | None:
    """A student checkpoint in a foreign layout (``[student] checkpoint``) under kdkit's names
    (``student.*``, ``heads.<name>.*``), or None when the plugin does not recognise it."""


# --- the run's lifecycle, in the order Trainer.fit calls them ---------------------------------------

@hookspec
def kdkit_run_start(trainer) -> None:
    """The run directory exists and the state is loaded (fresh, or resumed: ``trainer.resumed``)."""


@hookspec
def kdkit_step_end(trainer, logged: dict[str, float]) -> None:
    """After every optimizer update: ``logged`` holds the step's loss terms (``loss``, ``<plugin>/<head>``)."""


@hookspec
def kdkit_evaluate(trainer) -> dict[str, float] | None:
    """At the end of every epoch: extra validation top-1 entries (%) for the epoch's ``top1``, or None."""


@hookspec
def kdkit_epoch_end(trainer, row: dict) -> None:
    """An epoch is complete and ``trainer.epoch`` counts it; ``row`` is its ``metrics.jsonl`` line."""


@hookspec
def kdkit_state_dict(trainer) -> dict | None:
    """State a plugin keeps in checkpoints, keyed by a name of its own (tensors and plain data only)."""


@hookspec
def kdkit_load_state_dict(trainer, state: dict) -> None:
    """Restore what ``kdkit_state_dict`` saved; ``state`` holds every plugin's entries by their keys."""


@hookspec
def kdkit_run_end(trainer, status: str) -> None:
    """The run stops: ``status`` is ``completed``, ``interrupted`` (a signal) or ``failed``."""


def hook_name(kind: str) -> str:
    return f"kdkit_register_{'losses' if kind == 'loss' else kind + 's'}"
