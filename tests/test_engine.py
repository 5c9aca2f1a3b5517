"""The training loop's exactness: accumulation keeps every term, teachers see the student's batch,
randomness depends on (seed, epoch, sample) only, and optimizer groups follow DeiT."""
from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import signal
import time

import pytest
import torch
import torch.distributed as dist

from conftest import TWO_TEACHER_RECIPE, make_trainer, plugins_with
from kdkit import api
from kdkit.errors import KdkitError, RunInterrupted
from kdkit.train.precision import autocast
from kdkit.train.processes import Processes
from kdkit.train.signals import StopOnSignal
from kdkit.train.step import DROP_PATH_STREAM, NonFiniteLoss
from kdkit.train.top1 import Top1


def first_batch(trainer):
    trainer.parts.loaders.sampler.set_epoch(0)
    return next(iter(trainer.parts.loaders.train))


SGD = ["train.optimizer=momentum", "train.momentum=0.0", "train.weight_decay=0.0"]  # update = -lr * gradient
UPDATE_IS_GRADIENT = [*SGD, "train.lr=1.0", "train.warmup_epochs=0", "train.min_lr=1.0"]  # lr 1 from the first step


class TwoProcesses(Processes):
    """This process and one other, without a process group: a sum adds what the other one holds
    (by default the same values as this one)."""

    def __init__(self, rank: int = 0, other: float | None = None):
        super().__init__(rank=rank, world=2)
        self.other = other

    def sum(self, tensor):
        return tensor + (tensor if self.other is None else self.other)


def test_accumulation_keeps_every_loss_term(write_recipe):
    """One update from 2 micro-batches equals one from the whole batch (no BatchNorm in this student).

    Plain SGD at lr 1, whose update is the gradient: dropping the 1 / accum_steps of each micro-batch's
    loss doubles the step (Adam would not show it: its update ignores a constant scale; nor would the
    warmup's first learning rate, 1e-6, whose steps are too small to compare).
    """
    recipe = write_recipe(TWO_TEACHER_RECIPE)
    whole = make_trainer(recipe, UPDATE_IS_GRADIENT)
    split = make_trainer(recipe, [*UPDATE_IS_GRADIENT, "train.accum_steps=2"])
    before = {k: v.clone() for k, v in whole.state.model.state_dict().items()}
    images, labels = first_batch(whole)
    logged_whole = whole.train_step(images, labels, epoch=0)
    logged_split = split.train_step(images, labels, epoch=0)
    assert set(logged_split) == {"loss", "ce/cls", "kl/conv", "kl/inv"}
    for key in logged_whole:
        assert logged_split[key] == pytest.approx(logged_whole[key], rel=1e-5), key
    assert logged_split["kl/conv"] > 0 and logged_split["kl/inv"] > 0
    for (name, a), b in zip(whole.state.model.state_dict().items(), split.state.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert sum((a - before[k]).norm() for k, a in whole.state.model.state_dict().items()) > 1  # steps to compare


def test_teachers_see_exactly_the_students_batch(write_recipe):
    trainer = make_trainer(write_recipe(TWO_TEACHER_RECIPE))
    seen = {}

    def record(name):
        def hook(module, args, output):
            seen[name] = args[0]
        return hook

    trainer.state.model.student.register_forward_hook(record("student"))
    for name, teacher in trainer.parts.teachers.items():
        teacher.model.register_forward_hook(record(name))
    images, labels = first_batch(trainer)
    trainer.train_step(images, labels, epoch=0)
    assert not torch.equal(seen["student"], images)  # mixup/cutmix changed the batch...
    assert torch.equal(seen["conv"], seen["student"])  # ...and both teachers got the mixed one
    assert torch.equal(seen["other"], seen["student"])


def test_augmentation_does_not_depend_on_loader_workers(write_recipe):
    recipe = write_recipe(TWO_TEACHER_RECIPE)
    augment = ['augment.rand_augment="rand-m9-mstd0.5-inc1"', "augment.random_erasing=0.25", "augment.repeated_aug=2"]
    batches = []
    for workers in (0, 2):
        trainer = make_trainer(recipe, [f"data.workers={workers}", *augment])
        trainer.parts.loaders.sampler.set_epoch(1)
        batches.append(next(iter(trainer.parts.loaders.train)))
    assert torch.equal(batches[0][0], batches[1][0]) and torch.equal(batches[0][1], batches[1][1])
    # repeated augmentation: consecutive copies of one image, augmented differently
    assert torch.equal(batches[0][1][0], batches[0][1][1]) and not torch.equal(batches[0][0][0], batches[0][0][1])


def test_two_trainings_with_one_seed_are_identical(write_recipe):
    recipe = write_recipe(TWO_TEACHER_RECIPE)
    results = []
    for _ in range(2):
        trainer = make_trainer(recipe)
        trainer.train_epoch(0)
        results.append((trainer.state.sums, trainer.state.model.state_dict()))
    assert results[0][0] == results[1][0]
    for key, value in results[0][1].items():
        assert torch.equal(value, results[1][1][key]), key
    other = make_trainer(recipe, ["seed=1"])
    other.train_epoch(0)
    assert other.state.sums != results[0][0]


def test_no_weight_decay_on_norms_biases_positions_and_tokens(write_recipe):
    trainer = make_trainer(write_recipe(TWO_TEACHER_RECIPE))
    names = {id(p): n for n, p in trainer.state.model.named_parameters()}
    groups = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in trainer.state.optimizer.param_groups}
    no_decay = groups[0.0]
    assert "student.model.pos_embed" in no_decay and "student.model.cls_token" in no_decay
    assert all(n in no_decay for n in names.values() if n.endswith(".bias") or ".norm" in n)
    assert "heads.cls.weight" in groups[0.05]


