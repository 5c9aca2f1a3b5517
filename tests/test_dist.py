"""The DIST loss plugin against values worked out by hand, and its invariances."""
from __future__ import annotations

import math

import pytest
import torch

from kdkit.plugin.discovery import default_plugins
from kdkit.recipe.schema import check_table
from kdkit_plugins.dist import dist

# Three samples, not two: over a batch of two, every column's Pearson correlation is +-1.
STUDENT = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0], [0.0, 0.0, 1.0]])
TEACHER = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0], [1.0, -1.0, 2.0]])


def softmax(values, tau=1.0):
    exps = [math.exp(v / tau) for v in values]
    return [e / sum(exps) for e in exps]


def pearson_by_hand(x, y):
    mean_x, mean_y = sum(x) / len(x), sum(y) / len(y)
    dx, dy = [a - mean_x for a in x], [b - mean_y for b in y]
    covariance = sum(a * b for a, b in zip(dx, dy))
    return covariance / (math.sqrt(sum(a * a for a in dx)) * math.sqrt(sum(b * b for b in dy)))


def test_dist_by_hand_step_by_step():
    tau, beta, gamma = 2.0, 1.0, 2.0
    # probability rows at temperature tau
    y_s = [softmax(row, tau) for row in STUDENT.tolist()]
    y_t = [softmax(row, tau) for row in TEACHER.tolist()]
    # inter-class relation: 1 - mean over the samples of the rows' Pearson correlation
    inter = 1 - sum(pearson_by_hand(y_s[i], y_t[i]) for i in range(3)) / 3
    # intra-class relation: 1 - mean over the classes of the columns' Pearson correlation
    columns_s = [[y_s[i][j] for i in range(3)] for j in range(3)]
    columns_t = [[y_t[i][j] for i in range(3)] for j in range(3)]
    intra = 1 - sum(pearson_by_hand(columns_s[j], columns_t[j]) for j in range(3)) / 3
    expected = tau**2 * (beta * inter + gamma * intra)
    value = dist(beta=beta, gamma=gamma, tau=tau)(STUDENT, target=None, labels=None, teacher_logits=[TEACHER])
    assert value.item() == pytest.approx(expected, rel=1e-5)
    # each relation alone
    only_inter = dist(beta=1.0, gamma=0.0, tau=tau)(STUDENT, target=None, labels=None, teacher_logits=[TEACHER])
    only_intra = dist(beta=0.0, gamma=1.0, tau=tau)(STUDENT, target=None, labels=None, teacher_logits=[TEACHER])
    assert only_inter.item() == pytest.approx(tau**2 * inter, rel=1e-5)
    assert only_intra.item() == pytest.approx(tau**2 * intra, rel=1e-5)


def test_dist_by_hand_with_the_defaults():
    # beta = gamma = tau = 1
    y_s = [softmax(row) for row in STUDENT.tolist()]
    y_t = [softmax(row) for row in TEACHER.tolist()]
    inter = 1 - sum(pearson_by_hand(s, t) for s, t in zip(y_s, y_t)) / 3
    intra = 1 - sum(pearson_by_hand(s, t) for s, t in zip(zip(*y_s), zip(*y_t))) / 3
    value = dist()(STUDENT, target=None, labels=None, teacher_logits=[TEACHER])
    assert value.item() == pytest.approx(inter + intra, rel=1e-5)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_dist_is_zero_when_the_student_matches_the_teacher(tau):
    logits = 3 * torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    value = dist(beta=2.0, gamma=3.0, tau=tau)(logits, target=None, labels=None, teacher_logits=[logits.clone()])
    # zero but for the authors' eps: rho = |a|^2 / (|a|^2 + 1e-8), a hair below 1 on flat (tau 4) predictions
    expected = authors_dist(logits.double(), logits.double(), beta=2.0, gamma=3.0, tau=tau).item()
    assert value.item() == pytest.approx(expected, abs=1e-6) and expected < 1e-4


def test_dist_is_invariant_to_a_constant_added_to_each_row():
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(8, 10, generator=generator), torch.randn(8, 10, generator=generator)
    shift_s, shift_t = 10 * torch.randn(8, 1, generator=generator), 10 * torch.randn(8, 1, generator=generator)
    fn = dist(tau=2.0)
    plain = fn(student, target=None, labels=None, teacher_logits=[teacher])
    shifted = fn(student + shift_s, target=None, labels=None, teacher_logits=[teacher + shift_t])
    assert shifted.item() == pytest.approx(plain.item(), rel=1e-5)
    assert plain.item() > 0


