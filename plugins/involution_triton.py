"""The involution operator as Triton kernels, for CUDA: one pass over the output, forward and backward.

Each program computes a block of one (image, channel) plane's outputs, summing the K*K taps in
registers; the input gradient is gathered the same way (each input pixel sums the taps that read
it), and the kernel gradient sums over a group's channels per tap. Computes in fp32 (fp64 for
fp64 inputs). Triton's interpreter (``TRITON_INTERPRET=1``) runs the same kernels on CPU tensors,
which is how ``tests/test_involution.py`` checks them on machines without a GPU.
"""
from __future__ import annotations

import functools

import torch
from torch.autograd.function import once_differentiable

BLOCK = 128  # output (or input) pixels per program


@functools.cache
def kernels():
    """The compiled kernels, or None where Triton is not installed."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def forward(x, w, out, C, H, W, G, Ho, Wo, K: tl.constexpr, S: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        bc, block = tl.program_id(0), tl.program_id(1)
        b, c = bc // C, bc % C
        g = c // (C // G)
        pixels = block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        inside = pixels < Ho * Wo
        y, x_out = pixels // Wo, pixels % Wo
        acc = tl.zeros([BLOCK_SIZE], dtype=out.dtype.element_ty)
        for i in tl.static_range(K):
            for j in tl.static_range(K):
                row, col = y * S + i - (K - 1) // 2, x_out * S + j - (K - 1) // 2
                valid = inside & (row >= 0) & (row < H) & (col >= 0) & (col < W)
                value = tl.load(x + (bc * H + row) * W + col, mask=valid, other=0.0)
                weight = tl.load(w + ((b * G + g) * K * K + i * K + j) * Ho * Wo + pixels, mask=inside, other=0.0)
                acc += weight * value
        tl.store(out + bc * Ho * Wo + pixels, acc, mask=inside)

    @triton.jit
    def grad_input(w, grad, gx, C, H, W, G, Ho, Wo, K: tl.constexpr, S: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        bc, block = tl.program_id(0), tl.program_id(1)
        b, c = bc // C, bc % C
        g = c // (C // G)
        pixels = block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        inside = pixels < H * W
        row, col = pixels // W, pixels % W
        acc = tl.zeros([BLOCK_SIZE], dtype=gx.dtype.element_ty)
        for i in tl.static_range(K):
            for j in tl.static_range(K):
                dy, dx = row - i + (K - 1) // 2, col - j + (K - 1) // 2  # = y * S and x * S of the reader
                y, x_out = dy // S, dx // S
                valid = inside & (dy >= 0) & (dx >= 0) & (dy % S == 0) & (dx % S == 0) & (y < Ho) & (x_out < Wo)
                offset = y * Wo + x_out
                weight = tl.load(w + ((b * G + g) * K * K + i * K + j) * Ho * Wo + offset, mask=valid, other=0.0)
                value = tl.load(grad + bc * Ho * Wo + offset, mask=valid, other=0.0)
                acc += weight * value
        tl.store(gx + bc * H * W + pixels, acc, mask=inside)

    @triton.jit
    def grad_kernel(x, grad, gw, C, H, W, G, Ho, Wo, K: tl.constexpr, S: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        bgk, block = tl.program_id(0), tl.program_id(1)
        bg, k = bgk // (K * K), bgk % (K * K)
        b, g = bg // G, bg % G
        i, j = k // K, k % K
        pixels = block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        inside = pixels < Ho * Wo
        y, x_out = pixels // Wo, pixels % Wo
        row, col = y * S + i - (K - 1) // 2, x_out * S + j - (K - 1) // 2
        valid = inside & (row >= 0) & (row < H) & (col >= 0) & (col < W)
        group = C // G
        acc = tl.zeros([BLOCK_SIZE], dtype=gw.dtype.element_ty)
        for channel in range(group):
            bc = b * C + g * group + channel
            value = tl.load(x + (bc * H + row) * W + col, mask=valid, other=0.0)
            acc += value * tl.load(grad + bc * Ho * Wo + pixels, mask=inside, other=0.0)
        tl.store(gw + bgk * Ho * Wo + pixels, acc, mask=inside)

    return triton, forward, grad_input, grad_kernel


def _launch(kernel, grid, *tensors, shape, kernel_size, stride):
    _, C, H, W, G, Ho, Wo = shape
    kernel[grid](*tensors, C, H, W, G, Ho, Wo, K=kernel_size, S=stride, BLOCK_SIZE=BLOCK)


class TritonInvolution(torch.autograd.Function):
    """``involution`` through the Triton kernels (any device Triton targets)."""

    @staticmethod
    def forward(ctx, x, kernel, kernel_size, stride):
        dtype = torch.promote_types(torch.promote_types(x.dtype, kernel.dtype), torch.float32)
        x32, w32 = x.to(dtype).contiguous(), kernel.to(dtype).contiguous()
        ctx.save_for_backward(x32, w32)
        ctx.kernel_size, ctx.stride, ctx.dtypes = kernel_size, stride, (x.dtype, kernel.dtype)
        (b, c, h, w), (g, ho, wo) = x.shape, (kernel.shape[1], *kernel.shape[3:])
        ctx.shape = (b, c, h, w, g, ho, wo)
        out = torch.empty(b, c, ho, wo, dtype=dtype, device=x.device)
        triton, forward, _, _ = kernels()
        _launch(forward, (b * c, triton.cdiv(ho * wo, BLOCK)), x32, w32, out, shape=ctx.shape,
                kernel_size=kernel_size, stride=stride)
        return out.to(torch.promote_types(x.dtype, kernel.dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, w = ctx.saved_tensors
        grad = grad_out.to(x.dtype).contiguous()
        b, c, h, width, g, ho, wo = ctx.shape
        triton, _, grad_input, grad_kernel = kernels()
        options = dict(shape=ctx.shape, kernel_size=ctx.kernel_size, stride=ctx.stride)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty_like(x)
            _launch(grad_input, (b * c, triton.cdiv(h * width, BLOCK)), w, grad, grad_x, **options)
            grad_x = grad_x.to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            grad_w = torch.empty_like(w)
            _launch(grad_kernel, (b * g * ctx.kernel_size**2, triton.cdiv(ho * wo, BLOCK)), x, grad, grad_w,
                    **options)
            grad_w = grad_w.to(ctx.dtypes[1])
        return grad_x, grad_w, None, None
