"""The involution operator against a naive float64 reference, its gradients, and bf16 autocast."""
from __future__ import annotations

import pytest
import torch

from kdkit_plugins import involution_fused
from kdkit_plugins.involution import Involution2d, _Involution, _unfolded, fused_applies, involution

# Both implementations, each held to the float64 reference: the portable K*K-pass operator and the
# compiled one-pass CPU kernels (skipped where this machine cannot build them).
OPERATORS = {
    "portable": _Involution.apply,
    "fused": pytest.param(involution_fused.FusedInvolution.apply, marks=pytest.mark.skipif(
        involution_fused.load() is None, reason="the fused CPU involution could not be built here")),
}
operators = pytest.mark.parametrize("op", list(OPERATORS.values()), ids=list(OPERATORS))
pytestmark = pytest.mark.filterwarnings("error::UserWarning")  # e.g. torch resizing an ``out=`` tensor: a shape slip


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


@operators
@pytest.mark.parametrize("channels,group_channels", [(16, 16), (32, 16), (32, 8)])
@pytest.mark.parametrize("kernel_size", [3, 7])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(8, 8), (7, 10), (1, 3)])
def test_matches_reference(op, channels, group_channels, kernel_size, stride, size):
    x, kernel = random_case(2, channels, group_channels, size, kernel_size, stride)
    x.requires_grad_(), kernel.requires_grad_()
    out = op(x, kernel, kernel_size, stride)
    assert out.dtype == torch.float32 and out.is_contiguous()
    expected = reference(x, kernel, kernel_size, stride)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out, (x, kernel), grad)
    want = torch.autograd.grad(expected, (x, kernel), grad.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


@operators
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("group_channels", [2, 16])
def test_gradcheck(op, stride, group_channels):
    x, kernel = random_case(2, 2 * group_channels, group_channels, (5, 4), 3, stride)
    x, kernel = x.double().requires_grad_(), kernel.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, k: op(a, k, 3, stride), (x, kernel))


@operators
@pytest.mark.parametrize("wanted", [0, 1], ids=["x", "kernel"])
def test_gradient_of_one_input_only(op, wanted):
    inputs = list(random_case(1, 16, 16, (6, 6), 3, 1))
    inputs[wanted].requires_grad_()
    op(*inputs, 3, 1).sum().backward()
    expected = torch.autograd.grad(reference(*inputs, 3, 1).sum(), inputs[wanted])[0]
    torch.testing.assert_close(inputs[wanted].grad, expected.float(), rtol=1e-5, atol=1e-5)
    assert inputs[1 - wanted].grad is None


@operators
def test_bf16_inputs_accumulate_in_fp32_and_stay_bf16(op):
    x, kernel = random_case(2, 32, 16, (8, 8), 7, 1)
    out = op(x.bfloat16(), kernel.bfloat16(), 7, 1)
    assert out.dtype == torch.bfloat16
    expected = reference(x.bfloat16(), kernel.bfloat16(), 7, 1)  # the same rounded inputs, exact sums
    torch.testing.assert_close(out.double(), expected, rtol=1e-2, atol=1e-2)


@operators
def test_second_derivatives_are_refused(op):
    """The hand-written backward is not itself differentiable: asking for more fails rather than misleads."""
    x, kernel = random_case(1, 16, 16, (6, 6), 3, 1)
    x.requires_grad_()
    (grad,) = torch.autograd.grad(op(x, kernel, 3, 1).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="marked with @once_differentiable"):
        grad.sum().backward()


def test_wrong_kernel_shape_is_refused():
    x, kernel = random_case(2, 32, 16, (8, 8), 7, 1)
    assert involution(x, kernel, 7).shape == x.shape  # stride 1 unless given
    with pytest.raises(ValueError, match=r"stride=2 needs a kernel \(B, G, 49, 4, 4\) with G dividing 32"):
        involution(x, kernel, 7, 2)
    with pytest.raises(ValueError, match="G dividing 32"):
        involution(x, torch.randn(2, 3, 49, 8, 8), 7, 1)
    for wrong in (torch.randn(3, 2, 49, 8, 8), kernel[:1], kernel[:, :, :25]):  # batches of 3 and 1, 5x5 for K = 7
        with pytest.raises(ValueError, match="needs a kernel"):
            involution(x, wrong, 7, 1)
    with pytest.raises(ValueError, match="odd kernel_size"):
        involution(x, torch.randn(2, 2, 16, 8, 8), 4, 1)


@pytest.mark.parametrize("stride,size", [(1, 8), (2, 8), (2, 7)])
def test_module_generates_kernels_and_applies_them(stride, size):
    """With RedNet's defaults: K = 7, 16 channels per kernel, reduction 4, stride 1 unless given."""
    torch.manual_seed(0)
    layer = (Involution2d(32) if stride == 1 else Involution2d(32, stride=stride)).eval()
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


