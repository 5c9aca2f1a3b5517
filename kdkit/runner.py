"""``kdkit run``: recipe -> validated experiment -> built parts -> training -> run directory."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from kdkit import export
from kdkit.build import Experiment, check_heads, default_device, resolve
from kdkit.checkpoint import load_weights, save_checkpoint
from kdkit.config import cache_root, default_data_root
from kdkit.data import DatasetSplits, Targets, build_loaders, split_datasets
from kdkit.engine import LossTerm, Trainer, create_state
from kdkit.errors import KdkitError
from kdkit.model import DistillModel, Predictor
from kdkit.plugins import Plugins, default_plugins
from kdkit.recipe import load_recipe
from kdkit.rundir import RunDir, default_run_dir, provenance
from kdkit.teacher import Teacher


@dataclass
class Parts:
    """Everything built from an experiment, before training starts."""

    splits: DatasetSplits
    train_set: torch.utils.data.Dataset
    val_set: torch.utils.data.Dataset
    model: DistillModel
    teachers: dict[str, Teacher]
    terms: list[LossTerm]
    export_meta: dict


def build_parts(exp: Experiment, plugins: Plugins, device: torch.device) -> Parts:
    """Build data, student, heads, teachers and losses; raises on anything the recipe got wrong."""
    data = exp.data
    splits = exp.dataset.build(plugins, root=data.root or default_data_root(), image_size=data.image_size,
                               augment=exp.augment, num_classes=data.num_classes)
    train_set, val_set = split_datasets(splits, data)
    context = dict(num_classes=splits.num_classes, in_chans=splits.in_chans, img_size=data.image_size)

    student_kwargs = exp.student.call_kwargs(plugins, **context)
    student = plugins.get("student", exp.student.plugin)(**student_kwargs)
    dims = getattr(student, "embedding_dims", None)
    if not isinstance(dims, dict) or not dims:
        raise KdkitError(f"student plugin {exp.student.plugin!r} breaks the student contract: its module "
                         "needs an 'embedding_dims' dict naming each embedding it returns and its size")
    head_specs = check_heads(exp, dims)
    head_kwargs = {name: h.spec.call_kwargs(plugins, in_features=dims[h.embedding], num_classes=splits.num_classes)
                   for name, h in head_specs.items()}
    heads = {name: plugins.get("head", h.spec.plugin)(**head_kwargs[name]) for name, h in head_specs.items()}
    model = DistillModel(student, heads, {n: h.embedding for n, h in head_specs.items()}, exp.eval.heads).to(device)

    needed = {t for loss in exp.losses for t in loss.teachers}
    teachers = {name: build_teacher(exp, name, plugins, splits, device) for name in exp.teachers if name in needed}
    terms = [LossTerm(loss.term, loss.fn, loss.head, loss.teachers, loss.weight) for loss in exp.losses]
    export_meta = {
        "name": exp.name,
        "student": {"plugin": exp.student.plugin, "kwargs": student_kwargs},
        "heads": {n: {"plugin": h.spec.plugin, "embedding": h.embedding, "kwargs": head_kwargs[n]}
                  for n, h in head_specs.items()},
        "eval": {"heads": exp.eval.heads},
        "class_names": list(splits.class_names),
        "num_classes": splits.num_classes,
        "in_chans": splits.in_chans,
        "image_size": data.image_size,
        "mean": list(splits.mean),
        "std": list(splits.std),
    }
    return Parts(splits, train_set, val_set, model, teachers, terms, export_meta)


def build_teacher(exp: Experiment, name: str, plugins: Plugins, splits: DatasetSplits,
                  device: torch.device) -> Teacher:
    spec = exp.teachers[name]
    bf16 = spec.precision == "bf16" or (spec.precision == "auto" and device.type == "cuda")
    if spec.spec is None:  # a kdkit export: its own model, normalization and class list
        trained = export.load(spec.checkpoint, plugins)
        meta = trained.meta
        if meta["class_names"] != list(splits.class_names):
            raise exp.recipe.error(f"teachers.{name}.checkpoint", "the teacher was trained on other classes "
                                   f"(or in another order) than this dataset's: {meta['class_names'][:5]}...")
        return Teacher(Predictor(trained), mean=meta["mean"], std=meta["std"],
                       input_size=meta["image_size"], bf16=bf16).to(device)
    context = dict(num_classes=splits.num_classes, in_chans=splits.in_chans, img_size=exp.data.image_size)
    if spec.pretrained:
        context["pretrained"] = True
    model = spec.spec.build(plugins, **context)
    if spec.checkpoint:
        load_weights(model, spec.checkpoint)
    if spec.pretrained:  # timm's pretrained_cfg says how the weights expect their input
        size = getattr(model, "pretrained_cfg", {}).get("input_size", (0, exp.data.image_size))[-1]
        return Teacher(model, input_size=size, bf16=bf16).to(device)
    return Teacher(model, mean=splits.mean, std=splits.std, bf16=bf16).to(device)


def count_flops(model: DistillModel, in_chans: int, image_size: int) -> int | None:
    """FLOPs of one image through the eval prediction, by mmengine's analysis (None if it cannot trace)."""
    from mmengine.analysis import FlopAnalyzer

    param = next(model.parameters())
    x = torch.zeros(1, in_chans, image_size, image_size, device=param.device)
    try:
        analyzer = FlopAnalyzer(Predictor(model).eval(), inputs=(x,))
        analyzer.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        return int(analyzer.total())
    except Exception:  # a model the tracer cannot follow still trains; its FLOPs are just unknown
        return None


