"""ViT students with named distillation tokens (the paper's CivT): student plugin ``vit``.

Two ways to make the distillation tokens (``token_kind``):

- ``learned``, the paper's text and DeiT's distilled model: each token is a learnable parameter.
- ``stem``, the authors' released code: a convolution stem and an involution stem replace the
  linear patch embedding; the patch tokens are the sum of both stems' patch embeddings and the
  ``conv`` / ``inv`` tokens are the mean of their own stem's, so each token starts from the
  inductive bias of the teacher it learns from.
"""
from __future__ import annotations

from typing import Literal

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from kdkit.api import KdkitError, hookimpl
from kdkit_plugins.rednet import rednet_stem
from kdkit_plugins.sizes import AttentionHeads, Channels, Depth, DropRate, ImageSize, PatchSize, Width

# DeiT-Ti and DeiT-S, as in the paper; drop path 0.1 is DeiT's training recipe, which the paper follows.
PRESETS = {
    "ti": dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3, drop_path_rate=0.1),
    "s": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, drop_path_rate=0.1),
}
STEM_TOKENS = ("cls", "conv", "inv")  # with stem tokens: the class token and one token per stem
STEM_CHANNELS = 64


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


def conv_stem(in_chans: int) -> nn.Sequential:
    """The released code's ResNet-style stem: conv7x7/2, then two conv3x3, each with BN and ReLU."""
    return nn.Sequential(*_conv_bn_relu(in_chans, STEM_CHANNELS, 7, stride=2),
                         *_conv_bn_relu(STEM_CHANNELS, STEM_CHANNELS, 3),
                         *_conv_bn_relu(STEM_CHANNELS, STEM_CHANNELS, 3))