def test_warmup_then_cosine_per_step(write_recipe):
    trainer = make_trainer(write_recipe(TWO_TEACHER_RECIPE), ["train.epochs=4", "train.warmup_epochs=1",
                                                               "train.warmup_lr=1e-6", "train.min_lr=1e-5"])
    steps = trainer.steps_per_epoch
    lrs = []
    for step in range(4 * steps + 1):
        trainer.scheduler.step_update(step)
        lrs.append(trainer.state.optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-6)
    assert lrs[1] > lrs[0]  # warmup moves every step, not every epoch
    # after warmup, timm's cosine as DeiT uses it (no warmup prefix): the cosine curve at t = 1/4
    assert lrs[steps] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi / 4)))
    assert max(lrs) == lrs[steps]
    assert lrs[-1] == pytest.approx(1e-5, rel=0.05)


def test_bf16_autocast_trains_and_keeps_every_term(write_recipe):
    trainer = make_trainer(write_recipe(TWO_TEACHER_RECIPE), ["train.precision=bf16", 'teachers.conv.precision="bf16"'])
    images, labels = first_batch(trainer)
    logged = trainer.train_step(images, labels, epoch=0)
    assert set(logged) == {"loss", "ce/cls", "kl/conv", "kl/inv"}
    assert all(math.isfinite(v) for v in logged.values())
    assert all(p.dtype == torch.float32 for p in trainer.state.model.parameters())  # autocast, not a cast


def test_bf16_heads_and_teacher_classifiers_give_fp32_logits(write_recipe):
    """Soft targets and argmaxes come from fp32 logits: bf16's 8 mantissa bits would round them."""
    trainer = make_trainer(write_recipe(TWO_TEACHER_RECIPE), ["train.precision=bf16", 'teachers.conv.precision="bf16"'])
    images, _ = first_batch(trainer)
    model = trainer.state.model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(images)
        features = model.student(images)["pool"]
    for name, value in logits.items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, model.heads[name](features.float()), rtol=0, atol=0)
    assert (logits["cls"].bfloat16().float() != logits["cls"]).any()

    teacher = trainer.parts.teachers["conv"]
    out = teacher.logits(images, trainer.distill_step.mean, trainer.distill_step.std)
    x = teacher.normalize_input(images, trainer.distill_step.mean, trainer.distill_step.std)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        pooled = teacher.model.forward_head(teacher.model.forward_features(x), pre_logits=True)
    assert out.dtype == torch.float32 and (out.bfloat16().float() != out).any()
    torch.testing.assert_close(out, teacher.model.get_classifier()(pooled.float()), rtol=0, atol=0)


