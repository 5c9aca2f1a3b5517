"""Datasets, loaders and per-sample randomness.

Dataset plugins return a ``DatasetSplits``; the core adds what every dataset shares: class-stratified
subsets, a held-out validation split, and augmentation randomness that is a pure function of
(seed, epoch, sample index, copy), whichever worker or process draws the sample. That makes runs
reproducible, resumable to the bit, independent of the number of loader workers and replayable.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import random
import signal
from dataclasses import dataclass

import numpy as np
import torch
from timm.data import Mixup, create_transform
from timm.data.mixup import mixup_target
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from kdkit.recipe.sections import AugmentConfig, DataConfig

DATA_SEED = 20210601  # subsets and held-out splits never move with the recipe's seed


@dataclass
class DatasetSplits:
    """What a dataset plugin returns.

    ``train`` and ``val`` follow torchvision's convention: items are ``(image, label)`` after
    ``self.transform`` (a settable attribute) and ``targets`` lists every label. ``crop_pct`` is the
    evaluation transform's centre crop (what ``kdkit predict`` applies to new images).
    ``fingerprint`` identifies the data's content (``fingerprint()`` of the pixels and labels, or
    what the plugin can afford): the teacher caches key on it, so a teacher trained on other data
    is never reused. Left empty, kdkit fingerprints the class names and labels only.
    """

    train: Dataset
    val: Dataset
    num_classes: int
    in_chans: int
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float = 0.875
    fingerprint: str = ""

    def identity(self) -> str:
        """``fingerprint``, or failing that one of the class names and every label."""
        return self.fingerprint or fingerprint(self.class_names, targets_of(self.train), targets_of(self.val))


def fingerprint(*parts) -> str:
    """A short sha256 of tensors, arrays (their dtype, shape and bytes), strings and lists of them."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            part = part.detach().cpu().contiguous().numpy()
        if isinstance(part, np.ndarray):
            digest.update(f"{part.dtype} {part.shape}".encode())
            digest.update(np.ascontiguousarray(part).tobytes())
        else:
            digest.update(json.dumps(part, default=str).encode())
    return digest.hexdigest()[:16]


def build_transforms(image_size: int, augment: AugmentConfig, mean, std, *, train: bool,
                     crop_pct: float = 0.875):
    """timm's transforms for the DeiT recipe: RandomResizedCrop, flip, RandAugment, random erasing.

    ``crop_pct = 1`` evaluates on the whole image, right for data stored at its training size (CIFAR).
    """
    if train:
        return create_transform(
            image_size, is_training=True, scale=tuple(augment.crop_scale), hflip=augment.hflip,
            color_jitter=0.0, auto_augment=augment.rand_augment or None,
            interpolation=augment.interpolation, re_prob=augment.random_erasing, re_mode="pixel",
            mean=tuple(mean), std=tuple(std),
        )
    return create_transform(image_size, is_training=False, interpolation=augment.interpolation,
                            crop_pct=crop_pct, mean=tuple(mean), std=tuple(std))


def targets_of(dataset: Dataset) -> np.ndarray:
    if isinstance(dataset, Subset):
        return targets_of(dataset.dataset)[np.asarray(dataset.indices)]
    return np.asarray(dataset.targets)


