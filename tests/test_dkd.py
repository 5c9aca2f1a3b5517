"""The DKD loss plugin against values worked out by hand, and KD = TCKD + (1 - p_t) * NCKD."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdkit.errors import KdkitError
from kdkit.plugin.discovery import default_plugins
from kdkit.recipe.schema import check_table
from kdkit_plugins.dkd import dkd
from kdkit_plugins.losses import kl

STUDENT = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])
TEACHER = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0]])
LABELS = torch.tensor([0, 2])
TARGET = torch.nn.functional.one_hot(LABELS, 3).float()  # no mixing: the labels themselves


def kl_by_hand(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def softmax(values, tau=1.0):
    exps = [math.exp(v / tau) for v in values]
    return [e / sum(exps) for e in exps]


def tckd_nckd_by_hand(student_row, teacher_row, label, tau):
    """One sample's TCKD and NCKD, straight from the paper's definitions."""
    p_s, p_t = softmax(student_row, tau), softmax(teacher_row, tau)
    # TCKD: KL between the binary distributions (target class, all the other classes)
    b_s = [p_s[label], 1 - p_s[label]]
    b_t = [p_t[label], 1 - p_t[label]]
    tckd = kl_by_hand(b_t, b_s)
    # NCKD: KL between the distributions over the non-target classes, renormalized among themselves
    others_s = [p / (1 - p_s[label]) for i, p in enumerate(p_s) if i != label]
    others_t = [p / (1 - p_t[label]) for i, p in enumerate(p_t) if i != label]
    nckd = kl_by_hand(others_t, others_s)
    return tckd, nckd


def test_dkd_by_hand_with_the_cifar_defaults():
    # alpha = 1, beta = 8, tau = 4: loss = tau^2 * mean over the batch of (alpha * TCKD + beta * NCKD)
    tau, alpha, beta = 4.0, 1.0, 8.0
    rows = [tckd_nckd_by_hand(s, t, y, tau) for s, t, y in zip(STUDENT.tolist(), TEACHER.tolist(), LABELS.tolist())]
    expected = tau**2 * sum(alpha * tckd + beta * nckd for tckd, nckd in rows) / 2
    value = dkd()(STUDENT, target=TARGET, labels=LABELS, teacher_logits=[TEACHER])
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_dkd_by_hand_step_by_step_at_tau_2():
    tau, alpha, beta = 2.0, 0.5, 2.0
    # row 0, target class 0
    p_s0 = softmax([1.0, 0.0, -1.0], tau)
    p_t0 = softmax([2.0, 1.0, 0.0], tau)
    tckd0 = kl_by_hand([p_t0[0], p_t0[1] + p_t0[2]], [p_s0[0], p_s0[1] + p_s0[2]])
    nckd0 = kl_by_hand([p_t0[1] / (1 - p_t0[0]), p_t0[2] / (1 - p_t0[0])],
                       [p_s0[1] / (1 - p_s0[0]), p_s0[2] / (1 - p_s0[0])])
    # row 1, target class 2
    p_s1 = softmax([0.5, 2.0, 0.0], tau)
    p_t1 = softmax([0.0, 1.0, 3.0], tau)
    tckd1 = kl_by_hand([p_t1[2], p_t1[0] + p_t1[1]], [p_s1[2], p_s1[0] + p_s1[1]])
    nckd1 = kl_by_hand([p_t1[0] / (1 - p_t1[2]), p_t1[1] / (1 - p_t1[2])],
                       [p_s1[0] / (1 - p_s1[2]), p_s1[1] / (1 - p_s1[2])])
    expected = tau**2 * (alpha * (tckd0 + tckd1) + beta * (nckd0 + nckd1)) / 2
    value = dkd(alpha=alpha, beta=beta, tau=tau)(STUDENT, target=TARGET, labels=LABELS, teacher_logits=[TEACHER])
    assert value.item() == pytest.approx(expected, rel=1e-5)
    # and each term alone
    only_tckd = dkd(alpha=1.0, beta=0.0, tau=tau)(STUDENT, target=TARGET, labels=LABELS, teacher_logits=[TEACHER])
    only_nckd = dkd(alpha=0.0, beta=1.0, tau=tau)(STUDENT, target=TARGET, labels=LABELS, teacher_logits=[TEACHER])
    assert only_tckd.item() == pytest.approx(tau**2 * (tckd0 + tckd1) / 2, rel=1e-5)
    assert only_nckd.item() == pytest.approx(tau**2 * (nckd0 + nckd1) / 2, rel=1e-5)


@pytest.mark.parametrize("tau", [1.0, 4.0])
@pytest.mark.parametrize("teachers", [1, 2])
def test_classical_kd_is_tckd_plus_one_minus_p_target_times_nckd(tau, teachers):
    # The paper's Eq. (3), per sample: KL(p_t || p_s) = TCKD + (1 - p_t[target]) * NCKD. Its weight on
    # NCKD is per sample, so DKD (one scalar beta) is built per row with beta = 1 - p_t[target].
    generator = torch.Generator().manual_seed(0)
    student = 3 * torch.randn(6, 5, generator=generator)
    teacher_logits = [3 * torch.randn(6, 5, generator=generator) for _ in range(teachers)]
    labels = torch.randint(0, 5, (6,), generator=generator)
    # the combined teacher distribution at tau, as kl's default "mean_prob" ensemble takes it
    p_teacher = torch.stack([torch.softmax(t / tau, -1) for t in teacher_logits]).mean(0)
    per_row = []
    for i in range(6):
        one = dict(target=torch.nn.functional.one_hot(labels[i:i + 1], 5).float(), labels=labels[i:i + 1], teacher_logits=[t[i:i + 1] for t in teacher_logits])
        p_target = p_teacher[i, labels[i]].item()
        tckd = dkd(alpha=1.0, beta=0.0, tau=tau)(student[i:i + 1], **one)
        nckd = dkd(alpha=0.0, beta=1.0, tau=tau)(student[i:i + 1], **one)
        combined = dkd(alpha=1.0, beta=1 - p_target, tau=tau)(student[i:i + 1], **one)
        assert combined.item() == pytest.approx(tckd.item() + (1 - p_target) * nckd.item(), rel=1e-5)
        per_row.append(combined.item())
    classical = kl(tau=tau, reduction="batchmean")(student, target=None, labels=None, teacher_logits=teacher_logits)
    assert classical.item() == pytest.approx(sum(per_row) / 6, rel=1e-5)


def test_mean_logit_ensemble_is_dkd_of_the_mean_logits():
    other = torch.tensor([[0.0, 4.0, 1.0], [2.0, 0.0, 0.0]])
    two = dkd(ensemble="mean_logit")(STUDENT, target=TARGET, labels=LABELS, teacher_logits=[TEACHER, other])
    one = dkd()(STUDENT, target=TARGET, labels=LABELS, teacher_logits=[(TEACHER + other) / 2])
    assert two.item() == pytest.approx(one.item(), rel=1e-6)


def test_confident_logits_stay_finite_with_finite_gradients():
    # 1 - p_t underflows to 0 in float32 here if taken as a subtraction: log(1 - p_t) would be -inf
    student = torch.tensor([[80.0, 0.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[200.0, 0.0, 1.0], [0.0, 0.0, 200.0]])
    value = dkd(tau=1.0)(student, target=TARGET, labels=LABELS, teacher_logits=[teacher])
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(student.grad).all()


def test_half_precision_logits_are_computed_in_float32():
    value = dkd()(STUDENT.half(), target=TARGET, labels=LABELS, teacher_logits=[TEACHER.bfloat16()])
    assert value.dtype == torch.float32


@pytest.mark.parametrize("target", [LABELS, torch.ones(2, 4) / 4], ids=["labels", "other-class-count"])
def test_dkd_needs_the_soft_target(target):
    with pytest.raises(KdkitError, match="soft target"):
        dkd()(STUDENT, target=target, labels=LABELS, teacher_logits=[TEACHER])


def test_a_mixed_image_takes_the_class_its_target_weighs_most():
    """Under mixup the first image's label (``labels``) is the minority class for about half the batch."""
    first, second = torch.tensor([0, 0]), torch.tensor([1, 2])
    mixed = 0.3 * torch.nn.functional.one_hot(first, 3) + 0.7 * torch.nn.functional.one_hot(second, 3)
    value = dkd()(STUDENT, target=mixed.float(), labels=first, teacher_logits=[TEACHER])
    majority = dkd()(STUDENT, target=torch.nn.functional.one_hot(second, 3).float(), labels=second,
                     teacher_logits=[TEACHER])
    minority = dkd()(STUDENT, target=torch.nn.functional.one_hot(first, 3).float(), labels=first,
                     teacher_logits=[TEACHER])
    assert value.item() == pytest.approx(majority.item()) and value.item() != pytest.approx(minority.item())