@pytest.mark.parametrize("size", [3, 8, 32, 48])
def test_a_teacher_sees_the_image_resized_to_its_size_antialiased_when_smaller(size, monkeypatch):
    """Resized only where the size differs (a batch of 8 images and 3 channels: no other dimension is 32)."""
    from kdkit.builder.teacher import Teacher

    seen, resized = {}, []
    model = torch.nn.Conv2d(3, 4, 1)
    model.register_forward_hook(lambda module, args, out: seen.update(x=args[0]))
    teacher = Teacher(torch.nn.Sequential(model, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()),
                      mean=(0.0,) * 3, std=(1.0,) * 3, input_size=size)
    images = torch.rand(8, 3, 32, 32)
    expected = torch.nn.functional.interpolate(images, size=(size, size), mode="bicubic", align_corners=False,
                                               antialias=size < 32)
    interpolate = torch.nn.functional.interpolate
    monkeypatch.setattr(torch.nn.functional, "interpolate", lambda *a, **k: resized.append(1) or interpolate(*a, **k))
    teacher.logits(images, torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1))
    torch.testing.assert_close(seen["x"], expected, rtol=0, atol=0)
    assert len(resized) == (size != 32)


def test_a_teacher_runs_its_model_as_given_unless_asked():
    """By default a teacher computes in fp32, uncompiled, in the model's own memory format."""
    from kdkit.builder.teacher import Teacher

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    teacher = Teacher(model, mean=(0.0,) * 3, std=(1.0,) * 3)
    images = torch.rand(2, 3, 8, 8)
    out = teacher.logits(images, torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1))
    assert teacher.calls[0] is model and model[0].weight.is_contiguous()
    assert torch.equal(out, model(images))


def test_compile_switches_wrap_the_student_and_the_teachers_not_their_weights(write_recipe):
    from torch._dynamo.eval_frame import OptimizedModule

    recipe = write_recipe(TWO_TEACHER_RECIPE)
    trainer = make_trainer(recipe, ["train.compile=true", "teachers.conv.compile=true"])
    forward = trainer.distill_step.forward
    assert isinstance(forward, OptimizedModule) and forward._orig_mod is trainer.state.model
    whole, features = trainer.parts.teachers["conv"].calls
    assert isinstance(whole, OptimizedModule) and not isinstance(trainer.parts.teachers["other"].calls[0],
                                                                 OptimizedModule)
    assert hasattr(features, "_torchdynamo_orig_callable")  # the bf16 path's features, compiled too
    assert trainer.parts.teacher_hashes == make_trainer(recipe).parts.teacher_hashes  # compiling keeps the weights


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_gpu_path_trains_in_bf16_with_channels_last_teachers_and_compiled_modules(write_recipe):
    trainer = make_trainer(write_recipe(TWO_TEACHER_RECIPE), ["train.compile=true", "teachers.conv.compile=true"],
                           device="cuda")
    assert trainer.device.type == "cuda" and trainer.parts.teachers["conv"].channels_last
    images, labels = first_batch(trainer)
    logged = trainer.train_step(images, labels, epoch=0)
    assert all(math.isfinite(v) for v in logged.values())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = trainer.parts.teachers["conv"].logits(images.cuda(), trainer.distill_step.mean, trainer.distill_step.std)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("clip_grad", [0.01, 0.0])