def teacher_run_dir(recipe) -> Path:
    """Where the teacher trained by ``recipe`` is cached: keyed by the resolved teacher recipe."""
    return cache_root() / "teachers" / f"{recipe.table['name']}-{recipe.hash()}"


def ensure_teachers(exp: Experiment, *, train_teachers: bool, console: Console) -> None:
    """Train every teacher given by a recipe that is not cached yet, then point it at its run."""
    for name, spec in exp.teachers.items():
        if spec.recipe is None:
            continue
        out = teacher_run_dir(spec.recipe)
        done = (out / "summary.json").is_file() and RunDir(out).read_summary().get("status") == "completed"
        if not done:
            if not train_teachers:
                raise exp.recipe.error(f"teachers.{name}.recipe", f"teacher not trained yet ({out} is missing); "
                                       "run without --no-train-teachers to train it")
            console.print(f"[bold]training teacher {name!r}[/] from {spec.recipe.path} into {out}")
            run(spec.recipe.path, out=out, force=True, console=console)
        spec.checkpoint = str(out)


def run(recipe_path, overrides=(), out=None, *, force: bool = False, allow_random_teachers: bool = False,
        train_teachers: bool = True, console: Console | None = None) -> Path:
    """Validate, build and train one recipe (training missing teachers first); returns the run directory."""
    console = console or Console()
    plugins = default_plugins()
    recipe = load_recipe(recipe_path, list(overrides))
    exp = resolve(recipe, plugins, allow_random_teachers=allow_random_teachers)
    rundir = RunDir(out or default_run_dir(recipe))
    rundir.check_writable(force)
    ensure_teachers(exp, train_teachers=train_teachers, console=console)
    device = default_device()
    torch.manual_seed(exp.seed)  # model initialisation
    parts = build_parts(exp, plugins, device)
    rundir.create(recipe.to_toml())
    return Session(exp, parts, rundir, recipe.hash(), device, console).run()