def test_dkd_through_the_registry_like_a_recipe():
    factory = default_plugins().get("loss", "dkd")
    kwargs = check_table(factory, {"alpha": 1, "beta": 8, "tau": 4}, kind="loss", file="recipe.toml", key="losses.0")
    assert kwargs == {"alpha": 1.0, "beta": 8.0, "tau": 4.0}
    fn = factory(**kwargs)
    assert fn.requires_teachers is True
    student = STUDENT.clone().requires_grad_()
    target = torch.tensor([[0.9, 0.05, 0.05], [0.05, 0.05, 0.9]])
    value = fn(student, target=target, labels=LABELS, teacher_logits=[TEACHER])
    value.backward()
    assert value.ndim == 0 and value.item() > 0 and student.grad.abs().sum() > 0


def dkd_by_definition(student, teacher, labels, alpha, beta, tau):
    """mdistiller's dkd_loss as published (TCKD + NCKD, tau^2, batch mean), in float64 log space: the
    non-target distribution is the softmax over the other classes alone."""
    total = 0.0
    for s, t, y in zip(student.double(), teacher.double(), labels.tolist()):
        log_s, log_t = (s / tau).log_softmax(-1), (t / tau).log_softmax(-1)
        others = [c for c in range(len(s)) if c != y]
        b_s = torch.stack([log_s[y], torch.logsumexp(log_s[others], 0)])
        b_t = torch.stack([log_t[y], torch.logsumexp(log_t[others], 0)])
        tckd = (b_t.exp() * (b_t - b_s)).sum()
        n_s, n_t = (s[others] / tau).log_softmax(-1), (t[others] / tau).log_softmax(-1)
        nckd = (n_t.exp() * (n_t - n_s)).sum()
        total += alpha * tckd + beta * nckd
    return tau**2 * total / len(labels)


