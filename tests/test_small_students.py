"""The paper's other small students: ``mixer`` (MLP-Mixer Ti) and ``resnet10``."""
from __future__ import annotations

import torch

import kdkit
from kdkit.plugin.discovery import default_plugins
from kdkit_plugins.small_students import mixer, resnet10


def images(size: int, channels: int = 3) -> torch.Tensor:
    return torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0))


def test_registered():
    assert {"mixer", "resnet10"} <= set(default_plugins().names("student"))


def test_mixer_defaults_are_ti():
    with torch.device("meta"):
        student = mixer()
    assert student.embedding_dims == {"pool": 192}
    assert len(student.model.blocks) == 12
    assert student.model.stem.patch_size == (16, 16)


def test_mixer_small_images():
    student = mixer(img_size=32, patch_size=4, depth=2, embed_dim=48)
    out = student(images(32))
    assert list(out) == ["pool"] and out["pool"].shape == (2, 48)
    assert student.embedding_dims == {"pool": 48}


def test_resnet10_one_basic_block_per_stage():
    student = resnet10()
    stages = [student.model.layer1, student.model.layer2, student.model.layer3, student.model.layer4]
    assert [len(stage) for stage in stages] == [1, 1, 1, 1]
    assert student(images(64))["pool"].shape == (2, 512)
    assert student.embedding_dims == {"pool": 512}


def test_resnet10_small_input_keeps_resolution():
    """At 32 px the small-input stem leaves 4x4 maps at the last stage; the ImageNet stem leaves 1x1."""
    x = images(32)
    assert resnet10(small_input=True).model.forward_features(x).shape == (2, 512, 4, 4)
    assert resnet10().model.forward_features(x).shape == (2, 512, 1, 1)


def test_build_model_with_one_channel():
    student = kdkit.build_model("student", plugin="resnet10", small_input=True, in_chans=1)
    assert student(images(32, channels=1))["pool"].shape == (2, 512)
