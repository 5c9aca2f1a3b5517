"""The paper's other small students (Table 3): MLP-Mixer Ti (``mixer``) and ResNet-10 (``resnet10``).

Both are timm models without a classifier, returning their pooled embedding as ``pool``.
"""
from __future__ import annotations

from timm.models.mlp_mixer import MlpMixer
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

from kdkit.api import PooledStudent, hookimpl
from kdkit_plugins.sizes import Channels, Depth, DropRate, ImageSize, PatchSize, Width
from kdkit_plugins.timm_models import use_small_input_stem


def mixer(*, img_size: ImageSize = 224, patch_size: PatchSize = 16, in_chans: Channels = 3, depth: Depth = 12,
          embed_dim: Width = 192, drop_path_rate: DropRate = 0.0) -> nn.Module:
    """MLP-Mixer (Ti by default: 12 blocks of width 192 on 16 px patches) returning its pooled embedding."""
    return PooledStudent(MlpMixer(num_classes=0, img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                  num_blocks=depth, embed_dim=embed_dim, drop_path_rate=drop_path_rate))


def resnet10(*, small_input: bool = False, in_chans: Channels = 3, drop_path_rate: DropRate = 0.0) -> nn.Module:
    """ResNet with one basic block per stage; small_input: 3x3 stride-1 stem, no max-pool (32 px images)."""
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=0, in_chans=in_chans, drop_path_rate=drop_path_rate)
    return PooledStudent(use_small_input_stem(model, "resnet10") if small_input else model)


@hookimpl
def kdkit_register_students(registry):
    registry.register_module("mixer", module=mixer)
    registry.register_module("resnet10", module=resnet10)
