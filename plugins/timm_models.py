"""Any timm model as a student (its pooled features, embedding ``pool``) or as a teacher (its logits)."""
from __future__ import annotations

import timm
from timm.models import RegNet, ResNet
from torch import nn

from kdkit.api import KdkitError, PooledStudent, did_you_mean, hookimpl
from kdkit_plugins.sizes import Channels, Classes, DropRate


def _stride_one_3x3(conv: nn.Conv2d) -> nn.Conv2d:
    return nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=conv.bias is not None)


def use_small_input_stem(model: nn.Module, name: str) -> nn.Module:
    """The usual 32 px convention: a 3x3 stride-1 first conv and no max-pool (timm's ImageNet stems
    reduce a 32 px image to 8x8 before the first stage)."""
    if isinstance(model, ResNet):
        if isinstance(model.conv1, nn.Conv2d):
            model.conv1 = _stride_one_3x3(model.conv1)
        else:  # deep stems (resnet10t, resnet50d, ...): three 3x3 convs, the first one strided
            model.conv1[0] = _stride_one_3x3(model.conv1[0])
        model.maxpool = nn.Identity()
    elif isinstance(model, RegNet):
        model.stem.conv = _stride_one_3x3(model.stem.conv)
    else:
        raise KdkitError(f"small_input is for timm's ResNet and RegNet families; {name!r} is a "
                         f"{type(model).__name__}")
    return model


def _create(model: str, small_input: bool = False, **kwargs) -> nn.Module:
    if model not in timm.list_models():
        raise KdkitError(f"timm has no model named {model!r}{did_you_mean(model, timm.list_models())}")
    try:
        created = timm.create_model(model, **kwargs)
    except Exception as exc:
        if kwargs.get("pretrained"):
            raise KdkitError(f"timm could not load pretrained weights for {model!r} (they are downloaded "
                             f"from the Hugging Face hub; offline, train the teacher or give a checkpoint, and set "
                             f"HF_HUB_OFFLINE=1 to fail at once rather than after the hub's retries): {exc}") from exc
        raise
    return use_small_input_stem(created, model) if small_input else created


def timm_student(*, model: str, in_chans: Channels = 3, small_input: bool = False, drop_path_rate: DropRate = 0.0,
                 model_kwargs: dict | None = None) -> nn.Module:
    """A timm model (``model``: any timm name) returning its pooled embedding as ``pool``."""
    return PooledStudent(_create(model, small_input, num_classes=0, in_chans=in_chans,
                                 drop_path_rate=drop_path_rate, **(model_kwargs or {})))


def timm_teacher(*, model: str, num_classes: Classes, in_chans: Channels = 3, small_input: bool = False,
                 pretrained: bool = False, model_kwargs: dict | None = None) -> nn.Module:
    """A timm model (``model``: any timm name) returning logits; ``pretrained`` uses timm's loader."""
    return _create(model, small_input, num_classes=num_classes, in_chans=in_chans, pretrained=pretrained,
                   **(model_kwargs or {}))


@hookimpl
def kdkit_register_students(registry):
    registry.register_module("timm", module=timm_student)


@hookimpl
def kdkit_register_teachers(registry):
    registry.register_module("timm", module=timm_teacher)
