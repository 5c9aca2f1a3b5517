"""Multiply-adds of one image through a model: mmengine's FLOP analysis plus the rules it lacks.

What a count includes: one multiply-add is one FLOP, for convolutions, linear layers and matrix
products, attention (``scaled_dot_product_attention``: Q K^T and the attention-weighted sum of V),
and operators that plugins give rules for through ``kdkit_flop_rules`` (the involution's
aggregation: K*K multiply-adds per output element). Normalization layers, pooling, interpolation,
activations, softmax and other elementwise operations are not counted (BatchNorm folds into the
convolution before it at inference; the rest costs memory traffic more than arithmetic). Any other
operator the trace meets is reported back as unsupported, never counted silently as zero.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from mmengine.analysis.jit_analysis import JitModelAnalysis
from mmengine.analysis.jit_handles import (addmm_flop_jit, bmm_flop_jit, conv_flop_jit, einsum_flop_jit, get_shape,
                                           linear_flop_jit, matmul_flop_jit)
from torch import nn

# Operators not counted (see the module docstring), beyond the shape operators mmengine ignores.
NOT_COUNTED = (
    "aten::batch_norm", "aten::group_norm", "aten::layer_norm", "aten::instance_norm",  # normalization
    "aten::adaptive_avg_pool2d", "aten::avg_pool2d", "aten::max_pool2d", "aten::mean", "aten::sum",  # pooling
    "aten::upsample_nearest2d", "aten::upsample_bilinear2d", "aten::upsample_bicubic2d", "aten::grid_sampler",
    "aten::add", "aten::add_", "aten::sub", "aten::rsub", "aten::mul", "aten::mul_", "aten::div", "aten::neg",
    "aten::pow", "aten::sqrt", "aten::rsqrt", "aten::exp", "aten::softmax", "aten::log_softmax", "aten::gelu",
    "aten::silu", "aten::sigmoid", "aten::tanh", "aten::hardtanh", "aten::hardswish", "aten::hardsigmoid",
    "aten::pad", "aten::expand_as", "aten::linspace", "aten::unflatten", "aten::silu_", "aten::gelu_",
    "aten::sigmoid_", "aten::tanh_", "aten::hardswish_", "aten::hardsigmoid_", "aten::div_", "aten::sub_",
)


traced_shape = get_shape  # the shape of a traced value, for plugins' rules


def _attention(inputs: list, outputs: list) -> int:
    """``scaled_dot_product_attention(q, k, v)``: B*H*N*M*d for Q K^T plus B*H*N*M*d_v for the sum of V."""
    q, k, v = (traced_shape(value) for value in inputs[:3])
    *batch, n, d = q
    m, d_v = k[-2], v[-1]
    return math.prod(batch) * n * m * (d + d_v)


COUNTED = {
    "aten::_convolution": conv_flop_jit, "aten::linear": linear_flop_jit, "aten::addmm": addmm_flop_jit,
    "aten::matmul": matmul_flop_jit, "aten::mm": matmul_flop_jit, "aten::bmm": bmm_flop_jit,
    "aten::einsum": einsum_flop_jit, "aten::scaled_dot_product_attention": _attention,
}


@dataclass
class FlopCount:
    """The total, and the operators the trace met that no rule counts (name -> occurrences)."""

    total: int | None
    unsupported: dict[str, int] = field(default_factory=dict)


def plugin_rules(hook) -> dict[str, Callable]:
    """Every plugin's ``kdkit_flop_rules``, merged."""
    return {name: rule for rules in hook.kdkit_flop_rules() for name, rule in rules.items()}


def count_flops(model: nn.Module, image: torch.Tensor, rules: dict[str, Callable] | None = None) -> FlopCount:
    """Multiply-adds of ``model(image)`` (a batch of one); ``rules`` add operators by their traced name.

    A model the JIT tracer cannot follow gets ``total = None`` (it still trains; its count is unknown).
    """
    was_training = model.training
    analyzer = JitModelAnalysis(model.eval(), inputs=(image,))
    analyzer.set_op_handle(**{name: None for name in NOT_COUNTED}, **COUNTED, **(rules or {}))
    analyzer.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    try:
        return FlopCount(int(analyzer.total()), dict(analyzer.unsupported_ops()))
    except Exception as exc:  # noqa: BLE001 - whatever the tracer trips on, the run goes on without a count
        return FlopCount(None, {f"trace failed: {type(exc).__name__}: {exc}": 1})
    finally:
        model.train(was_training)
