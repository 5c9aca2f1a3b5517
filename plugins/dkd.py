"""Decoupled Knowledge Distillation (Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022).

With ``p = softmax(z / tau)`` and ``t`` the target class (``labels``), classical KD splits into

- TCKD, the KL divergence between the binary distributions ``b = (p_t, 1 - p_t)`` of teacher and
  student (target class vs. all the others), and
- NCKD, the KL divergence between the distributions over the non-target classes alone,
  ``p_hat_i = p_i / (1 - p_t)`` for ``i != t``,

so that ``KL(p_teacher || p_student) = TCKD + (1 - p_teacher_t) * NCKD`` per sample (the paper's
Eq. (3)). DKD drops the ``(1 - p_teacher_t)`` coupling and weighs the two terms freely:

    loss = tau^2 * (alpha * TCKD + beta * NCKD), each averaged over the batch

(tau^2 as in the paper's code, mdistiller's ``dkd_loss``).

Notes for kdkit:

- The target class is the class the (soft) ``target`` weighs most: without mixing, the label itself
  (label smoothing keeps it the largest entry); under mixup/cutmix, the class of the image that
  contributes more (the larger mixing coefficient; a tie at exactly 0.5 takes the lower class
  index). The hard ``labels`` before mixing would split about half of the mixed images on their
  minority class.
- mdistiller ramps the DKD loss in linearly over its first ``warmup`` epochs (20 on CIFAR). kdkit's
  loss API has no epoch, so there is no warmup here; use the recipe's lr warmup, or a smaller
  ``weight``, instead.
- Several teachers on one head are combined as ``kl`` does (``ensemble``): the mean of their
  probabilities (default) or the softmax of their mean logits, both at temperature ``tau``; TCKD and
  NCKD are then taken from that combined distribution.
- The non-target distribution is computed by dropping the target column (no large-negative mask:
  mdistiller subtracts 1000 from the target's logit, which fails to mask it past a gap of 1000 tau),
  and ``log(1 - p_t)`` as a log-sum-exp over the other classes, so nothing underflows to ``log 0``;
  all in float64, since renormalising the other classes subtracts log-probabilities that can be huge.
"""
from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F

from kdkit.api import KdkitError, Range, hookimpl, teacher_log_probs


def split_target(log_probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From log-probabilities ``(B, C)``: the binary log-probabilities ``(B, 2)`` of (target, others)
    and the log-probabilities ``(B, C - 1)`` of the non-target classes renormalized among themselves."""
    batch, classes = log_probs.shape
    is_target = F.one_hot(labels, classes).bool()
    log_p_target = log_probs[is_target].view(batch, 1)
    others = log_probs[~is_target].view(batch, classes - 1)  # row-major order: each row's other classes
    log_p_others = torch.logsumexp(others, dim=-1, keepdim=True)  # log(1 - p_t), without the subtraction
    return torch.cat([log_p_target, log_p_others], dim=-1), others - log_p_others


def dkd(*, alpha: Annotated[float, Range(ge=0)] = 1.0, beta: Annotated[float, Range(ge=0)] = 8.0,
        tau: Annotated[float, Range(gt=0)] = 4.0,
        ensemble: Literal["mean_prob", "mean_logit"] = "mean_prob"):
    """Decoupled KD (Zhao et al. 2022): tau^2 * (alpha * TCKD + beta * NCKD), target: the class `target` weighs most."""

    def loss(logits, *, target, labels, teacher_logits):
        if target.shape != logits.shape:
            raise KdkitError("dkd needs the soft target, one row of class weights per sample")
        if logits.shape[-1] < 2:
            raise KdkitError("dkd needs at least two classes")
        labels = target.argmax(-1)
        # float64: renormalising the other classes subtracts log-probabilities that can be huge
        binary_t, others_t = split_target(teacher_log_probs([t.double() for t in teacher_logits], tau, ensemble),
                                          labels)
        binary_s, others_s = split_target(F.log_softmax(logits.double() / tau, dim=-1), labels)
        tckd = F.kl_div(binary_s, binary_t, reduction="sum", log_target=True)
        nckd = F.kl_div(others_s, others_t, reduction="sum", log_target=True)
        return ((alpha * tckd + beta * nckd) * tau**2 / logits.shape[0]).float()

    loss.requires_teachers = True
    return loss


@hookimpl
def kdkit_register_losses(registry):
    registry.register_module("dkd", module=dkd)
