"""The one rule for when kdkit computes in bf16: ``auto`` means bf16 on CUDA and fp32 elsewhere."""
from __future__ import annotations

import torch


def uses_bf16(precision: str, device: torch.device) -> bool:
    """``auto``: bf16 on CUDA, fp32 elsewhere; ``bf16`` everywhere; ``fp32`` never."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device: torch.device, precision: str):
    """bf16 autocast on ``device`` when ``precision`` asks for it there (``uses_bf16``), else a no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(precision, device))
