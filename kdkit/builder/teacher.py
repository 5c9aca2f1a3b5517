"""Frozen teachers, kept apart from the trainable module (never optimized), and how several are combined."""
from __future__ import annotations

import hashlib

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
                 bf16: bool = False, class_index: list[int] | None = None, channels_last: bool = False,
                 compile: bool = False):
        super().__init__(model)
        self.class_index = class_index  # the model's output for each of the data's classes, when they differ
        self.channels_last = channels_last  # a convolutional teacher on a GPU runs faster channels-last
        if channels_last:
            model.to(memory_format=torch.channels_last)
        split = all(hasattr(model, a) for a in ("forward_features", "forward_head", "get_classifier"))
        whole = model
        features = (lambda x: model.forward_head(model.forward_features(x), pre_logits=True)) if split else None
        if compile:  # compiled on first use; kept out of the module tree, so the weights and their hash stay
            whole, features = torch.compile(whole), features and torch.compile(features)
        self.calls = (whole, features)
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
        """fp32 logits for the very batch the student sees, normalized and resized (antialiased) for this teacher.

        Under bf16 the features are computed in bf16 and the classifier in fp32, for models with timm's
        ``forward_features`` / ``forward_head`` / ``get_classifier``; any other model runs whole in bf16.
        """
        x = self.normalize_input(images, student_mean, student_std)
        if self.input_size and x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False,
                              antialias=x.shape[-1] > self.input_size)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = self.classify(x)
        return logits if self.class_index is None else logits[:, self.class_index]

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        whole, features = self.calls
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            if not (self.bf16 and features):
                return whole(x).float()
            pooled = features(x)
        with torch.autocast(x.device.type, enabled=False):
            return self.model.get_classifier()(pooled.float())


def teacher_log_probs(teacher_logits: list[torch.Tensor], tau: float, ensemble: str) -> torch.Tensor:
    """Log-probabilities of several teachers' combined prediction at temperature ``tau``.

    ``mean_prob``: the mean of their probabilities (a mixture); ``mean_logit``: the softmax of their
    mean logits. With one teacher both are its own ``log_softmax(logits / tau)``.
    """
    stacked = torch.stack([t.to(torch.promote_types(t.dtype, torch.float32)) / tau for t in teacher_logits])
    if ensemble == "mean_logit":
        return F.log_softmax(stacked.mean(0), dim=-1)
    return torch.logsumexp(F.log_softmax(stacked, dim=-1), dim=0) - torch.log(torch.tensor(float(len(teacher_logits))))


def weights_hash(module: nn.Module) -> str:
    """A hash of every parameter and buffer (names, dtypes, shapes, bytes): what a resumed run compares."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
