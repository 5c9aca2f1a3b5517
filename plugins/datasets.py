"""Built-in datasets: synthetic ``fake``, CIFAR-10/100, Fashion-MNIST and any ``imagefolder`` tree.

Small datasets are decoded once into a uint8 array held in memory and augmented from there, so a
2-core machine spends its time training rather than decoding images. Decoding an image-folder tree
or its archive is cached on disk, keyed by the source's path, sizes and mtimes.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import struct
import tarfile
import warnings
from pathlib import Path, PurePosixPath
from typing import Annotated

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets
from torchvision.datasets.folder import IMG_EXTENSIONS

from kdkit.api import (AugmentConfig, DatasetSplits, KdkitError, build_transforms, cache_root, default_data_root,
                       Range, fingerprint, hookimpl, read_image)

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {  # split: (images, labels), each maybe gzipped
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SPLITS = ("train", "test")  # the folders of an in-memory image tree; val is the test split
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")
CACHE_FORMAT = 1  # bump when the decoded layout changes, so that old cache files are not read


class InMemoryImages(Dataset):
    """Images held as one uint8 ``(N, H, W, C)`` tensor; each item goes to PIL, then ``transform``.

    It follows torchvision's conventions (``transform``, ``targets``, ``classes``) so the core can
    shallow-copy it and swap the transform for a held-out split without copying the pixels.
    """

    def __init__(self, images, targets, transform=None, classes=()):
        self.images = torch.as_tensor(images)
        self.targets = np.asarray(targets).tolist()
        if len(self.images) != len(self.targets):
            raise ValueError(f"{len(self.images)} images but {len(self.targets)} targets")
        self.transform, self.classes = transform, list(classes)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        pixels = self.images[index].numpy()
        image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


class FakeImages(tv_datasets.FakeData):
    """torchvision's FakeData (each image seeded by its index) with class-balanced ``targets``.

    FakeData draws each label with the image and keeps no list of them; ours are ``index % classes``
    so ``targets`` is known without generating every image.
    """

    def __init__(self, size: int, shape: tuple[int, int, int], num_classes: int, transform, offset: int):
        super().__init__(size, shape, num_classes, transform, random_offset=offset)
        self.targets = [i % num_classes for i in range(size)]

    def __getitem__(self, index: int):
        image, _ = super().__getitem__(index)
        return image, self.targets[index]


# --- factories -------------------------------------------------------------------------------------

def fake(*, image_size: int, augment: AugmentConfig, num_classes: int,
         train_size: Annotated[int, Range(ge=1, le=1_000_000)] = 256,
         val_size: Annotated[int, Range(ge=1, le=1_000_000)] = 64,
         in_chans: Annotated[int, Range(ge=1, le=4)] = 3) -> DatasetSplits:  # 1 to 4: a PIL image's channels
    """Random images with balanced labels, identical in every process: for smoke tests and timing."""
    num_classes = num_classes or 10
    mean = std = (0.5,) * in_chans
    train_tf, eval_tf = _transforms(image_size, augment, mean, std, crop_pct=1.0)
    shape = (in_chans, image_size, image_size)
    train = FakeImages(train_size, shape, num_classes, train_tf, offset=0)
    val = FakeImages(val_size, shape, num_classes, eval_tf, offset=train_size)  # unseen images
    return DatasetSplits(train, val, num_classes, in_chans, [f"class{i}" for i in range(num_classes)], mean, std,
                         crop_pct=1.0, fingerprint=fingerprint("fake", train_size, val_size, shape, num_classes))


def cifar10(*, root: str, image_size: int, augment: AugmentConfig, num_classes: int,
            download: bool = False) -> DatasetSplits:
    """CIFAR-10 in memory, from torchvision's files, a train/ + test/ image-folder tree or its .tar.gz."""
    return _cifar("cifar10", tv_datasets.CIFAR10, CIFAR10_MEAN, CIFAR10_STD, root=root,
                  image_size=image_size, augment=augment, num_classes=num_classes, download=download)


def cifar100(*, root: str, image_size: int, augment: AugmentConfig, num_classes: int,
             download: bool = False) -> DatasetSplits:
    """CIFAR-100 in memory, from torchvision's files, a train/ + test/ image-folder tree or its .tar.gz."""
    return _cifar("cifar100", tv_datasets.CIFAR100, CIFAR100_MEAN, CIFAR100_STD, root=root,
                  image_size=image_size, augment=augment, num_classes=num_classes, download=download)


