"""How every benchmark times one call: the device synchronised before and after (CUDA runs asynchronously)."""
from __future__ import annotations

import time
from collections.abc import Callable

import torch


def seconds(fn: Callable[[], object], device: torch.device | str = "cpu") -> float:
    """Wall seconds of ``fn()``, with CUDA's queue drained before the clock starts and before it stops."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start