def test_gradients_are_clipped_to_clip_grad(clip_grad, write_recipe):
    """Plain SGD at lr 1: the update is the gradient, scaled to norm ``clip_grad``; 0 (the default) leaves it whole."""
    trainer = make_trainer(write_recipe(TWO_TEACHER_RECIPE), [*UPDATE_IS_GRADIENT, f"train.clip_grad={clip_grad}"])
    parameters = list(trainer.state.model.parameters())
    before = [p.detach().clone() for p in parameters]
    gradients = []
    step = trainer.state.optimizer.step
    trainer.state.optimizer.step = lambda: (gradients.extend(p.grad.clone() for p in parameters), step())[1]
    images, labels = first_batch(trainer)
    trainer.train_step(images, labels, epoch=0)
    update = torch.cat([(b - p.detach()).flatten() for p, b in zip(parameters, before)])
    gradient = torch.cat([g.flatten() for g in gradients])
    torch.testing.assert_close(update, gradient, rtol=1e-4, atol=1e-7)
    if clip_grad:
        assert update.norm().item() == pytest.approx(clip_grad, rel=1e-4)
    else:
        assert update.norm() > 1  # the whole gradient (norm 2.4); clip_grad_norm_ to 0 would zero it


def learning_rates(trainer, epochs: int) -> list[float]:
    """The learning rate of every optimizer step of ``epochs`` epochs."""
    used = []
    step = trainer.state.optimizer.step
    trainer.state.optimizer.step = lambda: (used.append(trainer.lr), step())[1]
    for epoch in range(epochs):
        trainer.train_epoch(epoch)
        trainer.state.batch = 0
    return used


def test_the_learning_rate_of_each_step_follows_warmup_then_cosine(write_recipe):
    trainer = make_trainer(write_recipe(TWO_TEACHER_RECIPE), ["train.epochs=2", "train.warmup_epochs=1",
                                                              "train.warmup_lr=1e-6", "train.min_lr=1e-5"])
    n = trainer.steps_per_epoch
    warmup = [1e-6 + (1e-3 - 1e-6) * s / n for s in range(n)]  # timm: linear from warmup_lr, per step
    # then the cosine over the whole run (DeiT's timm schedule: the warmup replaces its start)
    cosine = [1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * s / (2 * n))) for s in range(n, 2 * n)]
    assert learning_rates(trainer, 2) == pytest.approx(warmup + cosine, rel=1e-6)


def test_a_one_epoch_run_has_its_whole_cosine_in_that_epoch(write_recipe):
    trainer = make_trainer(write_recipe(TWO_TEACHER_RECIPE), ["train.epochs=1", "train.warmup_epochs=0",
                                                              "train.min_lr=1e-5"])
    n = trainer.steps_per_epoch
    cosine = [1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * s / n)) for s in range(n)]
    assert learning_rates(trainer, 1) == pytest.approx(cosine, rel=1e-6)


def test_a_teacher_never_leaves_eval_mode(write_recipe):
    trainer = make_trainer(write_recipe(TWO_TEACHER_RECIPE))
    teacher = trainer.parts.teachers["conv"]
    stats = {k: v.clone() for k, v in teacher.model.state_dict().items() if "running" in k}
    assert stats  # a BatchNorm teacher: training mode would move these
    trainer.state.model.train()
    teacher.train()
    trainer.train_epoch(0)
    assert not any(m.training for m in teacher.modules())
    assert all(torch.equal(v, teacher.model.state_dict()[k]) for k, v in stats.items())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_each_term_is_its_loss_times_its_weight(write_recipe):
    """With weights other than 1: a weight added rather than multiplied would leave the gradient unchanged."""
    recipe = TWO_TEACHER_RECIPE.replace('head = "conv"\n', 'head = "conv"\nweight = 0.25\n')
    trainer = make_trainer(write_recipe(recipe.replace('head = "inv"\n', 'head = "inv"\nweight = 3.0\n')))
    images, labels = first_batch(trainer)
    target = torch.nn.functional.one_hot(labels, 4).float()
    step = trainer.distill_step
    teachers = step.teacher_logits(images)
    loss, values = step.losses(images, target, labels, teachers)
    logits = step.forward(images)
    for term, weight in zip(step.terms, (1.0, 0.25, 3.0)):
        plain = term.fn(logits[term.head], target=target, labels=labels,
                        teacher_logits=[teachers[t] for t in term.teachers])
        torch.testing.assert_close(values[term.name], weight * plain)
    torch.testing.assert_close(loss, sum(values.values()))


