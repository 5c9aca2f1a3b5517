"""``kdkit export``: a trained student as a file that other runtimes load: ``torch.export``'s ``.pt2`` or ONNX.

What is exported is the student's eval prediction (``DistillModel.predict``: its ``eval.heads``
averaged) on a batch of any size, from normalized images of the training size, as ``kdkit predict``
feeds it. The class names, mean, std, image size and crop fraction travel with it: in the ``.pt2``
file's extra file ``kdkit.json`` (``torch.export.load(path, extra_files={"kdkit.json": ""})``) and in
the ONNX model's metadata under ``kdkit``.
"""
from __future__ import annotations

import importlib.util
import json
import zipfile
from pathlib import Path

import torch

from kdkit.builder.model import Predictor
from kdkit.errors import KdkitError, RunFailed
from kdkit.store.atomic import atomic_write
from kdkit.store.export import export_path, load

FORMATS = ("onnx", "pt2")
DEPLOY_META = ("class_names", "mean", "std", "image_size", "crop_pct", "in_chans")


def export_student(source: str | Path, fmt: str, out: str | Path | None = None, *, force: bool = False) -> Path:
    """Write the student of a run directory or ``student.safetensors`` as ``fmt``; returns the file.
    By default it goes beside the source's ``student.safetensors`` as ``student.<fmt>``."""
    if fmt not in FORMATS:
        raise KdkitError(f"--format {fmt!r}: one of {', '.join(FORMATS)}")
    if fmt == "onnx" and importlib.util.find_spec("onnxscript") is None:
        raise KdkitError("--format onnx needs the onnx and onnxscript packages (pip install 'kdkit[onnx]')")
    model = load(source).eval()
    out = Path(out) if out else export_path(source).with_suffix(f".{fmt}")
    if out.exists() and not (force and written_by_kdkit(out, fmt)):
        raise KdkitError(f"{out}: already exists (--force replaces a file that kdkit export wrote, no other)")
    meta = {key: model.meta[key] for key in DEPLOY_META}
    program = Predictor(model).eval()
    example = torch.zeros(2, meta["in_chans"], meta["image_size"], meta["image_size"])
    batch = {"images": {0: torch.export.Dim("batch", min=1)}}
    try:
        if fmt == "pt2":
            exported = torch.export.export(program, (example,), dynamic_shapes=batch)
            extra = {"kdkit.json": json.dumps(meta)}
            atomic_write(out, lambda tmp: torch.export.save(exported, tmp, extra_files=extra))
        else:
            atomic_write(out, lambda tmp: _onnx(program, example, batch, meta, tmp))
    except (RuntimeError, ValueError, TypeError, AssertionError) as exc:  # what torch's exporters raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunFailed(f"{source}: the student cannot be exported as {fmt}: {first}") from exc
    return out


def written_by_kdkit(path: Path, fmt: str) -> bool:
    """Whether ``path`` is a ``kdkit export`` of ``fmt``: its ``kdkit`` metadata is there."""
    try:
        if fmt == "pt2":
            with zipfile.ZipFile(path) as archive:
                return any(name.endswith("/extra/kdkit.json") for name in archive.namelist())
        import onnx

        return any(p.key == "kdkit" for p in onnx.load(str(path), load_external_data=False).metadata_props)
    except Exception:  # not a zip, not ONNX, unreadable: not ours
        return False


def _onnx(program: torch.nn.Module, example: torch.Tensor, batch: dict, meta: dict, path: Path) -> None:
    import onnx

    torch.onnx.export(program, (example,), str(path), dynamo=True, dynamic_shapes=batch, verbose=False)
    graph = onnx.load(str(path))
    graph.metadata_props.add(key="kdkit", value=json.dumps(meta))
    onnx.save(graph, str(path))