def stratified_indices(targets: np.ndarray, count: int, seed: int = DATA_SEED) -> np.ndarray:
    """``count`` indices (every index when ``count`` reaches the size), each class represented in proportion
    to its share (largest remainder)."""
    if count >= len(targets):
        return np.arange(len(targets))
    rng = np.random.default_rng(seed)
    classes, sizes = np.unique(targets, return_counts=True)
    quota = sizes * count / len(targets)
    take = np.floor(quota).astype(int)
    for i in np.argsort(-(quota - take), kind="stable")[: count - take.sum()]:
        take[i] += 1
    chosen = [rng.permutation(np.flatnonzero(targets == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(chosen))


def split_datasets(splits: DatasetSplits, cfg: DataConfig) -> tuple[Dataset, Dataset]:
    """Apply ``val_split`` (held out of train, with eval transforms) and the ``limit_*`` subsets."""
    train, val = splits.train, splits.val
    if cfg.val_split > 0:
        targets = targets_of(train)
        held = stratified_indices(targets, max(1, round(cfg.val_split * len(targets))))
        rest = np.setdiff1d(np.arange(len(targets)), held)
        val = copy.copy(train)
        val.transform = splits.val.transform
        train, val = Subset(train, rest.tolist()), Subset(val, held.tolist())
    if cfg.limit_train:
        train = Subset(train, stratified_indices(targets_of(train), cfg.limit_train).tolist())
    if cfg.limit_val:
        val = Subset(val, stratified_indices(targets_of(val), cfg.limit_val).tolist())
    return train, val


def sample_seed(*key: int) -> int:
    """A 63-bit seed that is a pure function of the key (seed, epoch, index, copy, ...)."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64).item()) >> 1


@contextlib.contextmanager
def seeded(seed: int):
    """Seed Python's, NumPy's and torch's CPU generators for the block, then restore them."""
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


class SeededDataset(Dataset):
    """Draws sample ``(epoch, index, copy)`` with randomness seeded from the run seed and that key."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]):
        epoch, index, copy_ = key
        with seeded(sample_seed(self.seed, epoch, index, copy_)):
            return self.dataset[index]


VIEW_STREAM = 0x76696577  # "view": the seed stream of a cached view's augmentation
ORDER_STREAM = 0x6F726472  # "ordr": the seed stream of each image's walk through its views


def view_seed(index: int, view: int) -> int:
    """The seed of every random choice that makes view ``view`` of training image ``index``."""
    return sample_seed(VIEW_STREAM, index, view)


def view_of(seed: int, epoch: int, index: int, copy: int, views: int, repeats: int) -> int:
    """The view sample (epoch, index, copy) uses: image ``index`` walks through its views in an order drawn
    from (seed, index), one per epoch and repeated-augmentation copy, starting over after ``views``."""
    order = np.random.default_rng(sample_seed(seed, index, ORDER_STREAM)).permutation(views)
    return int(order[(epoch * repeats + copy) % views])


def replay(dataset: Dataset, index: int, view: int):
    """Item ``index`` of ``dataset`` (its training transform) as view ``view``: the same pixels every time."""
    with seeded(view_seed(index, view)):
        return dataset[index]


class ViewDataset(Dataset):
    """Training samples replayed from pre-drawn views (a teacher-output cache's): key (epoch, index, copy)
    -> (image, label, index, view). The run's seed picks the view; the view's seed makes the pixels."""

    def __init__(self, dataset: Dataset, seed: int, views: int, repeats: int):
        self.dataset, self.seed, self.views, self.repeats = dataset, seed, views, repeats

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]):
        epoch, index, copy = key
        view = view_of(self.seed, epoch, index, copy, self.views, self.repeats)
        image, label = replay(self.dataset, index, view)
        return image, label, index, view


def indices_of(dataset: Dataset) -> list[int]:
    """The positions of ``dataset``'s items in the dataset under its (nested) subsets."""
    if isinstance(dataset, Subset):
        inner = indices_of(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    return list(range(len(dataset)))


class EpochSampler(Sampler):
    """A seeded permutation per epoch, yielding the ``(epoch, index, copy)`` keys of whole global batches.

    With ``repeats`` > 1 each image appears that many times in a row, each copy augmented
    differently (DeiT's repeated augmentation), and the epoch is cut back to ``len(dataset)``. The
    global order is the same for any number of processes: process ``rank`` of ``world`` takes its
    share (``batch_size / world`` consecutive keys) of every global batch of ``batch_size``.
    ``set_epoch(epoch, skip)`` leaves out the epoch's first ``skip`` global samples (whole batches):
    a run resumed in the middle of an epoch sees exactly the samples it had not trained on yet.
    """

    def __init__(self, size: int, seed: int, repeats: int, batch_size: int, rank: int, world: int):
        self.size, self.seed, self.repeats, self.epoch, self.skip = size, seed, repeats, 0, 0
        self.batch_size, self.rank, self.share = batch_size, rank, batch_size // world

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return (self.size - self.skip) // self.batch_size * self.share

    def first_global_batch(self, epoch: int, skip: int = 0) -> list[tuple[int, int, int]]:
        """The keys of the first global batch that ``set_epoch(epoch, skip)`` gives, every process's share."""
        whole = EpochSampler(self.size, self.seed, self.repeats, self.batch_size, rank=0, world=1)
        whole.set_epoch(epoch, skip)
        return list(whole)[: self.batch_size]

    def __iter__(self):
        generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch))
        order = torch.randperm(self.size, generator=generator).tolist()
        keys = [(self.epoch, i, c) for i in order for c in range(self.repeats)][: self.size]
        batches = range(self.skip, self.skip + len(self) // self.share * self.batch_size, self.batch_size)
        first = self.rank * self.share  # this process's share of each global batch
        return iter([key for start in batches for key in keys[start + first: start + first + self.share]])


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    sampler: EpochSampler
    test: DataLoader | None = None  # the test split, when validation is held out of the training set


def _ignore_sigint(worker_id: int) -> None:
    """Loader workers leave Ctrl-C to the main process, which stops the run after the current step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_loaders(train: Dataset, val: Dataset, test: Dataset | None, cfg: DataConfig, *, batch_size: int, seed: int,
                  repeats: int, views: int, rank: int, world: int) -> Loaders:
    """Batches of whole global batches' shares (``batch_size`` is global), so mixup always sees an even,
    full batch. With ``views`` (a teacher-output cache) they are replayed views and carry each sample's
    (index, view). With several processes each evaluates every ``world``-th validation and test image."""
    sampler = EpochSampler(len(train), seed, repeats, batch_size, rank, world)
    items = ViewDataset(train, seed, views, repeats) if views else SeededDataset(train, seed)
    common = dict(num_workers=cfg.workers, persistent_workers=cfg.workers > 0,
                  worker_init_fn=_ignore_sigint,
                  pin_memory=torch.cuda.is_available())
    train_loader = DataLoader(items, batch_size=batch_size // world, sampler=sampler, **common)  # whole batches only

    def shard(split):
        return split if world == 1 else Subset(split, range(rank, len(split), world))

    val_loader, test_loader = (DataLoader(shard(split), batch_size=cfg.batch_size_eval, shuffle=False, **common)
                               if split is not None else None for split in (val, test))
    return Loaders(train_loader, val_loader, sampler, test_loader)


class Targets:
    """Turns hard labels into what the student learns from: timm's Mixup/CutMix, or smoothed one-hot.

    Label smoothing is applied exactly once: inside Mixup when mixing is on, here otherwise.
    The mixing draw is seeded from (seed, epoch, step), like the per-sample augmentation. Returns the
    (mixed) images, the soft target and the mixing coefficient (1 without mixing): timm's Mixup in its
    batch mode, each image mixed with the batch reversed (``Mixup._mix_batch`` and ``mixup_target``,
    what ``Mixup.__call__`` runs, called apart to keep the coefficient for cached teacher outputs).
    """

    def __init__(self, augment: AugmentConfig, num_classes: int, seed: int):
        self.num_classes, self.seed, self.smoothing = num_classes, seed, augment.label_smoothing
        self.mixup = Mixup(mixup_alpha=augment.mixup, cutmix_alpha=augment.cutmix,
                           label_smoothing=augment.label_smoothing,
                           num_classes=num_classes) if augment.mixing else None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, *, epoch: int, step: int):
        if self.mixup is None:
            return images, mixup_target(labels, self.num_classes, lam=1.0, smoothing=self.smoothing), 1.0
        images = images.clone()  # timm mixes in place
        with seeded(sample_seed(self.seed, epoch, step, 0x6D6978)):
            lam = self.mixup._mix_batch(images)
        return images, mixup_target(labels, self.num_classes, lam, self.smoothing), lam
