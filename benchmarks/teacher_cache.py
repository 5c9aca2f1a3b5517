"""A CivT epoch read from a teacher-output cache, against the same student with no teachers and with live ones.

The setting is the CIFAR-10 study's at 32 px (fake images of that size, so it runs anywhere): the
study's small ViT with three tokens, taught by a ResNet-10-T and a width-0.25 RedNet-26 with
``small_input`` stems. The cache is built first (its time and size are printed), then the three
variants train one epoch each in turn, ``--repeats`` times; medians are reported, with the ratio of
the cached epoch to the teacher-less one (the target: at most 1.15).

    python benchmarks/teacher_cache.py --images 2048 --repeats 3 --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _machine import alone
from _built import CIVT_KL, built_from_recipe, train_epoch

RECIPE = """
seed = 0
[data]
dataset = "fake"
image_size = 32
num_classes = 10
train_size = {images}
val_size = 64
workers = 0
[student]
plugin = "vit"
tokens = {tokens}
token_kind = "learned"
patch_size = 4
embed_dim = 96
depth = 4
num_heads = 3
drop_path_rate = 0.0
{teachers}
[[losses]]
plugin = "ce"
head = "cls"
{losses}
[train]
epochs = 1
batch_size = 64
warmup_epochs = 0
[augment]
crop_scale = [0.35, 1.0]
label_smoothing = 0.1
{cache}
"""
TEACHERS = """
[teachers.conv]
plugin = "timm"
model = "resnet10t"
small_input = true
[teachers.inv]
plugin = "rednet"
depth = 26
width = 0.25
small_input = true
"""


def built(folder: Path, name: str, images: int, teachers: bool, cache: bool):
    text = RECIPE.format(images=images, tokens='["cls", "conv", "inv"]' if teachers else '["cls"]',
                         teachers=TEACHERS if teachers else "", losses=CIVT_KL if teachers else "",
                         cache="[teacher_cache]\nviews = 4" if cache else "")
    return built_from_recipe(text, folder, name)


def epoch_seconds(variant, epoch: int) -> float:
    start = time.perf_counter()
    train_epoch(variant, epoch)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ["KDKIT_CACHE"] = str(folder / "cache")
        start = time.perf_counter()
        cached = built(folder, "cached", args.images, teachers=True, cache=True)
        build = time.perf_counter() - start
        variants = {"no teachers": built(folder, "alone", args.images, teachers=False, cache=False),
                    "online teachers": built(folder, "online", args.images, teachers=True, cache=False),
                    "cached teachers": cached}
        times = {name: [] for name in variants}
        for repeat in range(args.repeats):
            for name, variant in variants.items():
                times[name].append(epoch_seconds(variant, repeat))
        records = {name: json.loads((c.path / "complete.json").read_text())
                   for name, c in cached.parts.teacher_outputs.items()}
    print(f"threads {args.threads}; {args.images} fake 32 px images, batch 64; medians of {args.repeats} epochs, "
          "variants interleaved")
    for name, record in records.items():
        print(f"cache of {name!r}: {record['views']} views, {record['bytes_per_image']:.0f} bytes per image, "
              f"{record['build_s']:.1f} s to build")
    print(f"cache build and model setup, both teachers: {build:.1f} s")
    alone = statistics.median(times["no teachers"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:>16}: {median:7.2f} s per epoch, {args.images / median:7.1f} img/s, "
              f"{median / alone:.2f}x the student alone")


if __name__ == "__main__":
    with alone():
        main()
