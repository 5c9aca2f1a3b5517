"""Decoding image files: an unreadable one is named with its reason, an oversized one is refused before it is
decoded, and 16-bit greyscale is scaled to 8 bits (in the datasets and in ``kdkit predict``)."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

import kdkit
import kdkit_plugins.datasets as datasets
from kdkit.builder.images import read_image
from kdkit.errors import UnreadableImage
from kdkit.recipe.sections import AugmentConfig

from conftest import TWO_TEACHER_RECIPE


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels; its data holds almost nothing."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def truncated_jpeg() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = io.BytesIO()
    Image.fromarray(pixels).save(data, "JPEG")
    return data.getvalue()[: len(data.getvalue()) * 2 // 3]


BAD_FILES = {"truncated JPEG": (truncated_jpeg(), "image file is truncated"),
             "empty file": (b"", "the file is empty"),
             "text named .jpg": (b"not an image\n", "not an image file PIL can decode"),
             "decompression bomb": (png_claiming(200_000, 200_000), "more than 89,478,485 pixels")}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_an_unreadable_image_is_named_with_its_reason(kind, tmp_path):
    data, reason = BAD_FILES[kind]
    path = tmp_path / "x.jpg"
    path.write_bytes(data)
    with pytest.raises(UnreadableImage) as raised:
        read_image(path)
    assert str(raised.value).startswith(f"{path}: cannot read the image: ") and reason in str(raised.value)
    with pytest.raises(UnreadableImage, match=f"^archive: x.jpg: cannot read the image: .*{reason}"):
        read_image(data, name="archive: x.jpg")


def test_an_image_between_pils_warning_and_its_error_is_refused_too(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(png_claiming(10_000, 10_000))  # 1e8 pixels: PIL itself would only warn
    with pytest.raises(UnreadableImage, match="more than 89,478,485 pixels"):
        read_image(path)


def test_16_bit_grey_is_scaled_to_8_bits_not_clipped_to_white(tmp_path):
    grey = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # the whole 16-bit range
    path = tmp_path / "grey16.png"
    Image.fromarray(grey).save(path)
    assert Image.open(path).mode == "I;16"
    rgb = np.asarray(read_image(path))
    expected = np.round(grey / 257).astype(np.uint8)
    assert rgb.shape == (64, 64, 3) and all(np.array_equal(rgb[..., c], expected) for c in range(3))
    assert np.array_equal(np.asarray(read_image(path, "L")), expected)


def test_an_image_folder_names_its_unreadable_file(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split / "ant").mkdir(parents=True)
        Image.new("RGB", (20, 20)).save(tmp_path / split / "ant" / "0.png")
    bad = tmp_path / "train" / "ant" / "1.jpg"
    bad.write_bytes(b"")
    splits = datasets.imagefolder(root=str(tmp_path), image_size=16, augment=AugmentConfig(), num_classes=0)
    splits.train[0]
    with pytest.raises(UnreadableImage, match=f"^{bad}: cannot read the image: the file is empty$"):
        splits.train[1]


def test_an_image_tree_names_its_unreadable_file_when_decoding(tmp_path, monkeypatch):
    monkeypatch.setenv("KDKIT_CACHE", str(tmp_path / "cache"))
    for split in ("train", "test"):
        (tmp_path / "tree" / split / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "tree" / split / "cat" / "0.png")
    (tmp_path / "tree" / "test" / "cat" / "1.png").write_bytes(b"text")
    with pytest.raises(UnreadableImage, match="tree: test/cat/1.png: cannot read the image: not an image file"):
        datasets.cifar10(root=str(tmp_path / "tree"), image_size=8, augment=AugmentConfig(), num_classes=0)


def test_predict_names_an_oversized_image(write_recipe, cli, tmp_path):
    student_only = TWO_TEACHER_RECIPE.split("[teachers.conv]")[0] + \
        '[heads.cls]\nembedding = "pool"\n\n[[losses]]\nplugin = "ce"\nhead = "cls"\n\n[train]\nepochs = 0\nbatch_size = 16\n'
    out = kdkit.run(write_recipe(student_only), out=tmp_path / "out")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(200_000, 200_000))
    result = cli("predict", out, bomb)
    assert result.exit_code == 2 and result.output == (f"error: {bomb}: cannot read the image: it has more than "
                                                       "89,478,485 pixels, the limit (a decompression bomb?)\n")
