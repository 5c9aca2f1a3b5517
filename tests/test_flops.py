"""FLOP counts (multiply-adds) against counts written out by hand from the architectures."""
from __future__ import annotations

import json
import math

import pytest
import torch

import kdkit
from kdkit.builder.flops import count_flops, plugin_rules
from kdkit.builder.model import Predictor
from kdkit.plugin.discovery import default_plugins


def involution_count(channels: int, kernel: int, size_out: int, reduction: int = 4, group: int = 16) -> int:
    """Kernel generation (two 1x1 convolutions at the output size) and the K*K aggregation."""
    reduced, taps = channels // reduction, kernel * kernel
    return size_out**2 * (channels * reduced + reduced * taps * channels // group + channels * taps)


def rednet26_by_hand(size: int = 224, classes: int = 1000) -> int:
    h = size // 2  # the stem's first convolution has stride 2
    macs = h * h * 27 * 32 + involution_count(32, 3, h) + h * h * 32 * 9 * 64
    h //= 2  # max-pool
    in_channels = 64
    for blocks, channels, stride in zip((1, 2, 4, 1), (64, 128, 256, 512), (1, 2, 2, 2)):
        for i in range(blocks):
            out = math.ceil(h / (stride if i == 0 else 1))  # the 7x7 involution carries the stride
            macs += h * h * in_channels * channels  # conv1, 1x1
            macs += involution_count(channels, 7, out)
            macs += out * out * channels * 4 * channels  # conv3, 1x1
            if i == 0:
                macs += out * out * in_channels * 4 * channels  # projection shortcut
            in_channels, h = 4 * channels, out
    return macs + in_channels * classes


def vit_by_hand(tokens: int, dim: int = 192, depth: int = 12, patches: int = 196, patch_pixels: int = 768,
                classes: int = 1000) -> int:
    """Patch embedding, then per block qkv + proj (4 D^2) and MLP (8 D^2) per token and attention (2 T^2 D)."""
    t = patches + tokens
    return patches * patch_pixels * dim + depth * (12 * t * dim * dim + 2 * t * t * dim) + dim * classes


@pytest.fixture(scope="module")
def rules():
    return plugin_rules(default_plugins().manager.hook)


def test_civt_ti_counts_attention(rules):
    student = kdkit.build_model("student", plugin="vit", preset="ti", tokens=["cls", "conv", "inv"])
    model = Predictor(kdkit.builder.model.DistillModel(student, {"cls": torch.nn.Linear(192, 1000)}, {"cls": "cls"},
                                                ["cls"]))
    count = count_flops(model, torch.zeros(1, 3, 224, 224), rules)
    expected = vit_by_hand(tokens=3)
    assert expected == pytest.approx(1.268e9, rel=1e-3)  # the 1.27 G of the paper's CivT-Ti
    assert count.total == pytest.approx(expected, rel=0.01) and count.unsupported == {}


def test_an_involution_layer_counts_exactly_per_image_of_a_batch(rules):
    from kdkit_plugins.involution import Involution2d
    layer = Involution2d(32, kernel_size=3)
    assert count_flops(layer, torch.zeros(2, 32, 8, 8), rules).total == 2 * involution_count(32, 3, 8)


def test_rednet26_counts_the_involution_aggregation(rules):
    model = kdkit.build_model("teacher", plugin="rednet", depth=26, num_classes=1000)
    count = count_flops(model, torch.zeros(1, 3, 224, 224), rules)
    assert count.total == pytest.approx(rednet26_by_hand(), rel=0.01) and count.unsupported == {}
    without = count_flops(model, torch.zeros(1, 3, 224, 224))  # no rule: reported, not silently zero
    assert without.unsupported == {"prim::PythonOp._Involution": 9}
    assert without.total < count.total


def test_unknown_operators_are_reported():
    class Erf(torch.nn.Module):
        def forward(self, x):
            return torch.special.erf(x).flatten(1) @ torch.ones(12, 2)

    count = count_flops(Erf(), torch.zeros(1, 3, 2, 2))
    assert count.total == 12 * 2 and count.unsupported == {"aten::erf": 1}


def test_the_flops_command_counts_what_a_run_records(cli, tmp_path):
    from conftest import TWO_TEACHER_RECIPE

    recipe = tmp_path / "two.toml"
    recipe.write_text(TWO_TEACHER_RECIPE)
    out = kdkit.run(recipe, ["train.epochs=1"], out=tmp_path / "run", allow_random_teachers=True)
    flops = json.loads((out / "summary.json").read_text())["flops"]
    result = cli("flops", recipe, out)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [f"{recipe}: {flops}", f"{out}: {flops}"]
    big_batch = cli("flops", recipe, "-o", "train.batch_size=1024", "--json")  # no training batch is built
    assert big_batch.exit_code == 0 and json.loads(big_batch.output) == [{"target": str(recipe), "flops": flops,
                                                                         "unsupported": {}}]
    wider = cli("flops", tmp_path / "missing.toml", recipe, "-o", "student.model_kwargs.img_size=64",
                "-o", "data.image_size=64")
    assert wider.exit_code == 2 and "missing.toml" in wider.output  # reported, and the next target counted
    assert int(wider.output.splitlines()[-1].split(": ")[1]) > 3 * flops  # four times the pixels
    built = kdkit.build(recipe, allow_random_teachers=True)
    assert kdkit.count_flops(built.model, torch.zeros(1, 3, 32, 32)).total == flops  # the public function