def test_a_run_of_zero_epochs_evaluates_the_student_as_it_came(write_recipe):
    trainer = make_trainer(write_recipe(TWO_TEACHER_RECIPE), ["train.epochs=0"])
    before = {k: v.clone() for k, v in trainer.state.model.state_dict().items()}
    trainer.fit()
    assert trainer.summary["status"] == "completed" and not trainer.state.history
    assert trainer.summary["top1"] == trainer.evaluate()
    assert all(torch.equal(v, trainer.state.model.state_dict()[k]) for k, v in before.items())


def test_the_time_counters_hold_only_their_own_work(write_recipe):
    """An epoch's training seconds lie within the time its batches took, a fresh run's within its ``fit``,
    and each epoch's speed is its 64 images over its training seconds."""
    recipe = write_recipe(TWO_TEACHER_RECIPE)
    trainer = make_trainer(recipe, ["train.epochs=1"])
    start = time.perf_counter()
    trainer.train_epoch(0)
    assert 0 < trainer.state.train_s <= time.perf_counter() - start
    trainer = make_trainer(recipe)
    step, step_s = trainer.train_step, [0.0, 0.0]  # per epoch, the time spent inside its steps

    def timed_step(images, labels, epoch, views=None):
        began = time.perf_counter()
        logged = step(images, labels, epoch, views)
        step_s[epoch] += time.perf_counter() - began
        return logged

    trainer.train_step = timed_step
    start = time.perf_counter()
    trainer.fit()
    elapsed = time.perf_counter() - start
    assert 0 < trainer.summary["wall_s"] <= round(elapsed, 2) + 0.01  # wall_s is rounded
    rows = trainer.state.history
    assert sum(row["wall_s"] for row in rows) <= elapsed
    assert all(within <= row["wall_s"] for within, row in zip(step_s, rows))
    assert [row["images_per_s"] * row["wall_s"] for row in rows] == pytest.approx([64, 64])
    assert trainer.summary["train_images_per_s"] == pytest.approx(sum(r["images_per_s"] for r in rows) / 2)


def test_an_epochs_row_holds_the_means_of_its_steps_logged_values(write_recipe, monkeypatch):
    trainer = make_trainer(write_recipe(TWO_TEACHER_RECIPE), ["train.epochs=1"])
    logged = []
    step = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", lambda *args: logged.append(step(*args)) or logged[-1])
    trainer.fit()
    (row,) = trainer.state.history
    assert len(logged) == 4 and row["train"] == pytest.approx({k: sum(s[k] for s in logged) / 4 for k in logged[0]})


def test_the_best_epochs_student_is_kept_as_it_was(write_recipe, monkeypatch):
    """With a held-out validation split the best epoch's weights are kept for the test split: a copy, not
    the live weights. The first epoch is the best so far even at 0% top-1; an equal or worse one is not."""
    trainer = make_trainer(write_recipe(TWO_TEACHER_RECIPE), ["data.val_split=0.25", "train.epochs=4"])
    evaluate = trainer.evaluate
    scores = iter([0.0, 50.0, 50.0, 25.0])
    monkeypatch.setattr(trainer, "evaluate", lambda *a, **k: {**evaluate(*a, **k), "eval": next(scores)})
    best = []
    for epoch in range(4):
        trainer.train_epoch(epoch)
        trainer.end_epoch(epoch)
        best.append(trainer.state.best_epoch)
        if epoch == 1:
            second = {k: v.clone() for k, v in trainer.state.model.state_dict().items()}
    assert best == [1, 2, 2, 2]  # a tie keeps the earlier epoch
    assert all(torch.equal(trainer.state.best_model[k], v) for k, v in second.items())
    assert not all(torch.equal(trainer.state.model.state_dict()[k], v) for k, v in second.items())