def test_the_operator_picks_the_fused_kernels_on_the_cpu_and_the_portable_ones_to_trace():
    if involution_fused.load() is None:
        pytest.skip("the fused CPU involution could not be built here")
    x, kernel = random_case(1, 16, 16, (6, 6), 7, 1)
    assert involution(x.requires_grad_(), kernel, 7, 1).grad_fn.name() == "FusedInvolutionBackward"
    x3, kernel3 = random_case(1, 16, 16, (6, 6), 7, 3)
    assert involution(x3.requires_grad_(), kernel3, 7, 3).grad_fn.name() == "_InvolutionBackward"  # stride 3
    wide = torch.randn(1, 2, 49, 6, 6)
    x128 = torch.randn(1, 256, 6, 6, requires_grad=True)
    assert involution(x128, wide, 7, 1).grad_fn.name() == "_InvolutionBackward"  # 128 channels per kernel
    traced = torch.jit.trace(lambda a, k: involution(a, k, 7, 1), (x.detach(), kernel))
    assert "_Involution" in str(traced.graph)
    torch.testing.assert_close(traced(x.detach(), kernel), involution(x.detach(), kernel, 7, 1))


@pytest.mark.parametrize("kernel_size, stride, size", [(7, 1, (6, 5)), (3, 2, (9, 8))])
def test_what_a_trace_records_computes_the_involution(kernel_size, stride, size):
    """While tracing (the FLOP count), the portable operator records one unfold instead of its K*K loop."""
    x, kernel = random_case(2, 32, 16, size, kernel_size, stride)
    expected = reference(x, kernel, kernel_size, stride).float()
    torch.testing.assert_close(_unfolded(x, kernel, kernel_size, stride), expected)


@pytest.mark.skipif(involution_fused.load() is None, reason="the fused CPU involution could not be built here")
def test_the_fused_kernels_take_strides_1_and_2_and_up_to_64_channels_per_kernel():
    kernel = torch.zeros(2, 1, 9, 4, 4)  # batch 2, one kernel per pixel for all channels
    assert fused_applies(torch.zeros(2, 64, 4, 4), kernel, 1) and fused_applies(torch.zeros(2, 64, 4, 4), kernel, 2)
    assert not fused_applies(torch.zeros(2, 65, 4, 4), kernel, 1)
    assert not fused_applies(torch.zeros(2, 64, 4, 4), kernel, 3)


def test_without_a_build_the_portable_operator_serves(monkeypatch):
    monkeypatch.setenv(involution_fused.DISABLE, "0")
    involution_fused.load.cache_clear()
    try:
        assert involution_fused.load() is None
        x = torch.randn(1, 16, 5, 5, requires_grad=True)
        assert involution(x, torch.randn(1, 1, 9, 5, 5), 3, 1).grad_fn.name() == "_InvolutionBackward"
    finally:
        involution_fused.load.cache_clear()  # the next use loads the build again


@pytest.mark.parametrize("kwargs", [dict(channels=24, group_channels=16), dict(channels=16, kernel_size=4),
                                    dict(channels=2, group_channels=1, reduction_ratio=4)],
                         ids=["partial-group", "even-kernel", "fewer-channels-than-the-reduction"])
def test_module_refuses_what_it_cannot_build(kwargs):
    with pytest.raises(ValueError, match="Involution2d needs"):
        Involution2d(**kwargs)
    Involution2d(**{**kwargs, "channels": 32, "kernel_size": 3, "group_channels": 16})  # the same, made valid
    Involution2d(channels=4, group_channels=4, reduction_ratio=4)  # the limit: a one-channel bottleneck


TRITON_CHECK = """
import os, sys, torch
from kdkit_plugins.involution import _Involution
from kdkit_plugins.involution_triton import TritonInvolution, kernels
if kernels() is None:
    sys.exit(3)
torch.manual_seed(0)
for b, c, gc, h, w, K, s in [(1, 4, 2, 6, 5, 7, 1), (2, 4, 4, 7, 10, 3, 2), (1, 2, 2, 1, 3, 7, 2)]:
    ho, wo = (h - 1) // s + 1, (w - 1) // s + 1
    x = torch.randn(b, c, h, w, requires_grad=True)
    k = torch.randn(b, c // gc, K * K, ho, wo, requires_grad=True)
    g = torch.randn(b, c, ho, wo)
    got, want = [[op(x, k, K, s), *torch.autograd.grad(op(x, k, K, s), (x, k), g)]
                 for op in (TritonInvolution.apply, _Involution.apply)]
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-4)
x = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
k = torch.randn(1, 1, 9, 3, 2, dtype=torch.float64, requires_grad=True)
# fast mode: the cases above already compare every gradient element with the portable operator
assert torch.autograd.gradcheck(lambda a, kk: TritonInvolution.apply(a, kk, 3, 2), (x, k), fast_mode=True)
print("ok")
"""


def test_the_triton_kernels_match_the_portable_operator_in_the_interpreter():
    """Triton's interpreter runs the CUDA kernels on CPU tensors: the same exactness checks, no GPU needed."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True)
    if result.returncode == 3:
        pytest.skip("Triton is not installed")
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("stride", [1, 2])
def test_on_cuda_the_operator_runs_the_triton_kernels(stride):
    x, kernel = random_case(2, 32, 16, (9, 9), 7, stride)
    x, kernel = x.cuda().requires_grad_(), kernel.cuda().requires_grad_()
    out = involution(x, kernel, 7, stride)
    assert out.grad_fn.name() == "TritonInvolutionBackward"
    torch.testing.assert_close(out.double().cpu(), reference(x.cpu(), kernel.cpu(), 7, stride), rtol=1e-5, atol=1e-4)
    x64, k64 = x.detach().double().requires_grad_(), kernel.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, k: involution(a, k, 7, stride), (x64, k64))
