"""The involution operator against a naive float64 reference, its gradients, and bf16 autocast."""
from __future__ import annotations

import pytest
import torch

from kdkit_plugins.involution import Involution2d, involution


def reference(x: torch.Tensor, kernel: torch.Tensor, kernel_size: int, stride: int) -> torch.Tensor:
    """out[b, c, y, x] = sum_ij kernel[b, c // Cg, i*K + j, y, x] * x_pad[b, c, y*s + i, x*s + j], in float64."""
    b, c, h, w = x.shape
    groups, h_out, w_out = kernel.shape[1], kernel.shape[3], kernel.shape[4]
    p = (kernel_size - 1) // 2
    x_pad = torch.zeros(b, c, h + 2 * p, w + 2 * p, dtype=torch.float64)
    x_pad[:, :, p:p + h, p:p + w] = x.double()
    per_channel = kernel.double().repeat_interleave(c // groups, dim=1)  # (B, C, K*K, H_out, W_out)
    rows, cols = torch.arange(h_out) * stride, torch.arange(w_out) * stride
    out = torch.zeros(b, c, h_out, w_out, dtype=torch.float64)
    for i in range(kernel_size):
        for j in range(kernel_size):
            out += per_channel[:, :, i * kernel_size + j] * x_pad[:, :, rows + i][:, :, :, cols + j]
    return out


def random_case(batch, channels, group_channels, size, kernel_size, stride, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = size
    h_out, w_out = (h - 1) // stride + 1, (w - 1) // stride + 1
    x = torch.randn(batch, channels, h, w, generator=g)
    kernel = torch.randn(batch, channels // group_channels, kernel_size**2, h_out, w_out, generator=g)
    return x, kernel


@pytest.mark.parametrize("channels,group_channels", [(16, 16), (32, 16), (32, 8)])
@pytest.mark.parametrize("kernel_size", [3, 7])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(8, 8), (7, 10), (1, 3)])
def test_matches_reference(channels, group_channels, kernel_size, stride, size):
    x, kernel = random_case(2, channels, group_channels, size, kernel_size, stride)
    out = involution(x, kernel, kernel_size, stride)
    assert out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out.double(), reference(x, kernel, kernel_size, stride), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_gradcheck(stride):
    x, kernel = random_case(2, 4, 2, (5, 4), 3, stride)
    x, kernel = x.double().requires_grad_(), kernel.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, k: involution(a, k, 3, stride), (x, kernel))


def test_gradient_of_one_input_only():
    x, kernel = random_case(1, 16, 16, (6, 6), 3, 1)
    x.requires_grad_()
    involution(x, kernel, 3, 1).sum().backward()
    expected = torch.autograd.grad(reference(x, kernel, 3, 1).sum(), x)[0]
    torch.testing.assert_close(x.grad, expected.float(), rtol=1e-5, atol=1e-5)


def test_bf16_inputs_accumulate_in_fp32_and_stay_bf16():
    x, kernel = random_case(2, 32, 16, (8, 8), 7, 1)
    out = involution(x.bfloat16(), kernel.bfloat16(), 7, 1)
    assert out.dtype == torch.bfloat16
    expected = reference(x.bfloat16(), kernel.bfloat16(), 7, 1)  # the same rounded inputs, exact sums
    torch.testing.assert_close(out.double(), expected, rtol=1e-2, atol=1e-2)


def test_wrong_kernel_shape_is_refused():
    x, kernel = random_case(2, 32, 16, (8, 8), 7, 1)
    with pytest.raises(ValueError, match="needs a kernel"):
        involution(x, kernel, 7, 2)
    with pytest.raises(ValueError, match="G dividing 32"):
        involution(x, torch.randn(2, 3, 49, 8, 8), 7, 1)


@pytest.mark.parametrize("stride,size", [(1, 8), (2, 8), (2, 7)])
def test_module_generates_kernels_and_applies_them(stride, size):
    torch.manual_seed(0)
    layer = Involution2d(32, kernel_size=7, stride=stride).eval()
    x = torch.randn(2, 32, size, size)
    out_size = (size - 1) // stride + 1
    kernel = layer.generate_kernel(x)
    assert kernel.shape == (2, 2, 49, out_size, out_size)
    assert layer.conv1.conv.weight.shape == (8, 32, 1, 1) and layer.conv1.conv.bias is None
    assert layer.conv2.conv.weight.shape == (98, 8, 1, 1) and layer.conv2.conv.bias is not None
    torch.testing.assert_close(layer(x).double(), reference(x, kernel, 7, stride), rtol=1e-5, atol=1e-5)


def test_module_runs_under_bf16_autocast():
    torch.manual_seed(0)
    layer = Involution2d(32, kernel_size=7).eval()
    x = torch.randn(2, 32, 8, 8)
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05 * expected.abs().max().item())


def test_module_refuses_partial_groups():
    with pytest.raises(ValueError, match="divisible by group_channels"):
        Involution2d(24, group_channels=16)
