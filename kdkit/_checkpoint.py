"""Weights in and out: plain state dicts for teachers, and the training checkpoint.

Training checkpoints hold only tensors and plain data, so ``torch.load(weights_only=True)`` reads them.
"""
from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from kdkit._errors import KdkitError, RunFailed


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


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then fsync and rename over ``path``: a kill never leaves a torn file. A write that fails
    (a full disk, an unwritable folder, any error of ``write``) leaves the previous ``path`` as it was,
    removes the temporary and raises ``RunFailed`` naming the path and the reason."""
    path = Path(path)
    tmp = temporary_path(path, os.getpid())
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a power cut
        finally:
            os.close(directory)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # on a read-only file system even this fails
            tmp.unlink(missing_ok=True)
        if not isinstance(exc, Exception):  # KeyboardInterrupt and the like go on as they are
            raise
        intact = "; the previous one is intact" if path.exists() else ""
        raise RunFailed(f"cannot write {path}: {reason(exc)}{intact}") from exc


def temporary_path(path: Path, pid: int) -> Path:
    """Where process ``pid`` writes ``path`` before renaming it: ``.<name>.<pid>.tmp`` beside it."""
    return path.with_name(f".{path.name}.{pid}.tmp")


def leftover_temporaries(path: Path) -> list[Path]:
    """The temporaries of ``path`` that a killed process left behind (kdkit's own names only)."""
    return [tmp for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp")
            if tmp.name[len(path.name) + 2:-len(".tmp")].isdigit()]


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


def reason(exc: BaseException) -> str:
    """Why a read or write failed, on one line: the OS error behind ``exc`` (torch reports a full disk as a
    ``RuntimeError`` raised while handling it), else the gist of ``exc``'s message (torch's weights-only
    refusal: its cause, not its advice)."""
    cause = exc
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None and cause.strerror:
        return cause.strerror
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        lines = [line for line in lines[1:] if not line.startswith(("Please file an issue", "Check the documentation"))]
    return lines[0][:300] if lines else type(exc).__name__
