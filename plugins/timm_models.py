"""Any timm model as a student (its pooled features, embedding ``pool``) or as a teacher (its logits)."""
from __future__ import annotations

import timm
import torch
from torch import nn

import kdkit
from kdkit.errors import KdkitError


class PooledStudent(nn.Module):
    """A timm model without its classifier; returns ``{"pool": features}``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.embedding_dims = {"pool": model.num_features}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pool": self.model(images)}

    def no_weight_decay(self) -> set[str]:
        inner = getattr(self.model, "no_weight_decay", None)
        return {f"model.{n}" for n in (inner() if inner else ())}


def _create(model: str, **kwargs) -> nn.Module:
    if model not in timm.list_models():
        from kdkit.errors import did_you_mean

        raise KdkitError(f"timm has no model named {model!r}{did_you_mean(model, timm.list_models())}")
    try:
        return timm.create_model(model, **kwargs)
    except Exception as exc:
        if kwargs.get("pretrained"):
            raise KdkitError(f"timm could not load pretrained weights for {model!r} (they are downloaded "
                             f"from the Hugging Face hub; offline, train the teacher or give a checkpoint): {exc}") from exc
        raise


def timm_student(*, model: str, in_chans: int = 3, drop_path_rate: float = 0.0,
                 model_kwargs: dict | None = None) -> nn.Module:
    """A timm model (``model``: any timm name) returning its pooled embedding as ``pool``."""
    return PooledStudent(_create(model, num_classes=0, in_chans=in_chans, drop_path_rate=drop_path_rate,
                                 **(model_kwargs or {})))


def timm_teacher(*, model: str, num_classes: int, in_chans: int = 3, pretrained: bool = False,
                 model_kwargs: dict | None = None) -> nn.Module:
    """A timm model (``model``: any timm name) returning logits; ``pretrained`` uses timm's loader."""
    return _create(model, num_classes=num_classes, in_chans=in_chans, pretrained=pretrained, **(model_kwargs or {}))


@kdkit.hookimpl
def kdkit_register_students(registry):
    registry.register_module("timm", module=timm_student)


@kdkit.hookimpl
def kdkit_register_teachers(registry):
    registry.register_module("timm", module=timm_teacher)
