"""Building what a checked ``Experiment`` describes: data, loaders, the student and its heads, teachers.

Shared by ``kdkit run``, ``kdkit eval``, ``kdkit.build_model`` and the tests. Building is the second
half of checking: it reads the data and the weights, so it refuses with a ``KdkitError`` what only
they can tell (a training set smaller than one batch, a student whose outputs do not match its
declared embeddings, weights that do not fit, a teacher with the wrong number of classes). It
writes nothing.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kdkit.builder.data import DatasetSplits, Loaders, build_loaders, indices_of, split_datasets
from kdkit.builder.model import DistillModel, Predictor, build_distill_model
from kdkit.builder.teacher import Teacher, weights_hash
from kdkit.builder.teacher_cache import views_of
from kdkit.errors import KdkitError
from kdkit.plugin.discovery import Plugins, default_plugins
from kdkit.recipe.experiment import Experiment, check_heads
from kdkit.recipe.schema import check_table
from kdkit.recipe.sections import default_data_root
from kdkit.store import export as export
from kdkit.store.checkpoint import load_weights
from kdkit.train.precision import uses_bf16
from kdkit.train.processes import Processes


@dataclass(frozen=True)
class Parts:
    """Everything built from an experiment. ``build_parts`` builds the student's side; the teachers
    (``build_teachers``) and their caches (when the recipe reads teachers from a cache) are added by
    ``dataclasses.replace``, so a ``Parts`` never changes once built."""

    splits: DatasetSplits
    train_set: torch.utils.data.Dataset
    val_set: torch.utils.data.Dataset
    loaders: Loaders
    model: DistillModel
    export_meta: dict
    teachers: dict[str, Teacher] = field(default_factory=dict)
    teacher_outputs: dict | None = None

    @functools.cached_property
    def teacher_hashes(self) -> dict[str, str]:
        """Each teacher's weights hash: what a resumed run and a teacher-output cache check."""
        return {name: weights_hash(teacher.model) for name, teacher in self.teachers.items()}

    @functools.cached_property
    def train_indices(self) -> list[int]:
        """The training images' positions in the dataset's training split (after held-out and subset)."""
        return indices_of(self.train_set)

    def normalization(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The data's mean and std as (1, C, 1, 1) tensors: what teachers re-normalize from."""
        return tuple(torch.tensor(v, device=device).view(1, -1, 1, 1) for v in (self.splits.mean, self.splits.std))


def build_splits(exp: Experiment, plugins: Plugins) -> DatasetSplits:
    """The dataset plugin's splits, before subsets and held-out validation."""
    data = exp.data
    return exp.dataset.build(plugins, root=data.root or default_data_root(), image_size=data.image_size,
                             augment=exp.augment, num_classes=data.num_classes)


def build_parts(exp: Experiment, plugins: Plugins, device: torch.device, processes: Processes = Processes()) -> Parts:
    """Data, loaders, the student with its heads, checked by a one-image forward.

    With several processes ``train.batch_size`` stays the global batch, split evenly among them.
    """
    data, train = exp.data, exp.train
    if train.batch_size % (processes.world * train.accum_steps):
        raise exp.recipe.error("train.batch_size", f"{train.batch_size} does not split into {processes.world} "
                               f"processes x {train.accum_steps} micro-batches (train.accum_steps) of equal size")
    splits = build_splits(exp, plugins)
    train_set, val_set = split_datasets(splits, data)
    test_set = splits.val if data.val_split > 0 else None  # else the validation set is the test split
    views = views_of(exp) if exp.teacher_cache else 0
    loaders = build_loaders(train_set, val_set, test_set, data, batch_size=train.batch_size, seed=exp.seed,
                            repeats=exp.augment.repeated_aug, views=views, rank=processes.rank,
                            world=processes.world)
    if len(loaders.train) == 0:
        raise exp.recipe.error("train.batch_size", f"the training set has {len(train_set)} images, fewer than "
                               f"one batch of {exp.train.batch_size} (see data.limit_train and data.val_split)")
    if len(val_set) == 0:
        raise exp.recipe.error("data.limit_val", "the validation set is empty")

    model, export_meta = build_student(exp, plugins, splits, device)
    probe_student(model, exp.student.plugin, val_set[0][0], splits.num_classes)
    return Parts(splits, train_set, val_set, loaders, model, export_meta)


def build_student(exp: Experiment, plugins: Plugins, splits: DatasetSplits,
                  device: torch.device) -> tuple[DistillModel, dict]:
    """The student with its heads for ``splits``' classes and channels (from ``student.checkpoint`` when the
    recipe names one), and the metadata its export records to rebuild it. Needs no data but the splits'."""
    data = exp.data
    context = dict(num_classes=splits.num_classes, in_chans=splits.in_chans, img_size=data.image_size)
    student_kwargs = exp.student.call_kwargs(plugins, **context)
    student = plugins.get("student", exp.student.plugin)(**student_kwargs)
    dims = getattr(student, "embedding_dims", None)
    if not isinstance(dims, dict) or not dims:
        raise KdkitError(f"student plugin {exp.student.plugin!r} breaks the student contract: its module "
                         "needs an 'embedding_dims' dict naming each embedding it returns and its size")
    heads = {name: {"plugin": h.spec.plugin, "embedding": h.embedding,
                    "kwargs": h.spec.call_kwargs(plugins, in_features=dims[h.embedding],
                                                 num_classes=splits.num_classes)}
             for name, h in check_heads(exp, dims).items()}
    model = build_distill_model(plugins, student, heads, exp.eval.heads)
    if exp.student_checkpoint:
        load_student(model, exp.student_checkpoint, plugins)
    export_meta = {
        "name": exp.name,
        "student": {"plugin": exp.student.plugin, "kwargs": student_kwargs},
        "heads": heads,
        "eval": {"heads": exp.eval.heads},
        "class_names": list(splits.class_names),
        "num_classes": splits.num_classes,
        "in_chans": splits.in_chans,
        "image_size": data.image_size,
        "crop_pct": splits.crop_pct,
        "mean": list(splits.mean),
        "std": list(splits.std),
    }
    return model.to(device), export_meta


def load_student(model: DistillModel, path: str, plugins: Plugins) -> None:
    """Start the student and its heads from a checkpoint: kdkit's own names, or a layout a plugin converts."""
    load_weights(model, path, what="the student and its heads",
                 convert=lambda state: plugins.manager.hook.kdkit_convert_checkpoint(state_dict=state))


@torch.no_grad()
def probe_student(model: DistillModel, plugin: str, image: torch.Tensor, num_classes: int) -> None:
    """One image through the student (eval mode) and its heads: the outputs must match what they declare."""
    x = image.unsqueeze(0).to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        try:
            features = model.student(x)
        except (AssertionError, RuntimeError, ValueError) as exc:  # e.g. an image smaller than a patch
            raise KdkitError(f"student plugin {plugin!r} cannot take one {x.shape[-2]}x{x.shape[-1]} image "
                             f"(data.image_size, or the student's size keys): {exc}") from None
        if not isinstance(features, dict):
            raise KdkitError(f"student plugin {plugin!r} breaks the student contract: forward must return a dict "
                             f"of named embeddings, got {type(features).__name__}")
        for name, dim in model.student.embedding_dims.items():
            value = features.get(name)
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != (1, dim):
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else "nothing"
                raise KdkitError(f"student plugin {plugin!r} declares embedding {name!r} of size {dim} but returns "
                                 f"{got} for one image (expected (1, {dim}))")
        for name, head in model.heads.items():
            logits = head(features[model.embeddings[name]])
            if tuple(logits.shape) != (1, num_classes):
                raise KdkitError(f"heads.{name}: gives {tuple(logits.shape)} for one image, expected (1, "
                                 f"{num_classes}): one logit per class")
    finally:
        model.train(was_training)


def build_teachers(exp: Experiment, plugins: Plugins, parts: Parts, device: torch.device,
                   runs: dict[str, Path] | None = None, skip=()) -> dict[str, Teacher]:
    """The teachers the losses name (but those in ``skip``), each checked on one image: one logit per class
    of the data. A teacher given by a recipe is loaded from its trained run in ``runs``
    (``kdkit.builder.build.ensure_teachers``)."""
    image = parts.val_set[0][0].unsqueeze(0).to(device)
    teachers = {}
    for name in exp.needed_teachers:
        if name in skip:
            continue
        teacher = build_teacher(exp, name, plugins, parts.splits, device, (runs or {}).get(name))
        with torch.no_grad():
            logits = teacher.logits(image, *parts.normalization(device))
        if tuple(logits.shape) != (1, parts.splits.num_classes):
            raise exp.recipe.error(f"teachers.{name}", f"the teacher gives {tuple(logits.shape)} for one image, "
                                   f"expected (1, {parts.splits.num_classes}): one logit per class of the data")
        teachers[name] = teacher
    return teachers


def build_teacher(exp: Experiment, name: str, plugins: Plugins, splits: DatasetSplits, device: torch.device,
                  run: Path | None = None) -> Teacher:
    """One teacher, its outputs mapped onto the data's classes when it names its own (``classes``); ``run``
    is the trained run of a teacher given by a recipe."""
    spec = exp.teachers[name]
    options = dict(bf16=uses_bf16(spec.precision, device), compile=spec.compile)
    if spec.spec is None:  # a kdkit export (or a recipe's run): its own model, normalization and class list
        if spec.recipe is not None and run is None:
            raise KdkitError(f"teachers.{name}: given by {spec.recipe.path}, which has not trained it yet")
        trained = export.load(run or spec.checkpoint, plugins)
        meta = trained.meta
        index = class_index(exp, f"teachers.{name}.checkpoint", meta["class_names"], splits.class_names)
        return Teacher(Predictor(trained), mean=meta["mean"], std=meta["std"], input_size=meta["image_size"],
                       class_index=index, **options).to(device)
    if spec.mean and len(spec.mean) != splits.in_chans:
        raise exp.recipe.error(f"teachers.{name}.mean", f"{len(spec.mean)} values for the data's {splits.in_chans} "
                               "channels: give one mean and one std per channel")
    outputs = len(spec.classes) if spec.classes else splits.num_classes
    context = dict(num_classes=outputs, in_chans=splits.in_chans, img_size=exp.data.image_size)
    if spec.pretrained:
        context["pretrained"] = True
    model = spec.spec.build(plugins, **context)
    if spec.checkpoint:
        load_weights(model, spec.checkpoint, what=f"teachers.{name}", hint=(
            f". Weights for another number of classes need teachers.{name}.classes (the checkpoint's class names "
            "in output order); a network built with other keys than the checkpoint's (depth, width, small_input, "
            f"model_kwargs) needs those keys in teachers.{name}"))
    index = class_index(exp, f"teachers.{name}.classes", spec.classes, splits.class_names) if spec.classes else None
    options["channels_last"] = device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules())
    if spec.pretrained:  # timm's pretrained_cfg says how the weights expect their input
        cfg = getattr(model, "pretrained_cfg", {})
        if cfg.get("num_classes", outputs) != outputs:
            raise exp.recipe.error(f"teachers.{name}.pretrained", f"the pretrained classifier has "
                                   f"{cfg['num_classes']} classes and the teacher would get {outputs}: its head would "
                                   f"be random. Name the teacher's classes (teachers.{name}.classes: a list or a file "
                                   f"of its {cfg['num_classes']} class names in output order) to use the logits of "
                                   "the data's classes")
        size = spec.input_size or cfg.get("input_size", (0, exp.data.image_size))[-1]
        return Teacher(model, mean=spec.mean, std=spec.std, input_size=size, class_index=index, **options).to(device)
    mean, std = (spec.mean, spec.std) if spec.mean else (splits.mean, splits.std)
    return Teacher(model, mean=mean, std=std, input_size=spec.input_size, class_index=index, **options).to(device)


