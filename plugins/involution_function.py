"""An autograd Function over compiled involution kernels: what the C++ and the Triton paths share.

Both provide ``forward(x, kernel, K, stride)``, ``grad_input(x, kernel, grad, K, stride)`` and
``grad_kernel(x, kernel, grad, K, stride)`` on contiguous tensors of one dtype; this wrapper computes
in fp32 (fp64 for fp64 inputs), saves only ``x`` and ``kernel``, and returns the inputs' dtypes.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable


def involution_function(name: str, kernels: Callable) -> type[torch.autograd.Function]:
    """An autograd Function named ``name`` (its name in traces and ``grad_fn``) over ``kernels()``."""

    def forward(ctx, x, kernel, kernel_size, stride):
        dtype = torch.promote_types(torch.promote_types(x.dtype, kernel.dtype), torch.float32)
        x, kernel, dtypes = x.to(dtype).contiguous(), kernel.to(dtype).contiguous(), (x.dtype, kernel.dtype)
        ctx.save_for_backward(x, kernel)
        ctx.kernel_size, ctx.stride, ctx.dtypes = kernel_size, stride, dtypes
        return kernels().forward(x, kernel, kernel_size, stride).to(torch.promote_types(*dtypes))

    @once_differentiable
    def backward(ctx, grad_out):
        x, kernel = ctx.saved_tensors
        args = (x, kernel, grad_out.to(x.dtype).contiguous(), ctx.kernel_size, ctx.stride)
        grad_x = kernels().grad_input(*args).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        grad_kernel = kernels().grad_kernel(*args).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return grad_x, grad_kernel, None, None

    # made with type() so that autograd names its backward node after ``name`` too
    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(backward),
                                                  "__doc__": f"``involution`` through {kernels.__module__}'s kernels."})
