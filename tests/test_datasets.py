"""The built-in dataset plugins: fake, cifar10/100 (torchvision files, image tree, archive), fashion_mnist, imagefolder."""
from __future__ import annotations

import copy
import gzip
import os
import random
import re
import struct
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import RandAugment
from torchvision.transforms import ColorJitter

import kdkit_plugins.datasets as datasets
from kdkit.recipe.sections import AugmentConfig, DataConfig
from kdkit.builder.data import (Targets, build_loaders, build_transforms, fingerprint, seeded, split_datasets,
                         stratified_indices)
from kdkit.errors import KdkitError, RecipeError
from kdkit.plugin.discovery import default_plugins
from kdkit.recipe.schema import check_table

CIFAR10_ARCHIVE = next((p for p in (Path(__file__).parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz",
                                    Path("/work/shared/data/cifar10-jpeg.tar.gz")) if p.is_file()), None)
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CONTEXT = dict(image_size=32, augment=AugmentConfig(), num_classes=0)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """The folder decoded datasets are cached in, under a temporary KDKIT_CACHE."""
    monkeypatch.setenv("KDKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "decoded"


def make_tree(root: Path, splits=("train", "test"), classes=("cat", "dog"), per_class=4, size=8) -> dict:
    """PNG images (lossless, so decoded pixels can be compared) in ``root/<split>/<class>/``."""
    rng = np.random.default_rng(0)
    pixels = {}
    for split in splits:
        for label in classes:
            (root / split / label).mkdir(parents=True)
            for i in range(per_class):
                array = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(array).save(root / split / label / f"{i:03d}.png")
                pixels[split, label, i] = array
    return pixels


def make_archive(tree: Path, archive: Path, top: str = "") -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(tree / split, arcname=f"{top}{split}")
    return archive


# --- fake ----------------------------------------------------------------------------------------

def test_fake_is_deterministic_and_balanced():
    first, second = (datasets.fake(**CONTEXT, train_size=40, val_size=20) for _ in range(2))
    assert (len(first.train), len(first.val), first.num_classes, first.in_chans) == (40, 20, 10, 3)
    with seeded(7):
        a = first.train[5]
    with seeded(7):
        b = second.train[5]
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert torch.equal(first.val[3][0], second.val[3][0])
    train_pixels, val_pixels = copy.copy(first.train), copy.copy(first.val)
    train_pixels.transform = val_pixels.transform = None
    assert train_pixels[0][0].tobytes() != val_pixels[0][0].tobytes()  # val images are unseen ones
    assert np.bincount(first.train.targets).tolist() == [4] * 10
    assert [first.train[i][1] for i in range(40)] == first.train.targets


def test_fake_images_do_not_depend_on_the_process_random_state():
    """Each image is a pure function of its index, so loader workers and other processes agree."""
    splits = datasets.fake(image_size=16, augment=AugmentConfig(), num_classes=3, in_chans=1)
    torch.manual_seed(1)
    image, label = splits.val[2]
    torch.manual_seed(2)
    assert torch.equal(splits.val[2][0], image) and image.shape == (1, 16, 16) and label == 2


# --- cifar10 from the real archive ---------------------------------------------------------------

@pytest.fixture(scope="module")
def real_cifar10():
    """Loaded through the user's cache, as training runs do: only the first run on a machine decodes."""
    if CIFAR10_ARCHIVE is None:
        pytest.skip("cifar10-jpeg.tar.gz is not in shared/data")
    start = time.perf_counter()
    splits = datasets.cifar10(root=str(CIFAR10_ARCHIVE), **CONTEXT)
    return splits, time.perf_counter() - start


@pytest.mark.slow
@pytest.mark.xdist_group("cifar10")
def test_cifar10_archive(real_cifar10):
    splits, seconds = real_cifar10
    print(f"CIFAR-10 load (decoding unless cached): {seconds:.1f} s")
    assert (len(splits.train), len(splits.val)) == (50_000, 10_000)
    assert splits.class_names == CIFAR10_CLASSES and splits.num_classes == 10 and splits.in_chans == 3
    assert np.bincount(splits.train.targets).tolist() == [5000] * 10
    assert np.bincount(splits.val.targets).tolist() == [1000] * 10
    image, label = splits.val[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 0
    assert splits.train.images.dtype == torch.uint8 and splits.train.images.shape == (50_000, 32, 32, 3)


@pytest.mark.slow
@pytest.mark.xdist_group("cifar10")
def test_cifar10_second_load_hits_the_cache(real_cifar10, monkeypatch):
    splits, _ = real_cifar10
    monkeypatch.setattr(datasets, "_decode_tree", lambda source: pytest.fail("decoded again"))
    start = time.perf_counter()
    again = datasets.cifar10(root=str(CIFAR10_ARCHIVE), **CONTEXT)
    seconds = time.perf_counter() - start
    print(f"cached CIFAR-10 load: {seconds:.2f} s")
    assert seconds < 5
    assert torch.equal(again.train.images, splits.train.images)
    assert again.val.targets == splits.val.targets and again.class_names == splits.class_names


# --- in-memory image trees and archives -------------------------------------------------------------

def test_tree_and_archive_load_identically(tmp_path, cache):
    pixels = make_tree(tmp_path / "tree")
    archive = make_archive(tmp_path / "tree", tmp_path / "tiny.tar.gz")
    (tmp_path / "holder").mkdir()
    make_archive(tmp_path / "tree", tmp_path / "holder" / "nested.tgz", top="tiny/")
    loaded = [datasets.cifar10(root=str(root), **CONTEXT)
              for root in (tmp_path / "tree", archive, tmp_path / "holder")]
    for splits in loaded:
        assert splits.class_names == ["cat", "dog"] and splits.num_classes == 2
        assert splits.train.targets == [0] * 4 + [1] * 4 and len(splits.val) == 8
        assert np.array_equal(splits.train.images[5].numpy(), pixels["train", "dog", 1])
        assert np.array_equal(splits.val.images[2].numpy(), pixels["test", "cat", 2])
        assert splits.train[0][0].shape == (3, 32, 32)
    assert len(list(cache.glob("*.pt"))) == 3


def test_changed_archive_is_decoded_again(tmp_path, cache):
    make_tree(tmp_path / "tree")
    archive = make_archive(tmp_path / "tree", tmp_path / "tiny.tar.gz")
    datasets.cifar100(root=str(archive), **CONTEXT)
    datasets.cifar100(root=str(archive), **CONTEXT)
    assert len(list(cache.glob("*.pt"))) == 1
    os.utime(archive, ns=(0, 0))
    datasets.cifar100(root=str(archive), **CONTEXT)
    assert len(list(cache.glob("*.pt"))) == 2


def test_missing_cifar_names_where_it_looked(tmp_path):
    with pytest.raises(KdkitError) as error:
        datasets.cifar10(root=str(tmp_path / "nowhere"), **CONTEXT)
    message = str(error.value)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in message and "data.download" in message


def test_wrong_num_classes(tmp_path, cache):
    make_tree(tmp_path)
    with pytest.raises(KdkitError, match="num_classes is 10 but the dataset has 2"):
        datasets.cifar10(root=str(tmp_path), **{**CONTEXT, "num_classes": 10})


def test_archive_without_a_tree(tmp_path, cache):
    (tmp_path / "notes.txt").write_text("no images here")
    with tarfile.open(tmp_path / "other.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "notes.txt", arcname="notes.txt")
    with pytest.raises(KdkitError, match="holds no train/<class>/<image> files"):
        datasets.cifar10(root=str(tmp_path), **CONTEXT)


def test_val_split_swaps_in_the_eval_transform():
    images = torch.zeros(20, 4, 4, 3, dtype=torch.uint8)
    train = datasets.InMemoryImages(images, [0, 1] * 10, transform=lambda image: "train")
    val = datasets.InMemoryImages(images[:2], [0, 1], transform=lambda image: "eval")
    splits = datasets.DatasetSplits(train, val, 2, 3, ["a", "b"], (0.5,) * 3, (0.5,) * 3)
    fit, held = split_datasets(splits, DataConfig(val_split=0.2))
    assert (len(fit), len(held)) == (16, 4)
    assert {fit[i][0] for i in range(16)} == {"train"} and {held[i][0] for i in range(4)} == {"eval"}
    assert held.dataset.images is train.images  # a shallow copy: pixels are shared
    assert sorted(held[i][1] for i in range(4)) == [0, 0, 1, 1]
    fit, held = split_datasets(splits, DataConfig(val_split=0.01))  # 0.2 of an image rounds to none
    assert (len(fit), len(held)) == (19, 1)  # a validation split holds at least one image


def test_stratified_subsets_give_leftover_images_to_the_largest_remainders_and_never_move():
    """Class shares 4:2:4, 3 images: quotas 1.2, 0.6, 1.2, so classes 0 and 2 get one image each and the one
    left goes to class 1, whose remainder is largest. The subset is pinned: every published result was
    trained and validated on these images."""
    targets = np.array([0] * 4 + [1] * 2 + [2] * 4)
    assert np.bincount(targets[stratified_indices(targets, 3)], minlength=3).tolist() == [1, 1, 1]
    assert stratified_indices(np.arange(40) % 4, 8).tolist() == [3, 4, 6, 16, 17, 30, 33, 35]


def test_loaders_hold_whole_batches_and_split_each_batch_and_evaluation_across_processes():
    """A fresh loader counts only full training batches (the schedule is built from that count before any
    epoch starts) and a resumed epoch skips the batches already trained; process ``rank`` of ``world`` trains
    on its share of each global batch, in the order one process would see them, and evaluates every
    ``world``-th validation and test image."""
    cfg = DataConfig(workers=0, batch_size_eval=4)
    for size, batches in ((63, 3), (64, 4)):
        splits = datasets.fake(**CONTEXT, train_size=size, val_size=10)
        one, *shards = (build_loaders(splits.train, splits.val, splits.val, cfg, batch_size=16, seed=0, repeats=1,
                                      views=0, rank=rank, world=world) for rank, world in ((0, 1), (0, 2), (1, 2)))
        assert [len(loaders.train) for loaders in (one, *shards)] == [batches] * 3
        keys = [list(loaders.sampler) for loaders in (one, *shards)]
        # global batch b = rank 0's b-th batch of 8, then rank 1's
        assert keys[0] == [key for b in range(batches) for part in keys[1:] for key in part[8 * b: 8 * b + 8]]
        one.sampler.set_epoch(0, skip=16)  # resumed after the first global batch: the rest of the epoch
        assert (len(one.train), list(one.sampler)) == (batches - 1, keys[0][16:])
    for rank, loaders in enumerate(shards):
        share = torch.stack([splits.val[i][0] for i in range(rank, 10, 2)])
        for split in (loaders.val, loaders.test):
            assert torch.equal(torch.cat([images for images, _ in split]), share)


def test_without_mixing_each_image_keeps_its_own_smoothed_label():
    targets = Targets(AugmentConfig(label_smoothing=0.1), num_classes=4, seed=0)
    images = torch.randn(4, 3, 8, 8)
    out, soft, lam = targets(images, torch.tensor([0, 1, 2, 3]), epoch=0, step=0)
    assert out is images and lam == 1.0
    torch.testing.assert_close(soft, torch.full((4, 4), 0.025) + 0.9 * torch.eye(4))  # 0.1 spread over 4 classes


def test_training_transforms_add_rand_augment_when_asked_and_jitter_no_colours():
    """DeiT's recipe has no colour jitter (timm's create_transform adds an empty one without RandAugment)."""
    for rand_augment in ("", "rand-m9-mstd0.5-inc1"):
        transform = build_transforms(32, AugmentConfig(rand_augment=rand_augment), (0.5,) * 3, (0.5,) * 3, train=True)
        assert any(isinstance(t, RandAugment) for t in transform.transforms) == bool(rand_augment)
        jitters = [t for t in transform.transforms if isinstance(t, ColorJitter)]
        assert all(j.brightness is j.contrast is j.saturation is j.hue is None for j in jitters)


def test_the_published_defaults_evaluate_with_timms_imagenet_centre_crop():
    """A dataset plugin that sets no crop_pct is evaluated as timm evaluates ImageNet: resize to 32 / 0.875, crop."""
    splits = datasets.DatasetSplits([], [], 2, 3, ["a", "b"], (0.5,) * 3, (0.5,) * 3)
    assert splits.crop_pct == 0.875
    resize, crop = build_transforms(32, AugmentConfig(), (0.5,) * 3, (0.5,) * 3, train=False).transforms[:2]
    assert (resize.size, crop.size) == (36, (32, 32))


def test_a_datasets_identity_is_its_fingerprint_or_else_its_classes_and_labels():
    images = torch.zeros(4, 4, 4, 3, dtype=torch.uint8)

    def identity(labels, fingerprint=""):
        data = datasets.InMemoryImages(images, labels, transform=None)
        return datasets.DatasetSplits(data, data, 2, 3, ["a", "b"], (0.5,) * 3, (0.5,) * 3,
                                      fingerprint=fingerprint).identity()

    assert identity([0, 1, 0, 1], fingerprint="given") == "given"
    assert identity([0, 1, 0, 1]) != identity([1, 1, 0, 1]) != ""


def test_fingerprints_tell_apart_content_type_shape_and_order():
    zeros = np.zeros((2, 3), np.float32)
    assert fingerprint(zeros) == fingerprint(torch.zeros(2, 3))  # a tensor by its values
    different = [zeros, zeros.astype(np.float64), zeros.reshape(3, 2), np.ones((2, 3), np.float32), "a", ["a", "b"]]
    assert len({fingerprint(part) for part in different}) == len(different)
    assert fingerprint("a", "b") != fingerprint("b", "a") != fingerprint("a")


def test_seeded_seeds_every_generator_with_the_seed_and_restores_them():
    """Python's, NumPy's (modulo 2**32, its range) and torch's generators, as if each were seeded alone."""
    def seed_all(seed):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def draw():
        return random.random(), np.random.rand(), torch.rand(1).item()

    for seed in (12345, 2**40 + 2**31 + 7):  # bit 31 set: NumPy takes the low 32 bits
        seed_all(1)
        with seeded(seed):
            inside = draw()
        after = draw()
        assert inside == (random.Random(seed).random(), np.random.RandomState(seed % 2**32).rand(),
                          torch.rand(1, generator=torch.Generator().manual_seed(seed)).item())
        seed_all(1)
        assert after == draw()  # as if the block had not run


# --- fashion_mnist ---------------------------------------------------------------------------------

def write_idx(path: Path, array: np.ndarray, gzipped: bool) -> None:
    data = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(data) if gzipped else data)


def test_fashion_mnist_from_torchvision_raw_files(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.arange(3 * 28 * 28, dtype=np.uint64).astype(np.uint8).reshape(3, 28, 28)
    for split, (image_file, label_file) in datasets.FASHION_MNIST_FILES.items():
        write_idx(raw / f"{image_file}.gz", images, gzipped=True)
        write_idx(raw / label_file, np.array([9, 0, 4], np.uint8), gzipped=False)  # both kinds
    splits = datasets.fashion_mnist(root=str(tmp_path), **CONTEXT)
    assert splits.in_chans == 1 and splits.train.targets == [9, 0, 4]
    assert np.array_equal(splits.val.images[..., 0].numpy(), images)
    assert splits.train[0][0].shape == (1, 32, 32)


@pytest.mark.skipif(not datasets.DEBIAN_FASHION_MNIST.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_debian_package():
    splits = datasets.fashion_mnist(root="", **{**CONTEXT, "image_size": 28})
    assert (len(splits.train), len(splits.val), splits.num_classes, splits.in_chans) == (60_000, 10_000, 10, 1)
    assert splits.class_names[0] == "T-shirt/top" and splits.class_names[-1] == "Ankle boot"
    assert splits.train[0][0].shape == (1, 28, 28) and splits.mean == (0.2860,)


def test_missing_fashion_mnist_names_where_it_looked(tmp_path):
    with pytest.raises(KdkitError) as error:
        datasets.fashion_mnist(root=str(tmp_path), **CONTEXT)
    assert str(tmp_path / "FashionMNIST" / "raw") in str(error.value)
    assert "apt-get install dataset-fashion-mnist" in str(error.value)


# --- imagefolder --------------------------------------------------------------------------------------

def test_imagefolder(tmp_path):
    make_tree(tmp_path, splits=("train", "val"), classes=("ant", "bee", "cow"), per_class=2, size=40)
    splits = datasets.imagefolder(root=str(tmp_path), **CONTEXT)
    assert (len(splits.train), len(splits.val), splits.num_classes) == (6, 6, 3)
    assert splits.class_names == ["ant", "bee", "cow"] and splits.train.targets == [0, 0, 1, 1, 2, 2]
    image, label = splits.val[4]
    assert image.shape == (3, 32, 32) and label == 2


def test_imagefolder_class_list(tmp_path):
    make_tree(tmp_path, splits=("train", "val"), classes=("ant", "bee", "cow"), per_class=2, size=40)
    (tmp_path / "keep.txt").write_text("# two of three\ncow\nant\n")
    splits = datasets.imagefolder(root=str(tmp_path), classes=str(tmp_path / "keep.txt"), **CONTEXT)
    assert splits.class_names == ["ant", "cow"] and splits.train.targets == [0, 0, 1, 1]
    (tmp_path / "bad.txt").write_text("ant\nyak\n")
    with pytest.raises(KdkitError, match="lacks 1 of the listed class folders: yak"):
        datasets.imagefolder(root=str(tmp_path), classes=str(tmp_path / "bad.txt"), **CONTEXT)


def test_missing_imagefolder_names_where_it_looked(tmp_path):
    with pytest.raises(KdkitError, match=re.escape(str(tmp_path / "val"))):
        datasets.imagefolder(root=str(tmp_path), **CONTEXT)


# --- registration ---------------------------------------------------------------------------------

def test_registered_with_a_schema():
    plugins = default_plugins()
    for name in ("fake", "cifar10", "cifar100", "fashion_mnist", "imagefolder"):
        assert plugins.get("dataset", name) is getattr(datasets, name)
    rows = {row["name"]: row for row in plugins.describe() if row["kind"] == "dataset"}
    assert rows["cifar10"]["keys"] == [{"key": "download", "type": "bool", "default": False}]
    assert all(rows[name]["doc"] for name in rows)
    assert check_table(datasets.fake, {"train_size": 8}, kind="dataset", file=None, key="data") == {"train_size": 8}
    with pytest.raises(RecipeError, match="did you mean: train_size"):
        check_table(datasets.fake, {"train_sise": 8}, kind="dataset", file=None, key="data")