@pytest.mark.parametrize("gap", [0.0, 50.0, 5000.0])
def test_dkd_is_mdistillers_formula_even_where_masking_by_a_constant_fails(gap):
    """mdistiller masks the target out of NCKD by subtracting 1000 from its logit: with a larger gap the
    target still dominates there. Dropping the target column, as here, stays exact at any gap."""
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    labels = torch.tensor([0, 3, 5, 1])
    student[torch.arange(4), labels] += gap
    teacher[torch.arange(4), labels] += gap / 2
    for alpha, beta, tau in ((1.0, 8.0, 4.0), (0.5, 2.0, 1.0)):
        value = dkd(alpha=alpha, beta=beta, tau=tau)(student, target=F.one_hot(labels, 6).float(), labels=labels,
                                                      teacher_logits=[teacher])
        expected = dkd_by_definition(student, teacher, labels, alpha, beta, tau)
        assert torch.isfinite(value) and value.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)
    if gap > 1000 * 4.0:  # the constant mask would leave the target in: its NCKD is far from the definition's
        mask = F.one_hot(labels, 6).double()
        s, t = student.double() / 4.0 - 1000.0 * mask, teacher.double() / 4.0 - 1000.0 * mask
        masked = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1).mean()
        n_s = [(student.double()[i, [c for c in range(6) if c != y]] / 4.0) for i, y in enumerate(labels.tolist())]
        n_t = [(teacher.double()[i, [c for c in range(6) if c != y]] / 4.0) for i, y in enumerate(labels.tolist())]
        exact = torch.stack([(b.softmax(-1) * (b.log_softmax(-1) - a.log_softmax(-1))).sum()
                             for a, b in zip(n_s, n_t)]).mean()
        assert abs(masked.item() - exact.item()) > 0.1 * exact.item()


def test_two_classes_leave_only_the_target_term():
    """With two classes the non-target distribution is one class: NCKD is 0 and DKD is alpha * TCKD."""
    student, teacher, labels = torch.tensor([[1.0, -1.0], [0.0, 2.0]]), torch.tensor([[2.0, 0.0], [1.0, 1.0]]), \
        torch.tensor([0, 1])
    target = F.one_hot(labels, 2).float()
    tckd_only = dkd(alpha=1.0, beta=0.0, tau=1.0)(student, target=target, labels=labels, teacher_logits=[teacher])
    both = dkd(alpha=1.0, beta=8.0, tau=1.0)(student, target=target, labels=labels, teacher_logits=[teacher])
    classical = kl(tau=1.0)(student, target=target, labels=labels, teacher_logits=[teacher])
    assert both.item() == pytest.approx(tckd_only.item()) == pytest.approx(classical.item())  # KD = TCKD here
    with pytest.raises(KdkitError, match="at least two classes"):
        dkd()(student[:, :1], target=target[:, :1], labels=labels, teacher_logits=[teacher[:, :1]])
