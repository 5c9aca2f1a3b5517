"""Multiply-adds of one image through a model's eval prediction (mmengine's FLOP analysis)."""
from __future__ import annotations

import torch

from kdkit._model import DistillModel, Predictor


def count_flops(model: DistillModel, in_chans: int, image_size: int) -> int | None:
    """FLOPs of one image through the eval prediction, by mmengine's analysis (None if it cannot trace)."""
    from mmengine.analysis import FlopAnalyzer

    param = next(model.parameters())
    x = torch.zeros(1, in_chans, image_size, image_size, device=param.device)
    try:
        analyzer = FlopAnalyzer(Predictor(model).eval(), inputs=(x,))
        analyzer.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        return int(analyzer.total())
    except Exception:  # a model the tracer cannot follow still trains; its FLOPs are just unknown
        return None
