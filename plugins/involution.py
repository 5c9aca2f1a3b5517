"""Involution (Li et al., CVPR 2021): a spatial kernel generated at every pixel, shared across channel groups.

Where a convolution shares one kernel over all positions and mixes channels, an involution computes
a K x K kernel per pixel from the input itself (one per group of channels) and only aggregates over
space. ``involution`` is the operator; ``Involution2d`` generates the kernels and applies it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from kdkit.api import hookimpl, traced_shape
from kdkit_plugins.involution_fused import FusedInvolution
from kdkit_plugins.involution_fused import load as fused_load
from kdkit_plugins.involution_triton import TritonInvolution
from kdkit_plugins.involution_triton import kernels as triton_kernels


def involution(x: torch.Tensor, kernel: torch.Tensor, kernel_size: int, stride: int = 1) -> torch.Tensor:
    """Aggregate ``x`` (B, C, H, W) with per-pixel kernels ``kernel`` (B, G, K*K, H_out, W_out).

    With ``p = (K - 1) // 2`` zero padding, ``Cg = C // G`` channels per group (contiguous blocks)
    and kernel offsets numbered row-major (``k = i * K + j``, the order of ``F.unfold``)::

        out[b, c, y, x] = sum_{i, j} kernel[b, c // Cg, i * K + j, y, x] * x_pad[b, c, y * s + i, x * s + j]

    Computed in fp32 for bf16/fp16 inputs (accumulating K*K terms in bf16 would lose precision; the
    result is returned in the inputs' dtype), so it works under autocast. Three implementations, chosen
    here: on the CPU the compiled one-pass kernels of ``involution_fused`` (strides 1 and 2, where
    they build), on CUDA the Triton kernels of ``involution_triton`` (where Triton is installed),
    elsewhere the portable ``_Involution``: plain torch ops, K*K passes over the output with no
    K*K-fold ``F.unfold`` buffer. All save only ``x`` and ``kernel`` for the backward.
    """
    b, c, h, w = x.shape
    if kernel_size % 2 == 0:
        raise ValueError(f"involution needs an odd kernel_size (its padding keeps the output's size), got {kernel_size}")
    p = (kernel_size - 1) // 2
    h_out, w_out = (h + 2 * p - kernel_size) // stride + 1, (w + 2 * p - kernel_size) // stride + 1
    if kernel.dim() != 5 or kernel.shape[0] != b or kernel.shape[2:] != (kernel_size**2, h_out, w_out) \
            or c % kernel.shape[1]:
        raise ValueError(f"involution of x {tuple(x.shape)} with K={kernel_size}, stride={stride} needs a kernel "
                         f"(B, G, {kernel_size**2}, {h_out}, {w_out}) with G dividing {c}; got {tuple(kernel.shape)}")
    if fused_applies(x, kernel, stride):
        return FusedInvolution.apply(x, kernel, kernel_size, stride)
    if x.device.type == "cuda" and not torch.jit.is_tracing() and triton_kernels() is not None:
        return TritonInvolution.apply(x, kernel, kernel_size, stride)
    return _Involution.apply(x, kernel, kernel_size, stride)


def fused_applies(x: torch.Tensor, kernel: torch.Tensor, stride: int) -> bool:
    """The compiled CPU operator runs CPU tensors at strides 1 and 2 with at most 64 channels per kernel
    (RedNet's are 16), when it could be built. A JIT trace (the FLOP count) sees the portable one."""
    return x.device.type == "cpu" and stride in (1, 2) and x.shape[1] // kernel.shape[1] <= 64 \
        and not torch.jit.is_tracing() and fused_load() is not None


class _Involution(torch.autograd.Function):
    """``involution`` as one loop over the K*K offsets, forward and backward.

    Written by hand because autograd through K*K strided slices would allocate a full-size zero
    gradient per offset. Everything runs channels-last, (B, H, W, G, Cg): a window of the padded
    input is then a run of whole rows, and the per-group kernel broadcasts over the last axis.
    """

    @staticmethod
    def forward(ctx, x, kernel, kernel_size, stride):
        ctx.save_for_backward(x, kernel)
        ctx.kernel_size, ctx.stride = kernel_size, stride
        if torch.jit.is_tracing():
            return _unfolded(x, kernel, kernel_size, stride)
        x_pad, weights = _channels_last(x, kernel, kernel_size)
        b, h_out, w_out = x.shape[0], *kernel.shape[3:]
        out = x_pad.new_zeros(b, h_out, w_out, *x_pad.shape[3:])
        for k, window in _windows(x_pad, kernel_size, stride, (h_out, w_out)):
            out.addcmul_(window, weights[k])
        out = out.view(b, h_out, w_out, -1).permute(0, 3, 1, 2)
        return out.to(torch.promote_types(x.dtype, kernel.dtype), memory_format=torch.contiguous_format)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, kernel = ctx.saved_tensors
        kernel_size, stride = ctx.kernel_size, ctx.stride
        x_pad, weights = _channels_last(x, kernel, kernel_size)
        b, h_out, w_out = grad_out.shape[0], *grad_out.shape[2:]
        grad = grad_out.to(x_pad.dtype).permute(0, 2, 3, 1).reshape(b, h_out, w_out, *x_pad.shape[3:])
        grad_x = grad_kernel = None
        if ctx.needs_input_grad[0]:
            grad_pad = torch.zeros_like(x_pad)
            for k, window in _windows(grad_pad, kernel_size, stride, (h_out, w_out)):
                window.addcmul_(grad, weights[k])
            p, (h, w) = (kernel_size - 1) // 2, x.shape[2:]
            grad_x = grad_pad[:, p:p + h, p:p + w].flatten(3).permute(0, 3, 1, 2)
            grad_x = grad_x.to(x.dtype, memory_format=torch.contiguous_format)
        if ctx.needs_input_grad[1]:
            grad_weights = torch.empty_like(weights)
            for k, window in _windows(x_pad, kernel_size, stride, (h_out, w_out)):
                torch.sum(window * grad, dim=-1, keepdim=True, out=grad_weights[k])
            grad_kernel = grad_weights.squeeze(-1).permute(1, 4, 0, 2, 3)
            grad_kernel = grad_kernel.to(kernel.dtype, memory_format=torch.contiguous_format)
        return grad_x, grad_kernel, None, None


def _unfolded(x, kernel, kernel_size, stride):
    """``involution`` through one K*K-fold ``F.unfold`` buffer: a few operators for a JIT trace (the FLOP
    count) to record, where the loop over offsets records hundreds per layer (seconds per network)."""
    b, c, _, _ = x.shape
    groups, taps, h_out, w_out = kernel.shape[1:]
    dtype = _compute_dtype(x, kernel)
    windows = F.unfold(x.to(dtype), kernel_size, padding=(kernel_size - 1) // 2, stride=stride)
    windows = windows.view(b, groups, c // groups, taps, h_out, w_out)
    out = (windows * kernel.to(dtype).unsqueeze(2)).sum(dim=3).view(b, c, h_out, w_out)
    return out.to(torch.promote_types(x.dtype, kernel.dtype))


def _compute_dtype(x, kernel) -> torch.dtype:
    """fp32 at least: bf16/fp16 inputs are aggregated in fp32."""
    return torch.promote_types(torch.promote_types(x.dtype, kernel.dtype), torch.float32)


def _channels_last(x, kernel, kernel_size):
    """x zero-padded as (B, H_pad, W_pad, G, Cg) and kernel as (K*K, B, H_out, W_out, G, 1), in the compute dtype."""
    b, c, _, _ = x.shape
    groups = kernel.shape[1]
    dtype = _compute_dtype(x, kernel)
    p = (kernel_size - 1) // 2
    x_pad = F.pad(x.to(dtype), (p, p, p, p)).permute(0, 2, 3, 1).contiguous()
    x_pad = x_pad.view(*x_pad.shape[:3], groups, c // groups)
    weights = kernel.to(dtype).permute(2, 0, 3, 4, 1).unsqueeze(-1).contiguous()
    return x_pad, weights


def _windows(x_pad, kernel_size, stride, out_size):
    """(k, view of ``x_pad`` seen through kernel offset k) for every offset, k = i * K + j."""
    h_out, w_out = out_size
    for i in range(kernel_size):
        for j in range(kernel_size):
            yield i * kernel_size + j, x_pad[:, i:i + stride * (h_out - 1) + 1:stride,
                                             j:j + stride * (w_out - 1) + 1:stride]


class Involution2d(nn.Module):
    """An involution layer: kernels from a 1x1 bottleneck of the (pooled) input, then ``involution``.

    Kernel generation is ``conv1`` (1x1, channels -> channels // reduction_ratio, BN, ReLU) and
    ``conv2`` (1x1 with bias, -> K*K*G with G = channels // group_channels); the names and the
    ``.conv``/``.bn`` nesting follow mmcls's RedNet, so its checkpoints load with a prefix map.
    For stride > 1 the kernels come from the input average-pooled by ``stride`` (ceil mode, so odd
    sizes work and match the strided aggregation's output size).
    """

    def __init__(self, channels: int, kernel_size: int = 7, stride: int = 1, group_channels: int = 16,
                 reduction_ratio: int = 4):
        super().__init__()
        if channels % group_channels or kernel_size % 2 == 0 or channels < reduction_ratio:
            raise ValueError(f"Involution2d needs channels ({channels}) divisible by group_channels "
                             f"({group_channels}), at least reduction_ratio ({reduction_ratio}), and an odd "
                             f"kernel_size ({kernel_size})")
        self.kernel_size, self.stride = kernel_size, stride
        self.groups = channels // group_channels
        reduced = channels // reduction_ratio
        self.pool = nn.AvgPool2d(stride, stride, ceil_mode=True) if stride > 1 else nn.Identity()
        self.conv1 = nn.Sequential()
        self.conv1.add_module("conv", nn.Conv2d(channels, reduced, 1, bias=False))
        self.conv1.add_module("bn", nn.BatchNorm2d(reduced))
        self.conv1.add_module("act", nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential()
        self.conv2.add_module("conv", nn.Conv2d(reduced, kernel_size**2 * self.groups, 1))

    def generate_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """The per-pixel kernels for ``x``: (B, G, K*K, H_out, W_out)."""
        kernel = self.conv2(self.conv1(self.pool(x)))
        return kernel.view(kernel.shape[0], self.groups, self.kernel_size**2, *kernel.shape[2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return involution(x, self.generate_kernel(x), self.kernel_size, self.stride)


def involution_flops(inputs: list, outputs: list) -> int:
    """The aggregation's multiply-adds: K*K per output element, B * C * K*K * H_out * W_out."""
    batch, channels, _, _ = traced_shape(inputs[0])
    _, _, taps, h_out, w_out = traced_shape(inputs[1])
    return batch * channels * taps * h_out * w_out


@hookimpl
def kdkit_flop_rules():
    return {f"prim::PythonOp.{op.__name__}": involution_flops
            for op in (_Involution, FusedInvolution, TritonInvolution)}
