"""Numbers read back from files kdkit wrote get the recipe's ranges: a ``student.safetensors`` whose metadata
asks for an absurd student is refused with the file and key named, before a layer is allocated."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import kdkit
from kdkit.api import KdkitError

STUDENT = {"plugin": "mixer", "kwargs": {"img_size": 16, "patch_size": 8, "in_chans": 3, "depth": 1, "embed_dim": 8}}
HEADS = {"pool": {"plugin": "linear", "embedding": "pool", "kwargs": {"in_features": 8, "num_classes": 2}}}


def export_with(tmp_path, student=STUDENT, heads=HEADS):
    path = tmp_path / "student.safetensors"
    meta = {"student": student, "heads": heads, "eval": {"heads": ["pool"]}}
    save_file({"unused": torch.zeros(1)}, str(path), metadata={"kdkit": json.dumps(meta)})
    return path


@pytest.mark.parametrize("key, value, message", [
    ("embed_dim", -5, "student.embed_dim: must be >= 1, <= 16384, got -5"),
    ("embed_dim", 10**7, "student.embed_dim: must be >= 1, <= 16384, got 10000000"),
    ("embed_dim", 1e7, "student.embed_dim: expected int, got float 10000000.0"),
    ("depth", 0, "student.depth: must be >= 1, <= 64, got 0"),
    ("drop_path_rate", float("nan"), "student.drop_path_rate: must be finite and >= 0, < 1, got nan"),
])
def test_student_metadata_gets_the_recipe_ranges(tmp_path, key, value, message):
    student = {**STUDENT, "kwargs": {**STUDENT["kwargs"], key: value}}
    path = export_with(tmp_path, student=student)
    with pytest.raises(KdkitError) as raised:
        kdkit.load(path)
    assert str(raised.value) == f"{path}: {message}"


def test_head_metadata_gets_the_recipe_ranges(tmp_path):
    heads = {"pool": {**HEADS["pool"], "kwargs": {"in_features": 8, "num_classes": -1}}}
    path = export_with(tmp_path, heads=heads)
    with pytest.raises(KdkitError, match=r"heads\.pool\.num_classes: must be >= 1, <= 100000, got -1"):
        kdkit.load(path)