def test_dist_ensembles_teachers_like_kl():
    other = torch.tensor([[0.0, 4.0, 1.0], [2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    mean_logit = dist(ensemble="mean_logit")(STUDENT, target=None, labels=None, teacher_logits=[TEACHER, other])
    averaged = dist()(STUDENT, target=None, labels=None, teacher_logits=[(TEACHER + other) / 2])
    assert mean_logit.item() == pytest.approx(averaged.item(), rel=1e-6)
    # mean_prob: the teachers' averaged probabilities, by hand through the inter-class relation alone
    mean_prob = [[(a + b) / 2 for a, b in zip(softmax(t1), softmax(t2))]
                 for t1, t2 in zip(TEACHER.tolist(), other.tolist())]
    inter = 1 - sum(pearson_by_hand(softmax(s), t) for s, t in zip(STUDENT.tolist(), mean_prob)) / 3
    value = dist(gamma=0.0)(STUDENT, target=None, labels=None, teacher_logits=[TEACHER, other])
    assert value.item() == pytest.approx(inter, rel=1e-5)


def test_a_batch_of_one_has_no_intra_class_correlation():
    # a column of one sample does not vary: its correlation is taken as 0, so the intra term is 1
    student = torch.tensor([[1.0, 0.0, -1.0]], requires_grad=True)
    value = dist(beta=0.0, gamma=1.0)(student, target=None, labels=None, teacher_logits=[TEACHER[:1]])
    value.backward()
    assert value.item() == pytest.approx(1.0) and torch.isfinite(student.grad).all()


def test_half_precision_logits_are_computed_in_float32():
    value = dist()(STUDENT.half(), target=None, labels=None, teacher_logits=[TEACHER.bfloat16()])
    assert value.dtype == torch.float32


def test_dist_through_the_registry_like_a_recipe():
    factory = default_plugins().get("loss", "dist")
    kwargs = check_table(factory, {"beta": 1, "gamma": 2, "tau": 4}, kind="loss", file="recipe.toml", key="losses.0")
    assert kwargs == {"beta": 1.0, "gamma": 2.0, "tau": 4.0}
    fn = factory(**kwargs)
    assert fn.requires_teachers is True
    student = STUDENT.clone().requires_grad_()
    value = fn(student, target=None, labels=torch.tensor([0, 1, 2]), teacher_logits=[TEACHER])
    value.backward()
    assert value.ndim == 0 and value.item() > 0 and student.grad.abs().sum() > 0


def authors_dist(student, teacher, beta=1.0, gamma=1.0, tau=1.0, eps=1e-8):
    """DIST as its authors compute it (float64): each correlation divides by |a||b| + eps."""
    def pearson(a, b):
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)

    y_s, y_t = (student / tau).softmax(1), (teacher / tau).softmax(1)
    inter = 1 - pearson(y_s, y_t).mean()
    intra = 1 - pearson(y_s.t(), y_t.t()).mean()
    return tau**2 * (beta * inter + gamma * intra)


def test_dist_matches_the_authors_form_on_near_constant_columns():
    """100 classes at tau 1, nearly uniform predictions: every row and column barely varies (centred norms
    around 1e-4), where the authors' |a||b| + eps and F.cosine_similarity's clamped norms part ways."""
    g = torch.Generator().manual_seed(0)
    student = 0.01 * torch.randn(16, 100, generator=g)
    teacher = student + 0.005 * torch.randn(16, 100, generator=g)
    s32 = student.clone().requires_grad_()
    value = dist()(s32, target=None, labels=None, teacher_logits=[teacher])
    value.backward()
    s64 = student.double().requires_grad_()
    expected = authors_dist(s64, teacher.double())
    expected.backward()
    assert value.item() == pytest.approx(expected.item(), rel=1e-4)
    torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-3, atol=1e-7)
    # the difference is real here: the clamped form is 20% off in value (10% in gradient)
    clamped = torch.nn.functional.cosine_similarity
    y_s, y_t = student.double().softmax(1), teacher.double().softmax(1)
    other = 2 - clamped(y_s - y_s.mean(1, keepdim=True), y_t - y_t.mean(1, keepdim=True), dim=1, eps=1e-8).mean() \
        - clamped(y_s - y_s.mean(0, keepdim=True), y_t - y_t.mean(0, keepdim=True), dim=0, eps=1e-8).mean()
    assert abs(other.item() - expected.item()) > 0.1 * expected.item()
