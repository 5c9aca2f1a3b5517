"""The involution operator compiled for the CPU: one pass over the output instead of K*K.

``involution_cpu.cpp`` holds three loop nests (forward, gradient for the kernels, gradient for the
input) that keep one group's channels in cache while they run over the kernel offsets, vectorized
along image rows. It is compiled on first use with the machine's C++ compiler through
``torch.utils.cpp_extension`` (about a minute, once: torch caches the build under
``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``, keyed by the source, its path and
this CPU: two checkouts sharing one build would rebuild it whenever the other had loaded it).
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

from kdkit_plugins.involution_function import involution_function

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
    name = "kdkit_involution_" + hashlib.sha256(source + f"{SOURCE} {machine}".encode()).hexdigest()[:12]
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


FusedInvolution = involution_function("FusedInvolution", load)  # ``involution`` through the compiled kernels
