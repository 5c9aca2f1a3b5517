"""``student.safetensors``: the trained student and heads, with what it takes to rebuild them.

The metadata carries the resolved student, heads and eval tables, the class names and the input
normalization, so ``kdkit.load`` rebuilds the model without the training state, and such a file
(or its run directory) can serve as a teacher checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from kdkit.builder.model import DistillModel, build_distill_model
from kdkit.errors import reason
from kdkit.errors import KdkitError
from kdkit.recipe.schema import check_table
from kdkit.store.atomic import atomic_write

FILENAME = "student.safetensors"
META_KEY = "kdkit"


def export_path(path: str | Path) -> Path:
    path = Path(path)
    return path / FILENAME if path.is_dir() else path


def is_export(path: str | Path) -> bool:
    path = export_path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    return META_KEY in _metadata(path)


def _metadata(path: Path) -> dict:
    """A safetensors file's metadata; a truncated or damaged file is refused, naming it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        fix = "train the run again (kdkit run --force)" if path.name == FILENAME else "write or copy it again"
        raise KdkitError(f"{path}: cannot read the weights ({reason(exc)}): the file is truncated or damaged; "
                         f"{fix}, or put back a good copy") from None


def save(path: Path, model: DistillModel, meta: dict) -> None:
    """Write the student (``student.*``) and heads (``heads.<name>.*``) with ``meta`` as JSON; written by
    Python like every run file (safetensors' own writer makes a file only its owner can read)."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: tmp.write_bytes(safetensors_bytes(state, metadata={META_KEY: json.dumps(meta)})))


def read_meta(path: str | Path) -> dict:
    path = export_path(path)
    if not is_export(path):
        raise KdkitError(f"{path}: not a kdkit export (a run directory or its {FILENAME})")
    try:
        meta = json.loads(_metadata(path)[META_KEY])
    except ValueError as exc:
        raise KdkitError(f"{path}: the kdkit metadata is not valid JSON ({exc}): the file is damaged") from None
    missing = _missing(meta)
    if missing:
        raise KdkitError(f"{path}: the kdkit metadata has no {missing}: the file is damaged or was not written by "
                         "kdkit; export it again (kdkit run --force trains the run again)")
    return meta


def _missing(meta) -> str | None:
    """The first key ``load`` needs that the metadata lacks (plugin names and keyword tables, the eval heads)."""
    if not isinstance(meta, dict):
        return "table"
    heads = meta.get("heads")
    if not isinstance(heads, dict) or not heads:
        return "heads"
    for key, part in {"student": meta.get("student"), **{f"heads.{k}": v for k, v in heads.items()}}.items():
        for field, kind in (("plugin", str), ("kwargs", dict)):
            if not (isinstance(part, dict) and isinstance(part.get(field), kind)):
                return f"{key}.{field}"
    evaluation = meta.get("eval")
    if not (isinstance(evaluation, dict) and isinstance(evaluation.get("heads"), list)):
        return "eval.heads"
    return None


def load(path: str | Path, plugins=None) -> DistillModel:
    """Rebuild the exported model in eval mode; ``model.meta`` holds class names and normalization."""
    from safetensors.torch import load_file

    from kdkit.plugin.discovery import default_plugins

    plugins = plugins or default_plugins()
    file = export_path(path)
    meta = read_meta(file)
    student = plugins.get("student", meta["student"]["plugin"])
    student = student(**_checked(student, meta["student"]["kwargs"], file, "student"))
    heads = {name: {**head, "kwargs": _checked(plugins.get("head", head["plugin"]), head["kwargs"], file,
                                               f"heads.{name}")}
             for name, head in meta["heads"].items()}
    model = build_distill_model(plugins, student, heads, meta["eval"]["heads"])
    model.load_state_dict(load_file(str(file)))
    model.meta = meta
    return model.eval()


def _checked(factory, kwargs: dict, file: Path, key: str) -> dict:
    """The stored keys, checked as a recipe's are (types and ranges), before a layer is allocated."""
    return check_table(factory, kwargs, kind="config", file=file, key=key)
