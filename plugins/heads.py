"""Token heads: map one student embedding to class logits."""
from __future__ import annotations

from timm.layers import trunc_normal_
from torch import nn

from kdkit.api import hookimpl
from kdkit_plugins.sizes import Classes, Width



def linear(*, in_features: Width, num_classes: Classes, bias: bool = True) -> nn.Module:
    """A linear classifier, initialised as DeiT's heads (truncated normal, std 0.02; zero bias)."""
    head = nn.Linear(in_features, num_classes, bias=bias)
    trunc_normal_(head.weight, std=0.02)
    if bias:
        nn.init.zeros_(head.bias)
    return head


@hookimpl
def kdkit_register_heads(registry):
    registry.register_module("linear", module=linear)