def class_index(exp: Experiment, key: str, teacher_classes: list[str], data_classes: list[str]) -> list[int] | None:
    """Where each of the data's classes sits among the teacher's outputs (None: the same list)."""
    if list(teacher_classes) == list(data_classes):
        return None
    position = {c: i for i, c in enumerate(teacher_classes)}
    missing = [c for c in data_classes if c not in position]
    if missing:
        raise exp.recipe.error(key, f"the teacher has no output for {len(missing)} of the data's {len(data_classes)} "
                               f"classes ({', '.join(missing[:5])}{'...' if len(missing) > 5 else ''}); its classes: "
                               f"{', '.join(teacher_classes[:5])}...")
    return [position[c] for c in data_classes]


def build_model(kind: str, plugins: Plugins | None = None, **table) -> nn.Module:
    """Build a student or teacher from a recipe table (``plugin`` plus its keys, ``checkpoint``...)."""
    plugins = plugins or default_plugins()
    if kind not in ("student", "teacher"):
        raise KdkitError(f"kind must be 'student' or 'teacher', got {kind!r}")
    checkpoint = table.pop("checkpoint", "")
    pretrained = table.pop("pretrained", False)
    table.pop("precision", None)
    if checkpoint and export.is_export(checkpoint):
        return export.load(checkpoint)
    name = table.pop("plugin", None)
    if name is None:
        raise KdkitError(f"build_model({kind!r}) needs plugin= (one of {', '.join(plugins.names(kind))})")
    factory = plugins.get(kind, name)
    kwargs = check_table(factory, table, kind=kind, file=None, key=kind)
    if pretrained:
        kwargs["pretrained"] = True
    model = factory(**kwargs)
    if checkpoint:
        load_weights(model, checkpoint)
    return model