def fashion_mnist(*, root: str, image_size: int, augment: AugmentConfig, num_classes: int,
                  download: bool = False) -> DatasetSplits:
    """Fashion-MNIST in memory, from IDX files (Debian's dataset-fashion-mnist or torchvision's)."""
    if root:
        root_path = Path(root).expanduser()
    else:
        root_path = DEBIAN_FASHION_MNIST if DEBIAN_FASHION_MNIST.is_dir() else Path(default_data_root())
    torchvision_raw = root_path / "FashionMNIST" / "raw"
    files = _idx_files(root_path) or _idx_files(torchvision_raw)
    if files is None and download:
        try:
            tv_datasets.FashionMNIST(str(root_path), download=True)
        except (OSError, RuntimeError) as exc:
            raise KdkitError(f"fashion_mnist: could not download Fashion-MNIST into {root_path}: {exc}") from exc
        files = _idx_files(torchvision_raw)
    if files is None:
        names = ", ".join(f"{name}[.gz]" for pair in FASHION_MNIST_FILES.values() for name in pair)
        raise KdkitError(
            f"fashion_mnist: no data found. Looked in {root_path} and {torchvision_raw} for {names}. "
            f"Install it with `apt-get install dataset-fashion-mnist` (into {DEBIAN_FASHION_MNIST}, the "
            f"default root), set data.root to a folder holding those files, or set data.download = true "
            f"to download it into {root_path} (needs network)."
        )
    arrays = {"classes": tv_datasets.FashionMNIST.classes}
    for split, (images, labels) in files.items():
        arrays[f"{split}_images"] = _read_idx(images)[..., None]  # grey: one channel, HWC
        arrays[f"{split}_targets"] = _read_idx(labels)
    return _in_memory_splits("fashion_mnist", arrays, FASHION_MNIST_MEAN, FASHION_MNIST_STD,
                             image_size=image_size, augment=augment, num_classes=num_classes)