class KeepsState:
    def __init__(self, key: str):
        self.key, self.restored = key, None

    @api.hookimpl
    def kdkit_state_dict(self, trainer):
        return {self.key: torch.arange(3.0)}

    @api.hookimpl
    def kdkit_load_state_dict(self, trainer, state):
        self.restored = state[self.key]


def test_plugins_keep_state_in_checkpoints_under_keys_of_their_own(write_recipe):
    keeper = KeepsState("ema")
    plugins = plugins_with(keeper)
    trainer = make_trainer(write_recipe(TWO_TEACHER_RECIPE), plugins=plugins)
    checkpoint = trainer.checkpoint()
    trainer.resume(checkpoint)
    assert torch.equal(keeper.restored, torch.arange(3.0))
    plugins.manager.register(KeepsState("ema"))
    with pytest.raises(KdkitError, match=r"two plugins keep checkpoint state under \['ema'\]"):
        trainer.checkpoint()


def test_a_plugins_evaluate_entries_join_the_epochs_top1_but_never_replace_one(write_recipe):
    class Probe:
        reports = {"probe": 12.5}

        @api.hookimpl
        def kdkit_evaluate(self, trainer):
            return self.reports

    probe = Probe()
    trainer = make_trainer(write_recipe(TWO_TEACHER_RECIPE), plugins=plugins_with(probe))
    trainer.train_epoch(0)
    trainer.end_epoch(0)
    assert trainer.state.history[-1]["top1"]["probe"] == 12.5
    probe.reports = {"eval": 99.0}
    with pytest.raises(KdkitError, match=r"reports \['eval'\], which the run already has"):
        trainer.end_epoch(1)


def test_any_non_finite_term_stops_the_step_by_name_and_top1_is_the_exact_fraction(write_recipe):
    check_finite = make_trainer(write_recipe(TWO_TEACHER_RECIPE)).distill_step.check_finite
    check_finite({"loss": 2.0, "ce/cls": 1.0, "mse/conv": 1.0})  # all finite: goes on
    for name in ("ce/cls", "mse/conv"):  # a term named before "loss" and one after (a third-party plugin's)
        logged = {"loss": math.nan, "ce/cls": 1.0, "mse/conv": 1.0, name: math.inf}
        with pytest.raises(NonFiniteLoss, match=f"^the loss term '{name}' is inf$"):
            check_finite(logged)
    with pytest.raises(NonFiniteLoss, match="^the weighted sum of the loss terms is inf$"):
        check_finite({"loss": math.inf, "ce/cls": 3e38, "mse/conv": 3e38})  # finite terms
    count = Top1(["cls", "mean"])
    count.add({"cls": torch.eye(3), "mean": torch.eye(3)[[0, 2, 0]]}, torch.tensor([0, 2, 1]))  # 1 and 2 hits
    assert count.percent() == {"cls": 100 / 3, "mean": 200 / 3}
    assert count.percent(TwoProcesses(other=torch.tensor([2.0, 0.0, 3.0]))) == {"cls": 50.0, "mean": 100 / 3}


def test_a_signal_to_any_process_stops_every_process(write_recipe):
    trainer = make_trainer(write_recipe(TWO_TEACHER_RECIPE))
    assert not trainer.stopping()
    trainer.distill_step.processes = TwoProcesses(other=1.0)  # the other process was signalled, this one not
    assert trainer.stopping()


def test_a_second_signal_exits_at_once_with_its_status(monkeypatch):
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    stop = StopOnSignal()
    stop.handle(signal.SIGTERM, None)
    assert stop.signum == signal.SIGTERM and not exits  # the first one only asks
    stop.handle(signal.SIGINT, None)
    assert exits == [128 + signal.SIGINT]


