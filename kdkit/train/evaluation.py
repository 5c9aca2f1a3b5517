"""What a run measures besides training: top-1 of a student or of the teachers, and inference speed.

Every measurement runs in eval mode and leaves the model in the mode it found it in. With several
processes each one measures its shard of a split and the counts are summed (``kdkit.train.top1``).
"""
from __future__ import annotations

import copy
import time

import torch

from kdkit.builder.build import Built
from kdkit.builder.model import DistillModel, prediction_names, predictions
from kdkit.train.precision import autocast
from kdkit.train.top1 import top1


class Evaluation:
    """The measurements of one built experiment, on the device and processes of its distillation step."""

    def __init__(self, built: Built):
        self.exp, self.parts, self.step = built.experiment, built.parts, built.step
        self.device, self.precision = self.step.device, self.exp.train.precision

    def top1(self, model: DistillModel, loader=None) -> dict[str, float]:
        """Top-1 (%) per head and for the eval prediction (``eval``) on the validation set (or ``loader``)."""

        def predict(images: torch.Tensor) -> dict[str, torch.Tensor]:
            with autocast(self.device, self.precision):
                return predictions(model(images), model.eval_heads)

        was_training = model.training
        model.eval()
        try:
            return top1(predict, prediction_names(list(model.heads)), self.parts.loaders.val if loader is None
                        else loader, device=self.device, processes=self.step.processes)
        finally:
            model.train(was_training)

    def test(self, model: DistillModel, best_weights: dict | None, val_top1: dict[str, float]) -> dict:
        """The test split's top-1, for the summary: the final student's (``test_top1``, per head and
        ``eval``) and, when a held-out validation split chose the best epoch (``best_weights``), that
        epoch's student's (``best_test_top1``). Without a held-out split the validation set is the test
        split, and ``val_top1`` is its top-1."""
        test = self.parts.loaders.test
        if test is None:
            return {"test_top1": val_top1, "best_test_top1": None}
        best = None
        if best_weights is not None:
            best = copy.deepcopy(model)
            best.load_state_dict(best_weights)
        return {"test_top1": self.top1(model, test), "best_test_top1": self.top1(best, test)["eval"] if best else None}

    def teachers_top1(self) -> dict[str, float]:
        """Validation top-1 (%) of every teacher, on the inputs it gets during training: one pass for all."""
        return top1(self.step.teacher_logits, list(self.step.teachers), self.parts.loaders.val, device=self.device,
                    processes=self.step.processes)

    @torch.no_grad()
    def inference_speed(self, model: DistillModel, warmup: int = 2, repeats: int = 5) -> float:
        """Images/s of the eval prediction on a fixed batch (``data.batch_size_eval``, at most 64), timed
        after ``warmup`` batches with the device synchronised, so a GPU's queued kernels are counted."""
        was_training = model.training
        model.eval()
        data = self.exp.data
        batch = torch.zeros(min(64, data.batch_size_eval), self.parts.splits.in_chans, data.image_size,
                            data.image_size, device=self.device)
        synchronize = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        with autocast(self.device, self.precision):
            for _ in range(warmup):
                model.predict(batch)
            synchronize()
            start = time.perf_counter()
            for _ in range(repeats):
                model.predict(batch)
            synchronize()
        model.train(was_training)
        return repeats * len(batch) / (time.perf_counter() - start)

    @torch.no_grad()
    def check_first_batches(self, model: DistillModel, epoch: int = 0, batch: int = 0) -> None:
        """Load the first global batch the run trains on from (``epoch``, ``batch``) and one validation
        batch, and pass them through ``model`` (one micro-batch of the training batch) in eval mode,
        so unreadable data stops the run before anything is written. Nothing the run uses changes: the
        items are taken from the datasets as the loaders take them (each training sample seeded by its
        own key), torch's generators are forked meanwhile, and eval mode updates no BatchNorm statistic."""
        loaders, cfg = self.parts.loaders, self.exp.train
        micro_batch = cfg.batch_size // (self.step.processes.world * cfg.accum_steps)
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                train = [loaders.train.dataset[key] for key in
                         loaders.sampler.first_global_batch(epoch, batch * cfg.batch_size)]
                val = [loaders.val.dataset[i] for i in range(min(len(loaders.val.dataset), loaders.val.batch_size))]
                for items in (train[:micro_batch], val):
                    if items:  # a resume with a changed batch size may have no batch left in its epoch
                        with autocast(self.device, self.precision):
                            model(loaders.train.collate_fn(items)[0].to(self.device))
        finally:
            model.train(was_training)
