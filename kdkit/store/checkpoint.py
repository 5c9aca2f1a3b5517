"""Weights in and out: plain state dicts for teachers, and the training checkpoint.

Training checkpoints hold only tensors and plain data, so ``torch.load(weights_only=True)`` reads them.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from kdkit.errors import KdkitError, reason
from kdkit.store.atomic import atomic_write


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors``, or a torch file holding one plainly or under model/state_dict."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise KdkitError(f"{path}: cannot read the weights ({reason(exc)}): the file is truncated or "
                             "damaged; write or copy it again, or put back a good copy") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise KdkitError(f"{path}: cannot read weights: {reason(exc)}") from None
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise KdkitError(f"{path}: not a state dict (expected tensors, or a dict with 'model' or 'state_dict')")
    return {k.removeprefix("module."): v for k, v in data.items()}


def load_weights(model: nn.Module, path: str | Path, *, what: str = "the model", convert=None,
                 hint: str = "") -> None:
    """Load a plain state dict strictly. A mismatch is one line naming ``what``: how many tensors differ in
    shape (the first few, file against model), are missing or unexpected, then ``hint``. ``convert``
    maps a foreign layout onto the model's names first (None when it does not recognise it)."""
    state = read_state_dict(path)
    state = (convert(state) if convert else None) or state
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)  # a model may convert a layout of its own
    except RuntimeError as exc:  # shapes that do not match
        own = model.state_dict()
        reshaped = sorted(k for k in own.keys() & state.keys() if tuple(state[k].shape) != tuple(own[k].shape))
        detail = (_listed("of other shapes", reshaped, lambda k: f"{k} {list(state[k].shape)} in the file, "
                                                                 f"{list(own[k].shape)} in the model")
                  if reshaped else "; ".join(line.strip() for line in str(exc).splitlines()[:4]))
        raise KdkitError(f"{path}: the weights do not fit {what}: {detail}{hint}") from None
    if missing or unexpected:
        problems = [_listed(kind, sorted(names), str) for kind, names in (("missing", missing),
                                                                        ("unexpected", unexpected)) if names]
        raise KdkitError(f"{path}: the weights do not fit {what}: {'; '.join(problems)}{hint}")


def _listed(kind: str, names: list[str], show) -> str:
    """``N tensors <kind> (the first three shown)``, for one line of a message."""
    return f"{len(names)} tensor{'' if len(names) == 1 else 's'} {kind} ({', '.join(map(show, names[:3]))}{', ...' if len(names) > 3 else ''})"


def save_checkpoint(path: Path, state: dict) -> None:
    """Write a training checkpoint atomically (``atomic_write``); through a Python file, so that a full
    disk's ``OSError`` stays behind torch's ``RuntimeError`` (torch's own writer drops it)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(state, f)

    atomic_write(path, write)


def load_checkpoint(path: Path, keys: Iterable[str] = ()) -> dict:
    """A training checkpoint holding ``keys``; a truncated, garbled or foreign file is refused naming it."""
    again = "start the run again with --force, or put back a good copy"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise KdkitError(f"{path}: cannot read the checkpoint ({reason(exc)}): the file is truncated or damaged; "
                         f"{again}") from None
    missing = [key for key in keys if key not in state] if isinstance(state, dict) else list(keys)
    if missing:
        raise KdkitError(f"{path}: not a kdkit training checkpoint (no {', '.join(missing)}); {again}")
    return state


def check_fits(model: nn.Module, state: object, path: str | Path) -> None:
    """Refuse a checkpoint's weights whose names or shapes are not ``model``'s own, before anything is loaded."""
    expected = model.state_dict()
    found = state if isinstance(state, dict) else {}
    wrong = sorted(key for key in expected.keys() | found.keys() if key not in expected or key not in found
                   or not isinstance(found[key], torch.Tensor) or found[key].shape != expected[key].shape)
    if wrong:
        raise KdkitError(f"{path}: the checkpoint's weights do not fit the run's model ({len(wrong)} tensors differ: "
                         f"{', '.join(wrong[:5])}{'...' if len(wrong) > 5 else ''}); start the run again with "
                         "--force, or put back a good copy")
