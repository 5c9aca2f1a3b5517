"""Frozen teachers, kept apart from the trainable module (never wrapped by DDP, never optimized)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.task import DistillationTeacher
from torch import nn


class Teacher(DistillationTeacher):
    """A teacher in eval mode under no_grad, with its own input normalization, resolution and precision.

    timm's ``DistillationTeacher`` re-normalizes the student's batch for the teacher (its mean/std
    come from the model's ``pretrained_cfg``); ``mean``/``std`` override that for teachers trained
    on the student's own data.
    """

    def __init__(self, model: nn.Module, *, mean=None, std=None, input_size: int | None = None,
                 bf16: bool = False):
        super().__init__(model)
        if mean is not None:
            self.mean_kd = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
            self.std_kd = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.input_size = input_size
        self.bf16 = bf16
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Teacher:
        """A teacher never leaves eval mode (its BatchNorm statistics stay fixed)."""
        return super().train(False)

    @torch.no_grad()
    def logits(self, images: torch.Tensor, student_mean: torch.Tensor, student_std: torch.Tensor) -> torch.Tensor:
        """Logits (fp32) for the very batch the student sees, normalized and resized for this teacher."""
        x = self.normalize_input(images, student_mean, student_std)
        if self.input_size and x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self(x).float()
