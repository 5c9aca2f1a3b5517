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


def load_weights(model: nn.Module, path: str | Path, *, what: str = "the model", convert=None) -> None:
    """Load a plain state dict strictly, with a clear message naming ``what`` on mismatch. ``convert``
    maps a foreign layout onto the model's names first (None when it does not recognise it)."""
    state = read_state_dict(path)
    state = (convert(state) if convert else None) or state
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that do not match
        raise KdkitError(f"{path}: the weights do not fit {what}: {exc}") from None
    if missing or unexpected:
        raise KdkitError(f"{path}: the weights do not fit {what}: missing {sorted(missing)[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {sorted(unexpected)[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")


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
