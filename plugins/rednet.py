"""RedNet (the involution paper's ResNet, Li et al., CVPR 2021) as a teacher (logits) or a student (``pool``).

The module names follow mmcls's RedNet (``stem.N``, ``layerN.M.conv1/bn1/...``, ConvModule-style
``.conv``/``.bn``), so the official checkpoints load as they are: a load hook renames their two
prefixes. ``small_input`` and ``width`` make a light RedNet that trains on 32 px images on a CPU.
"""
from __future__ import annotations

from typing import Annotated

import torch
from timm.layers import DropPath
from torch import nn

from kdkit.api import KdkitError, PooledStudent, Range, hookimpl
from kdkit_plugins.involution import Involution2d
from kdkit_plugins.sizes import Channels, Classes, DropRate

WidthMultiplier = Annotated[float, Range(gt=0, le=8)]  # of every stage's channels

# Bottleneck blocks per stage, by depth.
STAGE_BLOCKS = {26: (1, 2, 4, 1), 38: (2, 3, 5, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def _scaled(channels: int, width: float) -> int:
    """``channels * width`` to the nearest multiple of 16 (at least 16), so involution groups of 16 stay whole."""
    return max(16, int(channels * width / 16 + 0.5) * 16)


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    """Conv (no bias), BatchNorm, ReLU, named ``conv``/``bn``/``act`` like mmcv's ConvModule."""
    block = nn.Sequential()
    block.add_module("conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride,
                                       padding=kernel_size // 2, bias=False))
    block.add_module("bn", nn.BatchNorm2d(out_channels))
    block.add_module("act", nn.ReLU(inplace=True))
    return block


def rednet_stem(in_chans: int, half: int, out_channels: int, stride: int = 2) -> nn.Sequential:
    """RedNet's stem with mmcls's module names: conv3x3 (stride), a 3x3 involution, conv3x3, each with BN + ReLU."""
    return nn.Sequential(_conv_bn_relu(in_chans, half, 3, stride=stride), Involution2d(half, 3), nn.BatchNorm2d(half),
                         nn.ReLU(inplace=True), _conv_bn_relu(half, out_channels, 3))


class Bottleneck(nn.Module):
    """ResNet's bottleneck (expansion 4) with a 7x7 involution, which carries the stride, as its middle layer."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1, project: bool = False,
                 drop_path: float = 0.0):
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = Involution2d(channels, 7, stride)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels),
        ) if project else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(self.drop_path(out) + shortcut)


class RedNet(nn.Module):
    """RedNet-26/38/50/101/152, with timm's classifier interface; ``num_classes=0`` returns pooled features.

    Stem: conv3x3/2 (3 -> 32), involution(32, K=3), conv3x3 (32 -> 64), max-pool 3x3/2, each conv
    and the involution followed by BN + ReLU. ``small_input`` drops the stem's stride and the
    max-pool (for 32 px images); ``width`` scales every width (multiples of 16).
    """

    def __init__(self, depth: int = 26, num_classes: int = 1000, in_chans: int = 3, small_input: bool = False,
                 width: float = 1.0, drop_path_rate: float = 0.0):
        super().__init__()
        if depth not in STAGE_BLOCKS:
            raise KdkitError(f"RedNet depth must be one of {', '.join(map(str, STAGE_BLOCKS))}, got {depth}")
        if width <= 0:
            raise KdkitError(f"RedNet width must be positive, got {width}")
        self.depth, self.num_classes = depth, num_classes
        stem_width = _scaled(64, width)
        half = _scaled(32, width)
        self.stem = rednet_stem(in_chans, half, stem_width, stride=1 if small_input else 2)
        self.maxpool = nn.Identity() if small_input else nn.MaxPool2d(3, 2, padding=1)

        blocks = STAGE_BLOCKS[depth]
        total = sum(blocks)  # stochastic depth grows linearly from 0 to drop_path_rate over the blocks
        rates = iter([drop_path_rate * i / max(total - 1, 1) for i in range(total)])
        in_channels = stem_width
        for stage, (n, base, stride) in enumerate(zip(blocks, (64, 128, 256, 512), (1, 2, 2, 2)), start=1):
            channels = _scaled(base, width)
            layer = []
            for i in range(n):
                layer.append(Bottleneck(in_channels, channels, stride if i == 0 else 1, project=i == 0,
                                        drop_path=next(rates)))
                in_channels = channels * Bottleneck.expansion
            self.add_module(f"layer{stage}", nn.Sequential(*layer))
        self.num_features = in_channels
        self.fc = nn.Linear(in_channels, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()
        self._register_load_state_dict_pre_hook(_accept_mmcls_keys, with_module=True)

    def _init_weights(self) -> None:
        """mmcls's initialisation: Kaiming convs, unit BN, last BN of each block zero (blocks start as identities)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.stem(x))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((2, 3))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def convert_mmcls_state_dict(state_dict: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """An official (mmcls) RedNet state dict with our keys: ``backbone.`` dropped, ``head.fc.`` -> ``fc.``.

    Every other name already matches; keys of neither prefix pass unchanged, so a state dict
    in our own layout converts to itself and strict loading reports anything foreign.
    """
    converted = {}
    for key, value in state_dict.items():
        if key.startswith(prefix + "backbone."):
            key = prefix + key.removeprefix(prefix + "backbone.")
        elif key.startswith(prefix + "head.fc."):
            key = prefix + "fc." + key.removeprefix(prefix + "head.fc.")
        converted[key] = value
    return converted


def _accept_mmcls_keys(module, state_dict, prefix, *args) -> None:
    """Load-state-dict pre-hook: official checkpoints load through kdkit's plain ``checkpoint`` key."""
    converted = convert_mmcls_state_dict(state_dict, prefix)
    state_dict.clear()
    state_dict.update(converted)


def rednet_teacher(*, num_classes: Classes, depth: int = 26, in_chans: Channels = 3, small_input: bool = False,
                   width: WidthMultiplier = 1.0) -> nn.Module:
    """RedNet-26/38/50/101/152 (involution) returning logits; ``checkpoint`` also takes official mmcls files."""
    return RedNet(depth, num_classes=num_classes, in_chans=in_chans, small_input=small_input, width=width)


def rednet_student(*, depth: int = 26, in_chans: Channels = 3, small_input: bool = False,
                   width: WidthMultiplier = 1.0, drop_path_rate: DropRate = 0.0) -> nn.Module:
    """RedNet-26/38/50/101/152 (involution) returning its pooled features as ``pool``."""
    return PooledStudent(RedNet(depth, num_classes=0, in_chans=in_chans, small_input=small_input, width=width,
                                drop_path_rate=drop_path_rate))


@hookimpl
def kdkit_register_teachers(registry):
    registry.register_module("rednet", module=rednet_teacher)


@hookimpl
def kdkit_register_students(registry):
    registry.register_module("rednet", module=rednet_student)