class Session:
    """One training run writing into its run directory, with progress and a summary on screen."""

    def __init__(self, exp: Experiment, parts: Parts, rundir: RunDir, recipe_hash: str, device, console: Console):
        self.exp, self.parts, self.rundir, self.device, self.console = exp, parts, rundir, device, console
        cfg = exp.train
        self.loaders = build_loaders(parts.train_set, parts.val_set, exp.data, batch_size=cfg.batch_size,
                                     seed=exp.seed, repeats=exp.augment.repeated_aug)
        self.state = create_state(parts.model, cfg, len(self.loaders.train))
        self.trainer = Trainer(self.state, parts.teachers, parts.terms, self.loaders,
                               Targets(exp.augment, parts.splits.num_classes, exp.seed), cfg, seed=exp.seed,
                               device=device, mean=parts.splits.mean, std=parts.splits.std)
        self.summary = {
            "name": exp.name, "seed": exp.seed, "status": "running", "epochs": 0, "top1": {},
            "best_top1": None, "best_epoch": None, "teacher_top1": {},
            "params": parts.model.eval_parameters(),
            "flops": count_flops(parts.model, parts.splits.in_chans, exp.data.image_size),
            "train_images_per_s": None, "infer_images_per_s": None, "wall_s": 0.0,
            **provenance(recipe_hash),
        }

    def run(self) -> Path:
        start = time.perf_counter()
        self.rundir.write_summary(self.summary)
        try:
            self.evaluate_teachers()
            self.train()
            self.summary["status"] = "completed"
        except KeyboardInterrupt:
            self.summary["status"] = "interrupted"
            raise
        except BaseException:
            self.summary["status"] = "failed"
            raise
        finally:
            self.summary["wall_s"] = round(time.perf_counter() - start, 2)
            self.rundir.write_summary(self.summary)
        self.print_summary()
        return self.rundir.path

    def evaluate_teachers(self) -> None:
        chance = 100.0 / self.parts.splits.num_classes
        for name in self.parts.teachers:
            top1 = self.trainer.evaluate_teacher(name)
            self.summary["teacher_top1"][name] = top1
            if top1 < 2 * chance:
                self.console.print(f"[bold red]WARNING: teacher {name!r} is near chance on validation: "
                                   f"{top1:.2f}% (chance {chance:.2f}%). Wrong weights, input normalization "
                                   "or class order?[/]")
            else:
                self.console.print(f"teacher {name!r}: validation top-1 {top1:.2f}%")

    def train(self) -> None:
        exp, state, summary = self.exp, self.state, self.summary
        steps = len(self.loaders.train)
        columns = [TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"), BarColumn(),
                   MofNCompleteColumn(), TextColumn("{task.fields[info]}"), TimeRemainingColumn()]
        train_speed = []
        with Progress(*columns, console=self.console, transient=False) as progress:
            task = progress.add_task("train", total=steps * exp.train.epochs, epoch=1,
                                     epochs=exp.train.epochs, info="")

            def on_step(i, values, lr, speed):
                info = " ".join(f"{k} {v:.3f}" for k, v in values.items())
                progress.update(task, advance=1, info=f"{info} lr {lr:.2e} {speed:.0f} img/s")

            for epoch in range(state.epoch, exp.train.epochs):
                progress.update(task, epoch=epoch + 1)
                row = self.trainer.train_epoch(epoch, on_step)
                top1, infer_speed = self.trainer.evaluate()
                state.epoch = epoch + 1
                row = {"epoch": epoch + 1, **row, "top1": top1}
                state.history.append(row)
                self.rundir.append_metrics(row)
                train_speed.append(row["images_per_s"])
                if top1["eval"] > state.best_top1:
                    state.best_top1, state.best_epoch = top1["eval"], epoch + 1
                    save_checkpoint(self.rundir.best, state.state_dict())
                save_checkpoint(self.rundir.last, state.state_dict())
                summary.update(epochs=state.epoch, top1=top1, best_top1=state.best_top1,
                               best_epoch=state.best_epoch, infer_images_per_s=infer_speed,
                               train_images_per_s=sum(train_speed) / len(train_speed))
                self.rundir.write_summary(summary)
                progress.console.print(f"epoch {epoch + 1}: " + " ".join(f"{k} {v:.2f}%" for k, v in top1.items()))
        export.save(self.rundir.export, state.model, self.parts.export_meta)

    def print_summary(self) -> None:
        s = self.summary
        table = Table(title=f"{s['name']} (seed {s['seed']}): {s['status']}", show_header=False)
        table.add_row("run directory", str(self.rundir.path))
        table.add_row("epochs", str(s["epochs"]))
        for head, value in s["top1"].items():
            table.add_row(f"top-1 {head}", f"{value:.2f}%")
        table.add_row("best eval top-1", f"{s['best_top1']:.2f}% (epoch {s['best_epoch']})")
        for name, value in s["teacher_top1"].items():
            table.add_row(f"teacher {name}", f"{value:.2f}%")
        table.add_row("parameters", f"{s['params']:,}")
        table.add_row("FLOPs / image", f"{s['flops']:,}" if s["flops"] else "n/a")
        table.add_row("train / infer img/s", f"{s['train_images_per_s']:.0f} / {s['infer_images_per_s']:.0f}")
        table.add_row("wall time", f"{s['wall_s']:.1f} s")
        self.console.print(table)
