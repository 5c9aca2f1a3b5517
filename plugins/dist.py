"""DIST (Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022).

Instead of matching probabilities exactly (KL), DIST matches their *relations* with the Pearson
correlation ``rho``. With ``Y_s = softmax(z_s / tau)`` and ``Y_t`` the teacher's, both ``(B, C)``:

- inter-class relation: ``1 - mean_i rho(Y_s[i, :], Y_t[i, :])``, over the batch's rows
  (how one sample's classes rank relative to each other);
- intra-class relation: ``1 - mean_j rho(Y_s[:, j], Y_t[:, j])``, over the classes' columns
  (how one class's probability varies across the batch);

    loss = tau^2 * (beta * inter + gamma * intra)

(tau^2 as in the paper's code, hunto/DIST_KD). ``rho(x, y)`` is computed as the authors' code does:
with ``a = x - mean(x)`` and ``b = y - mean(y)``, ``a . b / (|a| |b| + 1e-8)``, in float64 (centring
probabilities near 1 / classes cancels most of their digits). ``F.cosine_similarity`` clamps each norm
at 1e-8 instead: on nearly uniform predictions (100 classes, tau 1, centred norms near 1e-4) the two
differ by about 20% in value and 10% in gradient (``tests/test_dist.py``). A constant row or column
(zero variance: a uniform prediction, or a batch of one for the intra-class term) has correlation 0.

Notes for kdkit:

- The intra-class term is a statistic of the batch: with ``train.accum_steps > 1`` it is taken over
  each micro-batch, so it changes with the micro-batch size (the inter-class term does not).
- Several teachers on one head are combined as ``kl`` does (``ensemble``): the mean of their
  probabilities (default) or the softmax of their mean logits, both at temperature ``tau``.
- ``target`` and ``labels`` are not used.
"""
from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F

from kdkit.api import Range, hookimpl, teacher_log_probs


def pearson(x: torch.Tensor, y: torch.Tensor, dim: int) -> torch.Tensor:
    """Pearson correlation of ``x`` and ``y`` along ``dim`` (the authors' eps); 0 where either does not vary."""
    x = x - x.mean(dim, keepdim=True)
    y = y - y.mean(dim, keepdim=True)
    return (x * y).sum(dim) / (x.norm(dim=dim) * y.norm(dim=dim) + 1e-8)


def dist(*, beta: Annotated[float, Range(ge=0)] = 1.0, gamma: Annotated[float, Range(ge=0)] = 1.0,
         tau: Annotated[float, Range(gt=0)] = 1.0,
         ensemble: Literal["mean_prob", "mean_logit"] = "mean_prob"):
    """DIST (Huang et al. 2022): tau^2 * (beta * inter-class + gamma * intra-class (1 - Pearson) relation)."""

    def loss(logits, *, target, labels, teacher_logits):
        # float64: centring probabilities of about 1 / classes cancels most of their digits
        p_student = F.softmax(logits.double() / tau, dim=-1)
        p_teacher = teacher_log_probs([t.double() for t in teacher_logits], tau, ensemble).exp()
        inter = 1 - pearson(p_student, p_teacher, dim=1).mean()
        intra = 1 - pearson(p_student, p_teacher, dim=0).mean()
        return ((beta * inter + gamma * intra) * tau**2).float()

    loss.requires_teachers = True
    return loss


@hookimpl
def kdkit_register_losses(registry):
    registry.register_module("dist", module=dist)
