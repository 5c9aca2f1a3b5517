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

from kdkit_plugins.involution_function import involution_function

BLOCK = 128  # output (or input) pixels per program


@functools.cache
def kernels() -> TritonKernels | None:
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
    def grad_kernel(x, grad, gw, C, H, W, G, Ho, Wo, K: tl.constexpr, S: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    GROUP: tl.constexpr):  # channels per group: a constant loop bound (Triton 3.6's interpreter needs it)
        bgk, block = tl.program_id(0), tl.program_id(1)
        bg, k = bgk // (K * K), bgk % (K * K)
        b, g = bg // G, bg % G
        i, j = k // K, k % K
        pixels = block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        inside = pixels < Ho * Wo
        y, x_out = pixels // Wo, pixels % Wo
        row, col = y * S + i - (K - 1) // 2, x_out * S + j - (K - 1) // 2
        valid = inside & (row >= 0) & (row < H) & (col >= 0) & (col < W)
        acc = tl.zeros([BLOCK_SIZE], dtype=gw.dtype.element_ty)
        for channel in tl.static_range(GROUP):
            bc = b * C + g * GROUP + channel
            value = tl.load(x + (bc * H + row) * W + col, mask=valid, other=0.0)
            acc += value * tl.load(grad + bc * Ho * Wo + pixels, mask=inside, other=0.0)
        tl.store(gw + bgk * Ho * Wo + pixels, acc, mask=inside)

    return TritonKernels(triton, forward, grad_input, grad_kernel)


class TritonKernels:
    """The Triton kernels behind the interface ``involution_function`` expects."""

    def __init__(self, triton, forward, grad_input, grad_kernel):
        self.triton = triton
        self.jit = {"forward": forward, "grad_input": grad_input, "grad_kernel": grad_kernel}

    def launch(self, name: str, programs: int, pixels: int, out, *inputs, x, w, kernel_size, stride, **constants):
        """Run kernel ``name`` on ``programs`` x ceil(pixels / BLOCK) programs, writing ``out``."""
        _, c, h, width = x.shape
        g, ho, wo = w.shape[1], w.shape[3], w.shape[4]
        self.jit[name][(programs, self.triton.cdiv(pixels, BLOCK))](*inputs, out, c, h, width, g, ho, wo,
                                                                     K=kernel_size, S=stride, BLOCK_SIZE=BLOCK, **constants)
        return out

    def forward(self, x, w, kernel_size, stride):
        b, c, (ho, wo) = *x.shape[:2], w.shape[3:]
        return self.launch("forward", b * c, ho * wo, x.new_empty(b, c, ho, wo), x, w, x=x, w=w,
                           kernel_size=kernel_size, stride=stride)

    def grad_input(self, x, w, grad, kernel_size, stride):
        b, c, h, width = x.shape
        return self.launch("grad_input", b * c, h * width, torch.empty_like(x), w, grad, x=x, w=w,
                           kernel_size=kernel_size, stride=stride)

    def grad_kernel(self, x, w, grad, kernel_size, stride):
        b, g = w.shape[:2]
        return self.launch("grad_kernel", b * g * kernel_size**2, w.shape[3] * w.shape[4], torch.empty_like(w), x,
                           grad, x=x, w=w, kernel_size=kernel_size, stride=stride, GROUP=x.shape[1] // g)


TritonInvolution = involution_function("TritonInvolution", kernels)  # ``involution`` through the Triton kernels