def test_a_second_signal_ends_the_daemonic_children_first_as_an_exit_would(monkeypatch):
    monkeypatch.setattr(os, "_exit", lambda status: None)
    batches = iter(torch.utils.data.DataLoader(range(8), batch_size=2, num_workers=1, persistent_workers=True))
    next(batches)
    worker = batches._workers[0]  # daemonic, as every DataLoader worker
    other = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
    other.start()
    stop = StopOnSignal()
    stop.handle(signal.SIGTERM, None)
    assert worker.is_alive()  # the first signal only asks
    stop.handle(signal.SIGTERM, None)
    worker.join(timeout=10)
    assert worker.exitcode is not None and other.is_alive()  # ended (it idles otherwise); a non-daemonic one stays
    other.kill()


def test_the_logged_values_are_averaged_over_the_processes(write_recipe):
    step = make_trainer(write_recipe(TWO_TEACHER_RECIPE)).distill_step
    step.processes = TwoProcesses()
    logged = step.logged(torch.tensor(3.0), {"ce/cls": torch.tensor(1.0), "kl/conv": torch.tensor(2.0)})
    assert logged == {"loss": 3.0, "ce/cls": 1.0, "kl/conv": 2.0}


def test_the_training_speed_counts_the_images_of_every_process(write_recipe):
    trainer = make_trainer(write_recipe(TWO_TEACHER_RECIPE))
    trainer.distill_step.processes = TwoProcesses()  # the other process trains a share as large as this one's
    trainer.train_epoch(0)
    assert trainer.state.seen == 2 * sum(len(labels) for _, labels, *_ in trainer.parts.loaders.train)


def test_the_inference_speed_is_images_over_the_timed_seconds(write_recipe, monkeypatch):
    trainer = make_trainer(write_recipe(TWO_TEACHER_RECIPE), ["data.batch_size_eval=100"])
    clock = iter([10.0, 13.0])  # the start and the end of the timed batches
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    predict, batches = trainer.state.model.predict, []
    monkeypatch.setattr(trainer.state.model, "predict", lambda images: batches.append(len(images)) or predict(images))
    assert trainer.evaluation.inference_speed(trainer.state.model, warmup=1, repeats=2) == 2 * 64 / 3.0  # batch_size_eval, at most 64
    assert batches == [64, 64, 64]  # one warm-up batch, two timed


def test_a_signal_stops_the_run_after_its_step_naming_the_signal(write_recipe, monkeypatch):
    trainer = make_trainer(write_recipe(TWO_TEACHER_RECIPE))
    step = trainer.train_step
    before = signal.getsignal(signal.SIGINT)  # Python's default_int_handler; SIG_IGN when started in the background
    monkeypatch.setattr(trainer, "train_step", lambda *args: (step(*args), os.kill(os.getpid(), signal.SIGINT))[0])
    at_run_end, run_end = [], trainer.hook.kdkit_run_end
    monkeypatch.setattr(trainer.hook, "kdkit_run_end",
                        lambda **kw: (at_run_end.append(signal.getsignal(signal.SIGINT)), run_end(**kw))[1])
    with pytest.raises(RunInterrupted, match=r"^SIGINT: stopped at epoch 1, step 1 of 4;") as stopped:
        trainer.fit()
    assert stopped.value.signum == signal.SIGINT and trainer.summary["status"] == "interrupted"
    assert at_run_end == [trainer.stop.handle]  # a second signal while the checkpoint is written exits at once
    assert signal.getsignal(signal.SIGINT) is before  # the handler was put back


