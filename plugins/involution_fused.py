"""The involution operator compiled for the CPU: one pass over the output instead of K*K.

``involution_cpu.cpp`` holds three loop nests (forward, gradient for the kernels, gradient for the
input) that keep one group's channels in cache while they run over the kernel offsets, vectorized
along image rows. It is compiled on first use with the machine's C++ compiler through
``torch.utils.cpp_extension`` (about a minute, once: torch caches the build under
``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``, keyed by the source and this CPU).
Where it cannot be built (no compiler, no ninja) ``load()`` returns None, warns once, and
``kdkit_plugins.involution`` keeps its portable operator.
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import time
import warnings
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

SOURCE = Path(__file__).with_name("involution_cpu.cpp")
DISABLE = "KDKIT_FUSED_INVOLUTION"  # set to 0 to use the portable operator


class InvolutionWarning(UserWarning):
    """The fused CPU involution could not be built; the portable operator (slower) is used."""


compile_seconds: float | None = None  # how long the build took in this process (None: cached or not built)


@functools.cache
def load():
    """The compiled extension, or None where it cannot be built (a warning says why) or is disabled."""
    global compile_seconds
    if os.environ.get(DISABLE, "1") == "0":
        return None
    from torch.utils import cpp_extension

    source = SOURCE.read_bytes()
    machine = f"{platform.machine()} {platform.processor()} {_cpu_flags()}"
    name = "kdkit_involution_" + hashlib.sha256(source + machine.encode()).hexdigest()[:12]
    start = time.perf_counter()
    try:
        module = cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=["-O3", "-march=native"],
                                    verbose=False)
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the portable operator
        warnings.warn(f"the fused CPU involution could not be built ({type(exc).__name__}: {exc}); using the "
                      f"portable operator, several times slower", InvolutionWarning, stacklevel=3)
        return None
    compile_seconds = time.perf_counter() - start
    return module


def _cpu_flags() -> str:
    """The CPU's feature flags: a build for one CPU's instruction set is never loaded on another."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


class FusedInvolution(torch.autograd.Function):
    """``involution`` through the compiled CPU kernels; computes in fp32 (fp64 for fp64 inputs)."""

    @staticmethod
    def forward(ctx, x, kernel, kernel_size, stride):
        dtype = torch.promote_types(torch.promote_types(x.dtype, kernel.dtype), torch.float32)
        x32, kernel32 = x.to(dtype).contiguous(), kernel.to(dtype).contiguous()
        ctx.save_for_backward(x32, kernel32)
        ctx.kernel_size, ctx.stride, ctx.dtypes = kernel_size, stride, (x.dtype, kernel.dtype)
        out = load().forward(x32, kernel32, kernel_size, stride)
        return out.to(torch.promote_types(x.dtype, kernel.dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, kernel = ctx.saved_tensors
        grad = grad_out.to(x.dtype).contiguous()
        ops, args = load(), (x, kernel, grad, ctx.kernel_size, ctx.stride)
        grad_x = ops.grad_input(*args).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        grad_kernel = ops.grad_kernel(*args).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return grad_x, grad_kernel, None, None