def involution_stem(in_chans: int) -> nn.Sequential:
    """RedNet-26's stem (the RedNet plugin's, with mmcls's names): conv3x3/2, a 3x3 involution, conv3x3 to 64."""
    return rednet_stem(in_chans, STEM_CHANNELS // 2, STEM_CHANNELS, stride=2)


class StemEmbed(nn.Module):
    """A stride-2 stem, then a projection with kernel = stride = patch_size / 2: (B, C, H, W) -> (B, N, D).

    Initialised as the released code does: Kaiming normal weights for every convolution, and the stem's
    biases (the involution's kernel generation) at zero, as mmcv's ConvModule starts them.
    """

    def __init__(self, stem: nn.Module, embed_dim: int, patch_size: int):
        super().__init__()
        self.stem = stem
        self.proj = nn.Conv2d(STEM_CHANNELS, embed_dim, patch_size // 2, stride=patch_size // 2)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)
        for module in self.stem.modules():
            if isinstance(module, nn.Conv2d) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.stem(images)).flatten(2).transpose(1, 2)


class TokenViT(VisionTransformer):
    """timm's ViT whose prefix tokens are ``tokens``; ``forward`` returns each one's embedding after the final norm.

    The position embedding covers every prefix token and every patch, as in DeiT's distilled model;
    the tokens enter the sequence in ``tokens`` order.
    """

    def __init__(self, *, tokens: list[str], token_kind: Literal["learned", "stem"], img_size: int,
                 patch_size: int, in_chans: int, embed_dim: int, depth: int, num_heads: int,
                 drop_path_rate: float):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=0,
                         global_pool="", embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                         drop_path_rate=drop_path_rate, class_token="cls" in tokens)
        self.tokens = list(tokens)
        self.embedding_dims = {name: embed_dim for name in self.tokens}
        num_patches = self.patch_embed.num_patches
        learned = [name for name in self.tokens if name != "cls"] if token_kind == "learned" else []
        self.dist_tokens = nn.ParameterDict({name: nn.Parameter(torch.empty(1, 1, embed_dim)) for name in learned})
        if token_kind == "stem":
            del self.patch_embed  # the stems replace it
            self.stems = nn.ModuleDict({"conv": StemEmbed(conv_stem(in_chans), embed_dim, patch_size),
                                        "inv": StemEmbed(involution_stem(in_chans), embed_dim, patch_size)})
        else:
            self.stems = None
        self.num_prefix_tokens = len(self.tokens)
        self.pos_embed = nn.Parameter(torch.empty(1, num_patches + len(self.tokens), embed_dim))
        for parameter in (self.pos_embed, *self.dist_tokens.values()):  # timm's init for the rest
            trunc_normal_(parameter, std=0.02)
        if token_kind == "stem" and self.cls_token is not None:
            trunc_normal_(self.cls_token, std=0.02)  # as the released code's timm did; today's uses std 1e-6

    def embed(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Each prefix token by name, (B, 1, D), and the patch tokens, (B, N, D), before position embedding."""
        batch = images.shape[0]
        if self.stems is None:
            patches = self.patch_embed(images)
            prefix = {name: token.expand(batch, -1, -1) for name, token in self.dist_tokens.items()}
        else:
            per_stem = {name: stem(images) for name, stem in self.stems.items()}
            patches = per_stem["conv"] + per_stem["inv"]
            prefix = {name: stem_patches.mean(1, keepdim=True) for name, stem_patches in per_stem.items()}
        if self.cls_token is not None:
            prefix["cls"] = self.cls_token.expand(batch, -1, -1)
        return prefix, patches

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        prefix, patches = self.embed(images)
        x = torch.cat([prefix[name] for name in self.tokens] + [patches], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        return self.norm(self.blocks(x))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.forward_features(images)
        return {name: x[:, i] for i, name in enumerate(self.tokens)}

    def no_weight_decay(self) -> set[str]:
        """The position embedding and the learned tokens, as timm's optimizer factory reads it."""
        names = {"pos_embed", *(f"dist_tokens.{name}" for name in self.dist_tokens)}
        return names | ({"cls_token"} if self.cls_token is not None else set())


def _check(tokens: list[str], token_kind: str, arch: dict) -> None:
    if not tokens:
        raise KdkitError('vit: tokens must name at least one token, e.g. ["cls"]')
    bad = [name for name in tokens if not name.isidentifier()]
    if bad:
        raise KdkitError(f"vit: token names must be identifiers (they name embeddings and heads), got {bad}")
    repeated = sorted({name for name in tokens if tokens.count(name) > 1})
    if repeated:
        raise KdkitError(f"vit: tokens must be unique; repeated: {', '.join(repeated)}")
    if arch["embed_dim"] % arch["num_heads"]:
        raise KdkitError(f"vit: embed_dim ({arch['embed_dim']}) must be a multiple of num_heads ({arch['num_heads']})")
    if token_kind != "stem":
        return
    unknown = [name for name in tokens if name not in STEM_TOKENS]
    if unknown:
        raise KdkitError(f"vit: with token_kind = \"stem\" the tokens are a subset of {', '.join(STEM_TOKENS)} "
                         f"(one per stem, plus the class token); got {unknown} (use token_kind = \"learned\")")
    if arch["patch_size"] % 2 or arch["img_size"] % arch["patch_size"]:
        raise KdkitError(f"vit: stem tokens need an even patch_size that divides img_size (the stems halve the "
                         f"image, then project with stride patch_size / 2); got patch_size {arch['patch_size']}, "
                         f"img_size {arch['img_size']}")


def vit(*, preset: Literal["ti", "s"] = "ti", tokens: list[str] = ["cls"],  # noqa: B006 (copied, never mutated)
        token_kind: Literal["learned", "stem"] = "learned", img_size: ImageSize | None = None,
        patch_size: PatchSize | None = None, in_chans: Channels = 3, depth: Depth | None = None,
        embed_dim: Width | None = None, num_heads: AttentionHeads | None = None,
        drop_path_rate: DropRate | None = None) -> nn.Module:
    """A DeiT-style ViT (preset ti or s; unset keys take the preset's value) with one embedding per token."""
    overrides = dict(img_size=img_size, patch_size=patch_size, depth=depth, embed_dim=embed_dim,
                     num_heads=num_heads, drop_path_rate=drop_path_rate)
    arch = PRESETS[preset] | {key: value for key, value in overrides.items() if value is not None}
    _check(list(tokens), token_kind, arch)
    return TokenViT(tokens=list(tokens), token_kind=token_kind, in_chans=in_chans, **arch)


@hookimpl
def kdkit_register_students(registry):
    registry.register_module("vit", module=vit)


# The released CivT checkpoint's key prefixes (its DistilledVisionTransformer) and kdkit's for a stem-token
# ``vit`` student with heads cls, conv and inv. Every other key (cls_token, pos_embed, blocks, norm) is the
# student's under the same name.
RELEASED_PREFIXES = {
    "conv_embed.conv.": "student.stems.conv.stem.", "conv_embed.proj.": "student.stems.conv.proj.",
    "inv_embed.stem.": "student.stems.inv.stem.", "inv_embed.proj.": "student.stems.inv.proj.",
    "head_conv.": "heads.conv.", "head_inv.": "heads.inv.", "head.": "heads.cls.",
}


def from_released(state_dict: dict) -> dict:
    """The authors' released CivT weights under kdkit's names (student ``vit``, token_kind stem, heads cls/conv/inv)."""
    converted = {}
    for key, value in state_dict.items():
        prefix = next((p for p in RELEASED_PREFIXES if key.startswith(p)), None)
        converted[RELEASED_PREFIXES[prefix] + key[len(prefix):] if prefix else "student." + key] = value
    return converted


@hookimpl
def kdkit_convert_checkpoint(state_dict):
    """A released CivT checkpoint (it has both stems' projections) loads as a stem-token ``vit`` student."""
    if "conv_embed.proj.weight" in state_dict and "inv_embed.proj.weight" in state_dict:
        return from_released(state_dict)
    return None
