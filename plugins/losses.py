"""Loss plugins. Each factory returns ``loss(logits, *, target, labels, teacher_logits) -> scalar``.

``target`` is the (soft) target after mixup/cutmix and label smoothing, ``labels`` the hard labels
before mixing, ``teacher_logits`` a list with one tensor per teacher named by the loss entry.
"""
from __future__ import annotations

from typing import Annotated, Literal

import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

from kdkit.api import Range, hookimpl, teacher_log_probs



def ce():
    """Cross-entropy with the (soft) target; label smoothing is already in the target."""
    soft_ce = SoftTargetCrossEntropy()

    def loss(logits, *, target, labels, teacher_logits):
        return soft_ce(logits.float(), target)

    loss.requires_teachers = False
    return loss


def kl(*, tau: Annotated[float, Range(gt=0)] = 1.0, reduction: Literal["batchmean", "numel"] = "batchmean",
       ensemble: Literal["mean_prob", "mean_logit"] = "mean_prob"):
    """The paper's Eq. (5) term: tau^2 * KL(softmax(teacher/tau) || softmax(student/tau))."""

    def loss(logits, *, target, labels, teacher_logits):
        log_p_teacher = teacher_log_probs(teacher_logits, tau, ensemble)
        log_p_student = F.log_softmax(logits.float() / tau, dim=-1)
        divergence = F.kl_div(log_p_student, log_p_teacher, reduction="sum", log_target=True)
        scale = logits.shape[0] if reduction == "batchmean" else logits.numel()
        return divergence * tau**2 / scale

    loss.requires_teachers = True
    loss.probabilities_only = tau == 1.0 and ensemble == "mean_prob"
    return loss


def hard():
    """DeiT's hard distillation: cross-entropy with the (ensembled) teachers' argmax."""

    def loss(logits, *, target, labels, teacher_logits):
        teacher_class = teacher_log_probs(teacher_logits, 1.0, "mean_prob").argmax(-1)
        return F.cross_entropy(logits.float(), teacher_class)

    loss.requires_teachers = True
    loss.probabilities_only = True
    return loss


@hookimpl
def kdkit_register_losses(registry):
    registry.register_module("ce", module=ce)
    registry.register_module("kl", module=kl)
    registry.register_module("hard", module=hard)
