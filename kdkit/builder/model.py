"""The trainable module: a student plus its token heads. Teachers live apart (kdkit.builder.teacher)."""
from __future__ import annotations

import torch
from torch import nn


class DistillModel(nn.Module):
    """``forward`` returns logits per head; ``predict`` averages the eval heads (``eval.heads``)."""

    def __init__(self, student: nn.Module, heads: dict[str, nn.Module], embeddings: dict[str, str],
                 eval_heads: list[str]):
        super().__init__()
        self.student = student
        self.heads = nn.ModuleDict(heads)
        self.embeddings = dict(embeddings)  # head name -> the student embedding it reads
        self.eval_heads = list(eval_heads)

    def forward(self, images: torch.Tensor, heads: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Logits of ``heads`` (default: every head), each head run in fp32 whatever the autocast around it."""
        features = self.student(images)
        with torch.autocast(images.device.type, enabled=False):
            return {name: self.heads[name](features[self.embeddings[name]].float()) for name in heads or self.heads}

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return combine(self(images, self.eval_heads), self.eval_heads)

    def no_weight_decay(self) -> set[str]:
        """Student parameters exempt from weight decay (position embeddings, tokens), as timm reads it."""
        inner = getattr(self.student, "no_weight_decay", None)
        return {f"student.{name}" for name in (inner() if inner else ())}

    def eval_parameters(self) -> int:
        """Parameters used at inference: the student and the heads that make the prediction."""
        used = sum(p.numel() for p in self.student.parameters())
        return used + sum(p.numel() for n in self.eval_heads for p in self.heads[n].parameters())


def build_distill_model(plugins, student: nn.Module, heads: dict[str, dict], eval_heads: list[str]) -> DistillModel:
    """A student with heads built from resolved tables, ``{"plugin", "embedding", "kwargs"}`` per head
    (the form ``student.safetensors`` stores)."""
    built = {name: plugins.get("head", h["plugin"])(**h["kwargs"]) for name, h in heads.items()}
    return DistillModel(student, built, {name: h["embedding"] for name, h in heads.items()}, eval_heads)


def combine(logits: dict[str, torch.Tensor], heads: list[str]) -> torch.Tensor:
    """The prediction: the mean of the named heads' logits."""
    return torch.stack([logits[name].float() for name in heads]).mean(0)




def prediction_names(heads: list[str]) -> list[str]:
    """What ``predictions`` returns for these heads, in its order."""
    return [*heads, "eval", *(["heads_mean"] if len(heads) > 1 else [])]


def predictions(logits: dict[str, torch.Tensor], eval_heads: list[str]) -> dict[str, torch.Tensor]:
    """Every head's logits plus ``eval`` (the mean of ``eval_heads``, the model's prediction) and, with
    several heads, ``heads_mean`` (the mean of all of them: the released CivT code's rule)."""
    out = {**logits, "eval": combine(logits, eval_heads)}
    if len(logits) > 1:
        out["heads_mean"] = combine(logits, list(logits))
    return out


class Predictor(nn.Module):
    """A DistillModel as a plain classifier (its eval prediction): for FLOP counts and kdkit-trained teachers."""

    def __init__(self, model: DistillModel):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.predict(images)


class PooledStudent(nn.Module):
    """A classifier-less CNN (or any model returning pooled features) as a student: ``{"pool": features}``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.embedding_dims = {"pool": model.num_features}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pool": self.model(images)}

    def no_weight_decay(self) -> set[str]:
        inner = getattr(self.model, "no_weight_decay", None)
        return {f"model.{n}" for n in (inner() if inner else ())}
