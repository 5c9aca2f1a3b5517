"""DIST (Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022).

Instead of matching probabilities exactly (KL), DIST matches their *relations* with the Pearson
correlation ``rho``. With ``Y_s = softmax(z_s / tau)`` and ``Y_t`` the teacher's, both ``(B, C)``:

- inter-class relation: ``1 - mean_i rho(Y_s[i, :], Y_t[i, :])``, over the batch's rows
  (how one sample's classes rank relative to each other);
- intra-class relation: ``1 - mean_j rho(Y_s[:, j], Y_t[:, j])``, over the classes' columns
  (how one class's probability varies across the batch);

    loss = tau^2 * (beta * inter + gamma * intra)

(tau^2 as in the paper's code, hunto/DIST_KD). ``rho(x, y)`` is the cosine similarity of
``x - mean(x)`` and ``y - mean(y)``; a constant row or column (zero variance: a uniform prediction,
or a batch of one for the intra-class term) has correlation 0 by convention here.

Notes for kdkit:

- The intra-class term is a statistic of the batch: with ``train.accum_steps > 1`` it is taken over
  each micro-batch, so it changes with the micro-batch size (the inter-class term does not).
- Several teachers on one head are combined as ``kl`` does (``ensemble``): the mean of their
  probabilities (default) or the softmax of their mean logits, both at temperature ``tau``.
- ``target`` and ``labels`` are not used.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from kdkit.api import hookimpl, teacher_log_probs


def pearson(x: torch.Tensor, y: torch.Tensor, dim: int) -> torch.Tensor:
    """Pearson correlation of ``x`` and ``y`` along ``dim``; 0 where either does not vary."""
    x = x - x.mean(dim, keepdim=True)
    y = y - y.mean(dim, keepdim=True)
    return F.cosine_similarity(x, y, dim=dim, eps=1e-8)


def dist(*, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0,
         ensemble: Literal["mean_prob", "mean_logit"] = "mean_prob"):
    """DIST (Huang et al. 2022): tau^2 * (beta * inter-class + gamma * intra-class (1 - Pearson) relation)."""

    def loss(logits, *, target, labels, teacher_logits):
        p_student = F.softmax(logits.float() / tau, dim=-1)
        p_teacher = teacher_log_probs(teacher_logits, tau, ensemble).exp()
        inter = 1 - pearson(p_student, p_teacher, dim=1).mean()
        intra = 1 - pearson(p_student, p_teacher, dim=0).mean()
        return (beta * inter + gamma * intra) * tau**2

    loss.requires_teachers = True
    return loss


@hookimpl
def kdkit_register_losses(registry):
    registry.register_module("dist", module=dist)
