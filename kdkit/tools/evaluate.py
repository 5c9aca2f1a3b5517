"""``kdkit eval``: how a finished run's heads relate to its teachers on the validation set.

Per-head top-1 and KL(teacher || head) (batchmean, tau 1) between every head and every teacher:
the paper's Table 4, which shows each distillation token taking after its own teacher. And a figure
of teachers' and heads' class probabilities on a few validation images (the paper's Figure 1).
Everything is rebuilt the way the run built it (same recipe, data, seed), by the same builders as
``kdkit run``, so the numbers are the run's.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.table import Table

from kdkit.builder.build import build_all_parts
from kdkit.builder.model import DistillModel, prediction_names, predictions
from kdkit.builder.parts import Parts
from kdkit.errors import KdkitError
from kdkit.plugin.discovery import default_plugins
from kdkit.recipe.experiment import Experiment, resolve
from kdkit.recipe.toml import load_recipe
from kdkit.store import export as export
from kdkit.store.rundir import RunDir
from kdkit.train.precision import autocast
from kdkit.train.processes import Processes
from kdkit.train.top1 import Top1


@dataclass
class Rebuilt:
    """A run's trained student (from its export), its teachers and its validation data."""

    path: Path
    exp: Experiment
    parts: Parts
    model: DistillModel
    device: torch.device

    def logits(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Per-head logits (and ``eval``, the model's prediction) and per-teacher logits, as in training."""
        images = images.to(self.device)
        with autocast(self.device, self.exp.train.precision):
            heads = self.model(images)
        heads = predictions(heads, self.model.eval_heads)
        mean, std = self.parts.normalization(self.device)
        return heads, {name: t.logits(images, mean, std) for name, t in self.parts.teachers.items()}


def rebuild(run_dir: str | Path, *, allow_random_teachers: bool = False, device=None) -> Rebuilt:
    """Rebuild what the run trained with; teachers without weights need ``allow_random_teachers``.

    Random teachers (smoke tests) come out identical to the run's: the parts are built after
    seeding with the run's seed, in the order ``kdkit run`` builds them.
    """
    rundir = RunDir(run_dir)
    if not rundir.path.is_dir():
        raise KdkitError(f"{run_dir}: no such run directory")
    for file in (rundir.summary, rundir.recipe, rundir.export):
        if not file.is_file():
            raise KdkitError(f"{run_dir}: not a finished run directory (no {file.name})")
    plugins = default_plugins()
    exp = resolve(load_recipe(rundir.recipe), plugins, allow_random_teachers=True)
    random = [name for name, t in exp.teachers.items()
              if t.spec is not None and not (t.checkpoint or t.pretrained or t.recipe)]
    if random and not allow_random_teachers:
        raise KdkitError(f"{run_dir}: the run used random teachers (no weights for {', '.join(map(repr, random))}); "
                         "--allow-random-teachers rebuilds the same random teachers from the run's seed")
    device = device or Processes().device()  # one process
    parts = build_all_parts(exp, plugins, device, train_teachers=False, caches=False)  # live teachers, never a cache
    model = export.load(rundir.export, plugins).to(device)
    if model.meta["class_names"] != list(parts.splits.class_names):
        raise KdkitError(f"{run_dir}: the student was trained on other classes than the recipe's data now has")
    return Rebuilt(rundir.path, exp, parts, model, device)


@dataclass
class Evaluation:
    """Validation top-1 (%) per head, ``eval`` and teacher; KL(teacher || head) per head and teacher."""

    run: str
    images: int
    top1: dict[str, float]
    teacher_top1: dict[str, float]
    kl: dict[str, dict[str, float]]  # head -> teacher -> KL(teacher || head), batchmean, tau 1

    def to_json(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate(rebuilt: Rebuilt) -> Evaluation:
    """One pass over the validation set, exactly as the run's per-epoch evaluation batches it."""
    loader = rebuilt.parts.loaders.val
    head_top1 = Top1(prediction_names(list(rebuilt.model.heads)))
    teacher_top1 = Top1(rebuilt.parts.teachers)
    kl: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for images, labels in loader:
        heads, teachers = rebuilt.logits(images)
        labels = labels.to(rebuilt.device)
        head_top1.add(heads, labels)
        teacher_top1.add(teachers, labels)
        for head, head_logits in heads.items():
            for teacher, teacher_logits in teachers.items():
                kl[head][teacher] += F.kl_div(head_logits.double().log_softmax(-1),
                                              teacher_logits.double().log_softmax(-1),
                                              log_target=True, reduction="sum").item()
    total = head_top1.images

    return Evaluation(str(rebuilt.path), total, head_top1.percent(), teacher_top1.percent(),
                      {head: {t: value / total for t, value in row.items()} for head, row in kl.items()})


def table(ev: Evaluation) -> Table:
    """Heads (and the eval prediction) as rows: top-1 and KL from each teacher; then the teachers' top-1."""
    teachers = list(ev.teacher_top1)
    out = Table("", "top-1 %", *(f"KL({t} ‖ head)" for t in teachers),
                title=f"{ev.run}: {ev.images} validation images")
    for head, value in ev.top1.items():
        out.add_row(f"head {head}" if head != "eval" else "eval", f"{value:.2f}",
                    *(f"{ev.kl[head][t]:.4f}" for t in teachers))
    for teacher, value in ev.teacher_top1.items():
        out.add_row(f"teacher {teacher}", f"{value:.2f}", *([""] * len(teachers)))
    return out


@torch.no_grad()
def figure(rebuilt: Rebuilt, path: str | Path, count: int = 4) -> None:
    """A PNG: ``count`` validation images (spread over the set), each with every teacher's and head's
    class probabilities as bars, the true class in orange."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    splits, val_set = rebuilt.parts.splits, rebuilt.parts.val_set
    count = max(1, min(count, len(val_set)))
    indices = torch.linspace(0, len(val_set) - 1, count).round().long().tolist()
    images, labels = zip(*(val_set[i] for i in indices))
    images = torch.stack(images)
    heads, teachers = rebuilt.logits(images)
    panels = {**{f"teacher {n}": v for n, v in teachers.items()},
              **{f"head {n}": v for n, v in heads.items() if n != "eval"}}
    classes = splits.class_names
    mean = torch.tensor(splits.mean).view(-1, 1, 1)
    std = torch.tensor(splits.std).view(-1, 1, 1)
    fig = Figure(figsize=(2.2 * (1 + len(panels)), 2.0 * count), layout="constrained")
    axes = fig.subplots(count, 1 + len(panels), squeeze=False)
    for row, (image, label) in enumerate(zip(images, labels)):
        picture = (image * std + mean).clamp(0, 1).permute(1, 2, 0).squeeze(-1).numpy()
        axes[row, 0].imshow(picture, cmap="gray" if picture.ndim == 2 else None)
        axes[row, 0].set_title(f"true: {classes[label]}", fontsize=8)
        axes[row, 0].axis("off")
        for ax, (title, logits) in zip(axes[row, 1:], panels.items()):
            probs = logits[row].softmax(-1).cpu().numpy()
            ax.bar(range(len(probs)), probs, color=["tab:orange" if c == label else "tab:blue"
                                                    for c in range(len(probs))])
            ax.set_ylim(0, 1)
            ax.set_title(title, fontsize=8)
            if len(classes) <= 20:
                ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=6)
            else:
                ax.set_xticks([])
            ax.tick_params(axis="y", labelsize=6)
    fig.savefig(path, format="png", dpi=100)
