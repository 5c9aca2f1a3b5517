"""RedNet: the paper's parameter counts, shapes, the light 32 px variant, bf16, and official (mmcls) weights."""
from __future__ import annotations

import pytest
import torch

import kdkit
from kdkit.errors import KdkitError
from kdkit.plugin.discovery import default_plugins
from kdkit_plugins.involution import Involution2d
from kdkit_plugins.rednet import RedNet, convert_mmcls_state_dict, rednet_student, rednet_teacher

LIGHT = dict(depth=26, small_input=True, width=0.25)


def images(size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_registered_as_teacher_and_student():
    plugins = default_plugins()
    assert "rednet" in plugins.names("teacher") and "rednet" in plugins.names("student")


@pytest.mark.parametrize("depth,params", [(26, 9_233_166), (38, 12_386_986), (50, 15_540_806),
                                          (101, 25_652_950), (152, 33_984_582)])
def test_parameter_counts_match_the_paper(depth, params):
    with torch.device("meta"):
        model = RedNet(depth, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == params


def test_imagenet_shapes():
    model = rednet_teacher(num_classes=10).eval()
    with torch.no_grad():
        features = model.forward_features(images(224))
        assert features.shape == (2, 2048, 7, 7)
        assert model.forward_head(features, pre_logits=True).shape == (2, 2048)
        assert model.forward_head(features).shape == (2, 10)


def test_small_input_shapes():
    model = rednet_teacher(num_classes=10, **LIGHT).eval()
    with torch.no_grad():
        assert model.forward_features(images(32)).shape == (2, 512, 4, 4)
        assert model(images(32)).shape == (2, 10)


def test_width_keeps_involution_groups_whole():
    for width in (0.25, 0.3, 0.5, 1.5):
        with torch.device("meta"):
            model = RedNet(26, width=width)
        involutions = [m for m in model.modules() if isinstance(m, Involution2d)]
        assert all(m.conv1.conv.in_channels % 16 == 0 for m in involutions)
    with torch.device("meta"):
        assert RedNet(26, width=0.5).num_features == 1024
        assert RedNet(26, width=0.25).layer1[0].conv2.groups == 1


def test_student_returns_pool():
    student = rednet_student(**LIGHT, drop_path_rate=0.1)
    out = student(images(32))
    assert list(out) == ["pool"] and out["pool"].shape == (2, 512)
    assert student.embedding_dims == {"pool": 512}
    assert student.model.layer4[-1].drop_path.drop_prob == pytest.approx(0.1)


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    model = rednet_teacher(num_classes=10, **LIGHT).eval()
    for m in model.modules():  # non-trivial residual branches and logits, unlike the zero-initialised ones
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.0)
    torch.nn.init.normal_(model.fc.weight, std=0.1)
    x = images(32)
    with torch.no_grad():
        expected = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=0.1, atol=0.05 * expected.abs().max().item())


def test_build_model_and_depth_validation():
    teacher = kdkit.build_model("teacher", plugin="rednet", depth=26, num_classes=10, small_input=True, width=0.25)
    assert teacher.eval()(images(32)).shape == (2, 10)
    student = kdkit.build_model("student", plugin="rednet", small_input=True, width=0.25)
    assert student(images(32))["pool"].shape == (2, 512)
    with pytest.raises(KdkitError, match="26, 38, 50, 101, 152"):
        kdkit.build_model("teacher", plugin="rednet", depth=34, num_classes=10)


def to_mmcls(key: str) -> str:
    """Our key -> the official checkpoints' key (mmcls's ImageClassifier: backbone + LinearClsHead)."""
    return "head." + key if key.startswith("fc.") else "backbone." + key


def test_layout_is_mmcls():
    with torch.device("meta"):
        shapes = {to_mmcls(k): tuple(v.shape) for k, v in RedNet(26).state_dict().items()}
    # Names and shapes as in the official RedNet-26 checkpoint (mmcls's RedNet and its ConvModule).
    official = {
        "backbone.stem.0.conv.weight": (32, 3, 3, 3),
        "backbone.stem.0.bn.running_var": (32,),
        "backbone.stem.1.conv1.conv.weight": (8, 32, 1, 1),
        "backbone.stem.1.conv1.bn.weight": (8,),
        "backbone.stem.1.conv2.conv.weight": (18, 8, 1, 1),
        "backbone.stem.1.conv2.conv.bias": (18,),
        "backbone.stem.2.num_batches_tracked": (),
        "backbone.stem.4.conv.weight": (64, 32, 3, 3),
        "backbone.layer1.0.conv1.weight": (64, 64, 1, 1),
        "backbone.layer1.0.bn1.running_mean": (64,),
        "backbone.layer1.0.conv2.conv2.conv.weight": (196, 16, 1, 1),
        "backbone.layer1.0.conv3.weight": (256, 64, 1, 1),
        "backbone.layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "backbone.layer1.0.downsample.1.bias": (256,),
        "backbone.layer3.3.conv2.conv1.conv.weight": (64, 256, 1, 1),
        "backbone.layer4.0.conv2.conv2.conv.bias": (1568,),
        "backbone.layer4.0.bn3.weight": (2048,),
        "head.fc.weight": (1000, 2048),
        "head.fc.bias": (1000,),
    }
    assert {k: shapes.get(k) for k in official} == official
    assert not any("layer2.1.downsample" in k for k in shapes)


def save_as_mmcls(model: torch.nn.Module, path) -> None:
    """What mmcls writes: meta plus the state dict under 'state_dict', with mmcls's key names."""
    state = {to_mmcls(k): v for k, v in model.state_dict().items()}
    torch.save({"meta": {"epoch": 100, "CLASSES": ["a", "b"]}, "state_dict": state}, path)


def test_mmcls_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    original = RedNet(26, num_classes=10, small_input=True, width=0.25)
    original.train()(images(16, batch=4))  # BatchNorm running statistics that differ from a fresh model's
    path = tmp_path / "rednet26_mmcls.pth"
    save_as_mmcls(original, path)

    loaded = kdkit.build_model("teacher", plugin="rednet", num_classes=10, checkpoint=str(path), **LIGHT)
    for key, value in original.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(images(16)), original.eval()(images(16)))
    assert convert_mmcls_state_dict(original.state_dict()).keys() == original.state_dict().keys()


def test_mmcls_checkpoint_that_does_not_fit(tmp_path):
    path = tmp_path / "rednet26_mmcls.pth"
    save_as_mmcls(RedNet(26, num_classes=10, small_input=True, width=0.25), path)
    with pytest.raises(KdkitError, match="do not fit"):
        kdkit.build_model("teacher", plugin="rednet", num_classes=5, checkpoint=str(path), **LIGHT)
    with pytest.raises(KdkitError, match="missing"):
        kdkit.build_model("teacher", plugin="rednet", num_classes=10, checkpoint=str(path), depth=38,
                          small_input=True, width=0.25)
