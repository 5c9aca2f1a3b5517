"""The timm plugin: any timm model as student or teacher, and the 32 px stem for ResNets and RegNets."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import kdkit
from kdkit.errors import KdkitError


@pytest.mark.parametrize("model", ["resnet18", "resnet10t", "regnety_002"])
def test_small_input_keeps_32px_resolution_until_the_first_stage(model):
    seen = {}
    teacher = kdkit.build_model("teacher", plugin="timm", model=model, num_classes=10, small_input=True)
    first_stage = teacher.layer1 if hasattr(teacher, "layer1") else teacher.s1
    first_stage.register_forward_hook(lambda m, args, out: seen.setdefault("in", args[0].shape[-1]) and None)
    logits = teacher(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    assert seen["in"] == 32
    assert not any(isinstance(m, nn.MaxPool2d) for m in teacher.modules())


def test_small_input_is_refused_for_other_families():
    with pytest.raises(KdkitError, match="small_input is for timm's ResNet and RegNet families"):
        kdkit.build_model("student", plugin="timm", model="test_vit", small_input=True)


def test_student_returns_its_pooled_embedding():
    student = kdkit.build_model("student", plugin="timm", model="resnet18", small_input=True)
    out = student(torch.randn(2, 3, 32, 32))
    assert set(out) == {"pool"} and out["pool"].shape == (2, student.embedding_dims["pool"]) == (2, 512)


def test_unknown_model_and_offline_pretrained_are_clear(monkeypatch):
    # huggingface_hub's offline mode (HF_HUB_OFFLINE=1): the same failure as no network, without its ~50 s of retries
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(KdkitError, match="timm has no model named 'resnet1888'"):
        kdkit.build_model("teacher", plugin="timm", model="resnet1888", num_classes=10)
    with pytest.raises(KdkitError, match="could not load pretrained weights for 'resnet18' .*HF_HUB_OFFLINE=1"):
        kdkit.build_model("teacher", plugin="timm", model="resnet18", num_classes=10, pretrained=True)
