"""The core recipe sections, as typed dataclasses: their fields are the public recipe keys.

Plugin tables (``student``, ``teachers.<name>``, ``heads.<name>``, ``[[losses]]`` and the dataset's
own keys in ``data``) take a few core keys listed here and pass the rest to the plugin factory.
"""
from __future__ import annotations

import os
from pathlib import Path
from dataclasses import dataclass, field
from typing import Annotated, Literal

from kdkit.recipe.schema import Range

Precision = Literal["auto", "fp32", "bf16"]

# The documented maxima (README): beyond them a value is a typo, not a plan.
MAX_IMAGE_SIZE = 4096
MAX_EPOCHS = 100_000
MAX_BATCH = 65_536
MAX_CLASSES = 100_000

Count = Annotated[int, Range(ge=0)]  # 0 often means "all" or "off"
Probability = Annotated[float, Range(ge=0, le=1)]
Epochs = Annotated[int, Range(ge=0, le=MAX_EPOCHS)]
Batch = Annotated[int, Range(ge=1, le=MAX_BATCH)]


def cache_root() -> Path:
    """``$KDKIT_CACHE`` if set, else a per-user cache folder (decoded data, trained teachers)."""
    if os.environ.get("KDKIT_CACHE"):
        return Path(os.environ["KDKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kdkit"


def default_data_root() -> str:
    """``$KDKIT_DATA`` if set, else a per-user cache folder."""
    if os.environ.get("KDKIT_DATA"):
        return os.environ["KDKIT_DATA"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "kdkit", "data")


@dataclass
class DataConfig:
    """``[data]``: which dataset, and how much of it (``limit_*``: 0 = all, N = class-stratified subset)."""

    dataset: str = "fake"
    root: str = ""
    image_size: Annotated[int, Range(ge=1, le=MAX_IMAGE_SIZE)] = 224
    num_classes: Annotated[int, Range(ge=0, le=MAX_CLASSES)] = 0  # 0 = the dataset's
    limit_train: Count = 0
    limit_val: Count = 0
    val_split: Annotated[float, Range(ge=0, lt=1)] = 0.0
    batch_size_eval: Batch = 256
    workers: Annotated[int, Range(ge=0, le=256)] = 2


@dataclass
class TrainConfig:
    """``[train]``: optimisation. ``batch_size`` is per optimizer step, split into ``accum_steps`` micro-batches."""

    epochs: Epochs = 300  # 0: evaluate without training
    batch_size: Batch = 256
    lr: Annotated[float, Range(gt=0)] = 5e-4
    min_lr: Annotated[float, Range(ge=0)] = 1e-5
    warmup_epochs: Epochs = 5
    warmup_lr: Annotated[float, Range(ge=0)] = 1e-6
    weight_decay: Annotated[float, Range(ge=0)] = 0.05
    optimizer: str = "adamw"
    momentum: Annotated[float, Range(ge=0, lt=1)] = 0.9
    clip_grad: Annotated[float, Range(ge=0)] = 0.0  # 0: no clipping
    accum_steps: Batch = 1
    precision: Precision = "auto"
    compile: bool = False  # torch.compile the student and its heads (training forward)


@dataclass
class AugmentConfig:
    """``[augment]``: the DeiT recipe's augmentation, through timm's transforms and Mixup."""

    rand_augment: str = ""
    mixup: Annotated[float, Range(ge=0)] = 0.0  # Beta(alpha, alpha) of the mixing coefficient; 0 = off
    cutmix: Annotated[float, Range(ge=0)] = 0.0
    label_smoothing: Annotated[float, Range(ge=0, lt=1)] = 0.0
    random_erasing: Probability = 0.0
    interpolation: str = "bicubic"
    repeated_aug: Annotated[int, Range(ge=1, le=64)] = 1  # 1 = off
    crop_scale: list[Annotated[float, Range(gt=0, le=1)]] = field(default_factory=lambda: [0.08, 1.0])
    hflip: Probability = 0.5

    @property
    def mixing(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


@dataclass
class EvalConfig:
    """``[eval]``: the heads whose logits are averaged into the prediction (paper: class token only)."""

    heads: list[str] = field(default_factory=lambda: ["cls"])


# Core keys of the plugin tables (the rest of each table goes to the plugin factory).
@dataclass
class CacheSettings:
    """``[teacher_cache]``: read the teachers' outputs from a cache of pre-drawn views instead of running them."""

    # views per training image; 0 = train.epochs * augment.repeated_aug
    views: Annotated[int, Range(ge=0, le=MAX_EPOCHS)] = 0
    # 0 = every class's logit; k > 0 = the k largest logits and the log-sum-exp
    top_k: Annotated[int, Range(ge=0, le=MAX_CLASSES)] = 0
    root: str = ""  # where the caches live; default $KDKIT_CACHE/teacher_outputs


PREDICTIONS = ("eval", "heads_mean")  # names the heads cannot take: evaluation reports these too

STUDENT_KEYS = {"plugin", "checkpoint"}
TEACHER_KEYS = {"plugin", "checkpoint", "pretrained", "precision", "recipe", "classes", "compile", "mean", "std",
                "input_size"}
TEACHER_INPUT_KEYS = {"classes", "mean", "std", "input_size"}  # what a kdkit export carries itself
HEAD_KEYS = {"plugin", "embedding"}
LOSS_KEYS = {"plugin", "head", "teachers", "weight"}
CALLBACK_KEYS = {"plugin"}
TOP_LEVEL_KEYS = {"name", "seed", "extends", "data", "student", "teachers", "heads", "losses",
                  "train", "augment", "eval", "callbacks", "teacher_cache"}
# The callbacks every run uses; a recipe's [callbacks.<name>] tables add to them.
RUN_CALLBACKS = ("run_files", "checkpoints", "export")
