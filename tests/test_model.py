"""The trainable module: which heads make the prediction, what evaluation reports, what inference costs."""
from __future__ import annotations

import pytest
import torch

from kdkit.builder.model import DistillModel, prediction_names, predictions


class Constant(torch.nn.Module):
    """A head whose logits do not depend on its input, with one parameter per logit."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(logits))

    def forward(self, features):
        return self.logits.expand(len(features), -1)


class Student(torch.nn.Module):
    embedding_dims = {"x": 1}

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Linear(1, 1)  # two parameters

    def forward(self, images):
        return {"x": self.scale(images.flatten(1)[:, :1])}


def three_heads(eval_heads):
    """Heads that disagree: cls says class 0, conv class 1, and the mean of all three says class 1."""
    heads = {"cls": Constant([3.0, 0.0, 0.0]), "conv": Constant([0.0, 2.0, 0.0]), "inv": Constant([0.0, 2.0, 1.0])}
    return DistillModel(Student(), heads, {name: "x" for name in heads}, eval_heads)


def test_the_prediction_is_the_mean_of_the_eval_heads():
    model = three_heads(["cls", "conv", "inv"])
    with torch.no_grad():
        torch.testing.assert_close(model.predict(torch.zeros(2, 3)), torch.tensor([[1.0, 4 / 3, 1 / 3]] * 2))
        assert model.predict(torch.zeros(1, 3)).argmax().item() == 1  # the mean's class, which cls alone misses
        model.eval_heads = ["cls"]
        assert model.predict(torch.zeros(1, 3)).argmax().item() == 0


@pytest.mark.parametrize("heads, expected", [
    (["cls"], ["cls", "eval"]),  # one head: its mean is itself, so no heads_mean
    (["cls", "conv"], ["cls", "conv", "eval", "heads_mean"]),
    (["cls", "conv", "inv"], ["cls", "conv", "inv", "eval", "heads_mean"]),
])
def test_evaluation_reports_every_head_the_prediction_and_with_several_heads_their_mean(heads, expected):
    logits = {name: torch.randn(4, 3) for name in heads}
    out = predictions(logits, heads[:1])
    assert prediction_names(heads) == expected and list(out) == expected
    torch.testing.assert_close(out["eval"], logits[heads[0]])
    if len(heads) > 1:
        torch.testing.assert_close(out["heads_mean"], torch.stack(list(logits.values())).mean(0))


def test_inference_counts_the_student_and_only_the_heads_that_predict():
    assert three_heads(["cls"]).eval_parameters() == 2 + 3
    assert three_heads(["cls", "conv", "inv"]).eval_parameters() == 2 + 3 * 3
