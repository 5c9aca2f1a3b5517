"""kdkit's stem-token student is the authors' released CivT: the same parts, parameters and token order, the
same outputs once the released weights are mapped onto it, and a released checkpoint loads as a student.

``Released`` below is written from the released code's description (OliverRensu/co-advise, models.py):
a timm VisionTransformer whose patch embedding is replaced by a convolution stem (``conv_embed``) and
RedNet-26's stem (``inv_embed``, mmcls's module names), tokens (cls, mean of the conv stem's patches,
mean of the inv stem's patches) before the patches (the sum of both stems'), a position embedding
over all of them, heads ``head``, ``head_conv``, ``head_inv``, and the mean of the three in eval mode.
"""
from __future__ import annotations

import json

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import kdkit
from kdkit.builder.model import DistillModel
from kdkit_plugins.heads import linear
from kdkit_plugins.rednet import rednet_stem
from kdkit_plugins.vit import from_released, vit

SMALL = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)


class ConvEmbed(nn.Module):
    def __init__(self, dim, patch):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(True),
                                  nn.Conv2d(64, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(True),
                                  nn.Conv2d(64, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(True))
        self.proj = nn.Conv2d(64, dim, patch // 2, patch // 2)

    def forward(self, x):
        return self.proj(self.conv(x)).flatten(2).transpose(1, 2)


class InvEmbed(nn.Module):
    def __init__(self, dim, patch):
        super().__init__()
        self.stem = rednet_stem(3, 32, 64, stride=2)
        self.proj = nn.Conv2d(64, dim, patch // 2, patch // 2)

    def forward(self, x):
        return self.proj(self.stem(x)).flatten(2).transpose(1, 2)


class Released(VisionTransformer):
    def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, num_classes=10):
        super().__init__(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, num_classes=num_classes)
        num_patches = (img_size // patch_size) ** 2
        del self.patch_embed
        self.conv_embed, self.inv_embed = ConvEmbed(embed_dim, patch_size), InvEmbed(embed_dim, patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 3, embed_dim) * 0.02)
        self.head_conv, self.head_inv = nn.Linear(embed_dim, num_classes), nn.Linear(embed_dim, num_classes)

    def forward(self, x):
        conv, inv = self.conv_embed(x), self.inv_embed(x)
        tokens = [self.cls_token.expand(len(x), -1, -1), conv.mean(1, keepdim=True), inv.mean(1, keepdim=True)]
        x = self.norm(self.blocks(torch.cat([*tokens, conv + inv], 1) + self.pos_embed))
        logits = self.head(x[:, 0]), self.head_conv(x[:, 1]), self.head_inv(x[:, 2])
        return logits if self.training else sum(logits) / 3


def kdkit_civt(classes=10) -> DistillModel:
    student = vit(tokens=["cls", "conv", "inv"], token_kind="stem", in_chans=3, drop_path_rate=0.0, **SMALL)
    heads = {t: linear(in_features=SMALL["embed_dim"], num_classes=classes) for t in student.tokens}
    return DistillModel(student, heads, {t: t for t in heads}, ["cls", "conv", "inv"])


@pytest.fixture
def released():
    torch.manual_seed(0)
    model = Released(**SMALL)
    model.train()(torch.randn(4, 3, 32, 32))  # BatchNorm statistics a fresh model lacks
    return model.eval()


def test_the_same_parts_and_parameter_counts(released):
    ours = kdkit_civt()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in released.parameters())
    parts = {"conv stem": ("stems.conv", "conv_embed"), "inv stem": ("stems.inv", "inv_embed"),
             "blocks": ("blocks", "blocks"), "position": ("pos_embed", "pos_embed")}
    for name, (mine, theirs) in parts.items():
        count_ours = sum(p.numel() for n, p in ours.student.named_parameters() if n.startswith(mine))
        count_theirs = sum(p.numel() for n, p in released.named_parameters() if n.startswith(theirs))
        assert count_ours == count_theirs, name


def test_released_weights_give_the_same_outputs(released):
    ours = kdkit_civt().eval()
    missing, unexpected = ours.load_state_dict(from_released(released.state_dict()), strict=False)
    assert not missing and not unexpected
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.predict(x), released(x), rtol=0, atol=1e-6)  # eval: the mean of heads
        ours.train(), released.train()  # training mode: each head (both models' BatchNorms alike)
        logits, (cls, conv, inv) = ours(x), released(x)
    assert list(logits) == ["cls", "conv", "inv"]
    for name, expected in zip(logits, (cls, conv, inv)):  # token order: cls, conv, inv
        torch.testing.assert_close(logits[name], expected, rtol=0, atol=1e-6)


def test_a_released_checkpoint_loads_as_a_student_and_is_evaluated_untrained(released, write_recipe, tmp_path):
    path = tmp_path / "civt_released.pth"
    torch.save({"model": released.state_dict(), "epoch": 299}, path)  # the DeiT-style checkpoint layout
    recipe = write_recipe(f"""
        [data]
        dataset = "fake"
        image_size = 32
        num_classes = 10
        train_size = 16
        val_size = 20
        workers = 0
        [student]
        plugin = "vit"
        tokens = ["cls", "conv", "inv"]
        token_kind = "stem"
        img_size = 32
        patch_size = 8
        embed_dim = 48
        depth = 2
        num_heads = 3
        drop_path_rate = 0.0
        checkpoint = "{path}"
        [[losses]]
        plugin = "ce"
        head = "cls"
        [train]
        epochs = 0
        batch_size = 8
        [eval]
        heads = ["cls", "conv", "inv"]
        """)
    out = kdkit.run(recipe, out=tmp_path / "run")
    summary = json.loads((out / "summary.json").read_text())
    from kdkit.builder.parts import build_splits
    from kdkit.plugin.discovery import default_plugins
    from kdkit.recipe.experiment import resolve
    from kdkit.recipe.toml import load_recipe

    val = build_splits(resolve(load_recipe(recipe)), default_plugins()).val
    images = torch.stack([val[i][0] for i in range(len(val))])
    labels = torch.tensor([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        expected = 100.0 * (released(images).argmax(-1) == labels).float().mean().item()
    assert summary["epochs"] == 0 and summary["test_top1"]["eval"] == pytest.approx(expected)
    exported = kdkit.load(out)
    for key, value in from_released(released.state_dict()).items():
        assert torch.equal(exported.state_dict()[key], value), key
