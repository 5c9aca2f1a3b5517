"""Loss plugins against values worked out by hand."""
from __future__ import annotations

import math

import pytest
import torch

from kdkit.plugin.discovery import default_plugins
from kdkit_plugins.losses import ce, hard, kl

STUDENT = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
TEACHER = torch.tensor([[0.0, 0.0], [2.0, 0.0]])


def kl_by_hand(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def softmax(values, tau=1.0):
    exps = [math.exp(v / tau) for v in values]
    return [e / sum(exps) for e in exps]


def test_kl_batchmean_is_the_papers_term():
    # row 0: teacher uniform, student softmax(1, 0); row 1: teacher softmax(2, 0), student uniform
    expected = (kl_by_hand([0.5, 0.5], softmax([1, 0])) + kl_by_hand(softmax([2, 0]), [0.5, 0.5])) / 2
    value = kl()(STUDENT, target=None, labels=None, teacher_logits=[TEACHER])
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_kl_numel_and_temperature():
    tau = 2.0
    rows = [kl_by_hand(softmax(t, tau), softmax(s, tau)) for s, t in zip(STUDENT.tolist(), TEACHER.tolist())]
    expected = tau**2 * sum(rows) / STUDENT.numel()  # DeiT's reduction: sum over the number of elements
    value = kl(tau=tau, reduction="numel")(STUDENT, target=None, labels=None, teacher_logits=[TEACHER])
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_kl_ensembles_mean_probability_or_mean_logit():
    other = torch.tensor([[4.0, 0.0], [0.0, 0.0]])
    mean_prob = [[(a + b) / 2 for a, b in zip(softmax(t1), softmax(t2))]
                 for t1, t2 in zip(TEACHER.tolist(), other.tolist())]
    mean_logit = [softmax([(a + b) / 2 for a, b in zip(t1, t2)]) for t1, t2 in zip(TEACHER.tolist(), other.tolist())]
    for ensemble, teacher_probs in (("mean_prob", mean_prob), ("mean_logit", mean_logit)):
        expected = sum(kl_by_hand(p, softmax(s)) for p, s in zip(teacher_probs, STUDENT.tolist())) / 2
        value = kl(ensemble=ensemble)(STUDENT, target=None, labels=None, teacher_logits=[TEACHER, other])
        assert value.item() == pytest.approx(expected, rel=1e-6), ensemble


def test_ce_uses_the_soft_target():
    target = torch.tensor([[0.9, 0.1], [0.3, 0.7]])
    expected = -sum(sum(t * math.log(p) for t, p in zip(tr, softmax(sr)))
                    for tr, sr in zip(target.tolist(), STUDENT.tolist())) / 2
    value = ce()(STUDENT, target=target, labels=None, teacher_logits=[])
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_hard_distillation_uses_the_teachers_argmax():
    # the teachers (mean probability) and the student disagree on every row, so the choice shows
    student = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0]])
    teachers = [torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]])]
    # teacher classes: row 0 -> 0, row 1 -> 2; the student's own argmax would be 1 and 0
    expected = -(math.log(softmax([0, 2, 0])[0]) + math.log(softmax([1, 0, 0])[2])) / 2
    value = hard()(student, target=None, labels=None, teacher_logits=teachers)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    one_teacher = hard()(student, target=None, labels=None, teacher_logits=teachers[1:])
    assert one_teacher.item() == pytest.approx(expected, rel=1e-6)  # the same classes: ensembling kept them


def test_the_ensemble_of_probabilities_is_their_mean_in_log_space():
    from kdkit.builder.teacher import teacher_log_probs

    teachers = [torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 3.0, 0.0]])]
    for tau in (1.0, 2.0):
        mean = (torch.softmax(teachers[0] / tau, -1) + torch.softmax(teachers[1] / tau, -1)) / 2
        torch.testing.assert_close(teacher_log_probs(teachers, tau, "mean_prob"), mean.log())
        logit_mean = torch.log_softmax((teachers[0] + teachers[1]) / 2 / tau, -1)
        torch.testing.assert_close(teacher_log_probs(teachers, tau, "mean_logit"), logit_mean)


def test_hard_distillation_takes_the_ensembles_argmax_at_temperature_1():
    """Two teachers whose mean probability prefers class 2 at tau 1 but class 1 at tau 2."""
    teachers = [torch.tensor([[0.0, 0.0, 2.0]]), torch.tensor([[2.0, 3.0, 0.0]])]
    student = torch.tensor([[0.5, 0.2, -0.1]])
    expected = -math.log(softmax([0.5, 0.2, -0.1])[2])
    assert hard()(student, target=None, labels=None, teacher_logits=teachers).item() == pytest.approx(expected)


def test_losses_declare_whether_they_need_teachers_and_what_a_cache_can_give_them():
    assert ce().requires_teachers is False
    assert kl().requires_teachers is True and hard().requires_teachers is True
    assert kl().probabilities_only is True and hard().probabilities_only is True
    # anything but the teachers' probabilities at temperature 1 needs their logits
    for options in (dict(tau=2.0), dict(tau=0.5), dict(ensemble="mean_logit"), dict(tau=2.0, ensemble="mean_logit")):
        assert kl(**options).probabilities_only is False, options


def test_the_built_in_losses_are_registered_under_their_recipe_names():
    plugins = default_plugins()
    assert [plugins.get("loss", name) for name in ("ce", "kl", "hard")] == [ce, kl, hard]