class SelectedImageFolder(tv_datasets.ImageFolder):
    """ImageFolder restricted to the class folders ``keep`` names (all of them must exist), reading each
    image with ``read_image`` (an unreadable one is named)."""

    def __init__(self, root: str, transform, keep: list[str] | None):
        self.keep = keep
        super().__init__(root, transform=transform, loader=read_image)

    def find_classes(self, directory):
        classes, _ = super().find_classes(directory)
        if self.keep is None:
            return classes, {c: i for i, c in enumerate(classes)}
        missing = sorted(set(self.keep) - set(classes))
        if missing:
            raise FileNotFoundError(f"{directory} lacks {len(missing)} of the listed class folders: "
                                    f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        chosen = sorted(self.keep)
        return chosen, {c: i for i, c in enumerate(chosen)}


def _class_list(path: str) -> list[str] | None:
    if not path:
        return None
    try:
        names = [line.split("#")[0].strip() for line in Path(path).read_text().splitlines()]
    except OSError as exc:
        raise KdkitError(f"imagefolder: cannot read the class list {path}: {exc}") from None
    return [name for name in names if name]


def imagefolder(*, root: str, image_size: int, augment: AugmentConfig, num_classes: int,
                classes: str = "") -> DatasetSplits:
    """Any root/train/<class>/ + root/val/<class>/ tree (e.g. ImageNet-100), decoded per item.

    ``classes`` names a text file of class folders to keep (one per line), so ImageNet-100 can be
    read straight from a full ImageNet tree.
    """
    root_path = Path(root or default_data_root()).expanduser()
    folders = [root_path / "train", root_path / "val"]
    missing = [str(f) for f in folders if not f.is_dir()]
    if missing:
        raise KdkitError(f"imagefolder: {' and '.join(missing)} not found; set data.root to a folder "
                         f"holding train/<class>/<image> and val/<class>/<image>")
    train_tf, eval_tf = _transforms(image_size, augment, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD,
                                    crop_pct=0.875)
    keep = _class_list(classes)
    try:
        train = SelectedImageFolder(str(folders[0]), train_tf, keep)
        val = SelectedImageFolder(str(folders[1]), eval_tf, keep)
    except FileNotFoundError as exc:  # ImageFolder's words for a folder without class folders or images
        raise KdkitError(f"imagefolder: {exc}") from exc
    if val.classes != train.classes:  # labels are class indices: they would silently disagree
        raise KdkitError(f"imagefolder: {folders[1]} and {folders[0]} have different class folders "
                         f"({sorted(set(val.classes) ^ set(train.classes))} in only one)")
    _check_num_classes("imagefolder", num_classes, len(train.classes))
    files = [(split, os.path.relpath(path, root_path), label, os.path.getsize(path))
             for split, part in (("train", train), ("val", val)) for path, label in part.samples]
    return DatasetSplits(train, val, len(train.classes), 3, train.classes, IMAGENET_DEFAULT_MEAN,
                         IMAGENET_DEFAULT_STD, crop_pct=0.875, fingerprint=fingerprint(train.classes, files))


@hookimpl
def kdkit_register_datasets(registry) -> None:
    for factory in (fake, cifar10, cifar100, fashion_mnist, imagefolder):
        registry.register_module(factory.__name__, module=factory)


# --- shared helpers --------------------------------------------------------------------------------

def _transforms(image_size: int, augment: AugmentConfig, mean, std, *, crop_pct: float):
    return (build_transforms(image_size, augment, mean, std, train=True),
            build_transforms(image_size, augment, mean, std, train=False, crop_pct=crop_pct))


def _check_num_classes(name: str, requested: int, found: int) -> None:
    if requested and requested != found:
        raise KdkitError(f"{name}: data.num_classes is {requested} but the dataset has {found} classes")


def _in_memory_splits(name: str, arrays: dict, mean, std, *, image_size: int, augment: AugmentConfig,
                      num_classes: int) -> DatasetSplits:
    """Train and test arrays as InMemoryImages, evaluated on the whole image (stored at native size)."""
    classes = list(arrays["classes"])
    _check_num_classes(name, num_classes, len(classes))
    train_tf, eval_tf = _transforms(image_size, augment, mean, std, crop_pct=1.0)
    train = InMemoryImages(arrays["train_images"], arrays["train_targets"], train_tf, classes)
    val = InMemoryImages(arrays["test_images"], arrays["test_targets"], eval_tf, classes)
    content = fingerprint(classes, *(arrays[f"{split}_{kind}"] for split in SPLITS for kind in ("images", "targets")))
    return DatasetSplits(train, val, len(classes), train.images.shape[-1], classes, mean, std, crop_pct=1.0,
                         fingerprint=content)


def _cifar(name: str, dataset_class, mean, std, *, root: str, download: bool, **context) -> DatasetSplits:
    """Prefer torchvision's files, then an image tree or archive; download only when neither is there."""
    root_path = Path(root or default_data_root()).expanduser()
    native = root_path / dataset_class.base_folder
    tree = None if native.is_dir() else _find_image_tree(root_path)
    if tree is not None:
        arrays = _decoded(tree)
    elif native.is_dir() or download:
        arrays = _from_torchvision(name, dataset_class, root_path, download)
    else:
        raise KdkitError(
            f"{name}: no data found. Looked for {native} (torchvision's files), {root_path / 'train'} and "
            f"{root_path / 'test'} (an image-folder tree of <class>/<image>), and a .tar.gz of such a tree "
            f"at or in {root_path}. Set data.root to such a folder or archive, or set data.download = "
            f"true to download it into {root_path} (needs network)."
        )
    return _in_memory_splits(name, arrays, mean, std, **context)


def _from_torchvision(name: str, dataset_class, root: Path, download: bool) -> dict:
    try:
        parts = {split: dataset_class(str(root), train=split == "train", download=download) for split in SPLITS}
    except (OSError, RuntimeError) as exc:  # no network, unwritable root, corrupt files
        raise KdkitError(f"{name}: could not {'download' if download else 'read'} torchvision's "
                         f"files in {root}: {exc}") from exc
    arrays = {"classes": parts["train"].classes}
    for split, part in parts.items():
        arrays[f"{split}_images"], arrays[f"{split}_targets"] = part.data, part.targets
    return arrays


def _idx_files(folder: Path) -> dict[str, tuple[Path, Path]] | None:
    """Fashion-MNIST's four IDX files in ``folder``, each plain or gzipped; None unless all are there."""
    found = {}
    for split, names in FASHION_MNIST_FILES.items():
        paths = [next((p for p in (folder / n, folder / f"{n}.gz") if p.is_file()), None) for n in names]
        if None in paths:
            return None
        found[split] = tuple(paths)
    return found


def _read_idx(path: Path) -> np.ndarray:
    """An IDX array of unsigned bytes (the MNIST file format), gzipped or not."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = bytearray(f.read())  # writable, so torch can share it without a warning
    if data[:3] != b"\0\0\x08":
        raise KdkitError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


# --- image trees and archives, decoded once and cached ------------------------------------------------

def _find_image_tree(root: Path) -> Path | None:
    """``root`` if it is an archive or holds train/ and test/, else the one archive inside it."""
    if root.is_file():
        return root if root.name.endswith(ARCHIVE_SUFFIXES) else None
    if all((root / split).is_dir() for split in SPLITS):
        return root
    archives = sorted(p for p in root.iterdir() if p.name.endswith(ARCHIVE_SUFFIXES)) if root.is_dir() else []
    if len(archives) > 1:
        raise KdkitError(f"{root} holds several archives ({', '.join(p.name for p in archives)}): "
                         f"set data.root to the one to use")
    return archives[0] if archives else None


def _cache_dir() -> Path:
    return cache_root() / "decoded"


def _decoded(source: Path) -> dict:
    """The arrays of an image tree or archive: decoded the first time, memory-mapped from the cache after."""
    cache = _cache_dir() / f"{source.name.split('.')[0]}-{_fingerprint(source)}.pt"
    if cache.is_file():
        try:
            return torch.load(cache, mmap=True, weights_only=True)
        except Exception as exc:  # truncated or damaged: torch raises several kinds
            raise KdkitError(f"{cache}: cannot read the decoded-data cache ({type(exc).__name__}): the file is "
                             "truncated or damaged; remove it and the data is decoded again") from None
    arrays = _decode_tree(source)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_name(f"{cache.name}.{os.getpid()}.partial")
        torch.save(arrays, partial)
        os.replace(partial, cache)  # atomic: a concurrent reader sees the whole file or none
    except OSError as exc:
        warnings.warn(f"could not cache the decoded {source} in {cache.parent}: {exc}", stacklevel=2)
    return arrays


def _fingerprint(source: Path) -> str:
    """A hash of the absolute path, sizes and mtimes of the source's files: any change decodes again."""
    files = [source] if source.is_file() else [path for _, path in _tree_files(source)]
    digest = hashlib.sha256(f"{CACHE_FORMAT} {source.resolve()}".encode())
    for path in files:
        stat = path.stat()
        digest.update(f"\n{path.relative_to(source)} {stat.st_size} {stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)  # "._x.jpg": macOS metadata


def _tree_files(folder: Path) -> list[tuple[str, Path]]:
    return [(split, path) for split in SPLITS for path in sorted((folder / split).glob("*/*"))
            if path.is_file() and _is_image(path.name)]


def _image_files(source: Path):
    """(split, class, file name, bytes) of each ``split/class/file`` image of a folder or an archive.

    An archive is read as a stream, never extracted; its entries may sit under one top folder.
    """
    if source.is_dir():
        for split, path in _tree_files(source):
            yield split, path.parent.name, path.name, path.read_bytes()
        return
    with tarfile.open(source) as tar:
        for member in tar:
            parts = PurePosixPath(member.name).parts
            if member.isfile() and len(parts) >= 3 and parts[-3] in SPLITS and _is_image(parts[-1]):
                yield parts[-3], parts[-2], parts[-1], tar.extractfile(member).read()


def _decode_tree(source: Path) -> dict:
    """Decode every image; classes are the sorted train folder names, files sorted within a class."""
    found = {split: [] for split in SPLITS}
    for split, label, name, data in _image_files(source):
        found[split].append((label, name, data))
    classes = sorted({label for label, _, _ in found["train"]})
    index = {label: i for i, label in enumerate(classes)}
    arrays = {"classes": classes}
    for split, items in found.items():
        if not items:
            raise KdkitError(f"{source} holds no {split}/<class>/<image> files")
        unknown = sorted({label for label, _, _ in items} - index.keys())
        if unknown:
            raise KdkitError(f"{source}: classes {unknown} are in {split}/ but not in train/")
        items.sort(key=lambda item: item[:2])
        # HWC uint8 RGB arrays (PIL: torchvision.io's decoders are deprecated since 0.29)
        images = [np.asarray(read_image(data, name=f"{source}: {split}/{label}/{name}"))
                  for label, name, data in items]
        sizes = sorted({tuple(image.shape[:2]) for image in images})
        if len(sizes) > 1:
            raise KdkitError(f"{source}: the {split} images differ in size ({sizes[:3]}...); the in-memory "
                             f"datasets need one size: use the imagefolder dataset for such data")
        arrays[f"{split}_images"] = torch.from_numpy(np.stack(images))
        arrays[f"{split}_targets"] = torch.tensor([index[label] for label, _, _ in items])
    return arrays