def test_a_signal_during_an_epochs_evaluation_stops_after_that_epoch(write_recipe, monkeypatch):
    trainer = make_trainer(write_recipe(TWO_TEACHER_RECIPE))
    evaluate = trainer.evaluate
    monkeypatch.setattr(trainer, "evaluate", lambda: (evaluate(), os.kill(os.getpid(), signal.SIGTERM))[0])
    with pytest.raises(RunInterrupted, match=r"^SIGTERM: stopped after epoch 1; resume with --resume"):
        trainer.fit()
    assert trainer.summary["epochs"] == 1 and trainer.summary["status"] == "interrupted"


@pytest.mark.parametrize("trained_heads, unused_expected", [(3, False), (2, True)])
def test_data_parallel_wraps_the_student_and_heads_expecting_untrained_heads(trained_heads, unused_expected,
                                                                             write_recipe, tmp_path):
    """On the CPU without device ids; DDP is told to expect unused parameters only when a head has no loss."""
    recipe = TWO_TEACHER_RECIPE if trained_heads == 3 else TWO_TEACHER_RECIPE.replace(
        'head = "inv"\nteachers = ["other"]', 'head = "conv"\nteachers = ["other"]')
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        trainer = make_trainer(write_recipe(recipe))
        wrapped = trainer.distill_step.data_parallel(trainer.state.model)
    finally:
        dist.destroy_process_group()
    assert wrapped.module is trainer.state.model and wrapped.device_ids is None
    assert wrapped.find_unused_parameters is unused_expected


@pytest.mark.parametrize("precision, bf16", [("auto", False), ("bf16", True), ("fp32", False)])
def test_on_the_cpu_only_bf16_autocasts(precision, bf16):
    context = autocast(torch.device("cpu"), precision)
    assert context._enabled is bf16 and context.fast_dtype == torch.bfloat16


def test_resume_restores_the_counters_and_the_learning_rate(write_recipe):
    recipe = write_recipe(TWO_TEACHER_RECIPE)
    trained, resumed = make_trainer(recipe), make_trainer(recipe)
    images, labels = first_batch(trained)
    for _ in range(3):
        trained.train_step(images, labels, epoch=0)
    resumed.resume(trained.checkpoint())
    assert resumed.resumed and not trained.resumed  # plugins read it (e.g. to append to the run's files)
    assert (resumed.state.step, resumed.lr) == (3, trained.lr) and resumed.lr != make_trainer(recipe).lr


def test_with_several_processes_gradients_are_synchronised_after_the_last_micro_batch_only(write_recipe):
    """DDP's ``no_sync`` for every micro-batch but the last: the averaged gradient is then exchanged once."""
    trainer = make_trainer(write_recipe(TWO_TEACHER_RECIPE), ["train.accum_steps=4"])
    trainer.distill_step.processes = TwoProcesses()
    synced = []

    class Wrapped(torch.nn.Module):  # stands in for DistributedDataParallel
        def __init__(self, model):
            super().__init__()
            self.model, self.syncing = model, True

        def forward(self, images):
            synced.append(self.syncing)
            return self.model(images)

        @contextlib.contextmanager
        def no_sync(self):
            self.syncing = False
            yield
            self.syncing = True

    trainer.distill_step.forward = Wrapped(trainer.state.model)
    images, labels = first_batch(trainer)
    trainer.train_step(images, labels, epoch=0)
    assert synced == [False, False, False, True]


@pytest.mark.parametrize("processes, rank", [(Processes(), None), (TwoProcesses(rank=1), 1)])
def test_each_process_draws_its_own_drop_path_masks(processes, rank, write_recipe, monkeypatch):
    """The step's seed names the process's rank when there are several (one process: no rank)."""
    trainer = make_trainer(write_recipe(TWO_TEACHER_RECIPE))
    trainer.distill_step.processes = processes
    keys = []
    monkeypatch.setattr("kdkit.train.step.sample_seed", lambda *key: keys.append(key) or 0)
    images, labels = first_batch(trainer)
    trainer.train_step(images, labels, epoch=0)
    assert keys == [(0, 0, 0, DROP_PATH_STREAM) + ((rank,) if rank is not None else ())]
