"""Training images/s of CivT-Ti with its two teachers, DeiT-style with one teacher, and the student alone.

CivT-Ti's shapes (224 px, patch 16, dim 192, 12 blocks; three tokens and heads), random teachers
(RegNetY-600MF and RedNet-26, the paper's light pair; a RegNetY-600MF alone for the DeiT-style
row), kdkit's own training step (``kdkit.build(...).step``: mixing off, AdamW) on one fixed random
batch, on whatever device is given: on CUDA with bf16 autocast, channels-last convolutional
teachers and, with ``--compile``, ``torch.compile`` for the student and the teachers. Variants take
turns within each repeat; the device is synchronised around every step; medians are reported.

    python benchmarks/civt_speed.py --device cuda --batch-size 128 --repeats 20
    python benchmarks/civt_speed.py --device cpu --batch-size 8 --repeats 3   # a smoke run
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from _machine import alone
from _timing import seconds
from _built import built_from_recipe

RECIPE = """
seed = 0
[data]
dataset = "fake"
image_size = 224
num_classes = 1000
train_size = {batch}
val_size = 8
workers = 0
[student]
plugin = "vit"
preset = "ti"
tokens = {tokens}
drop_path_rate = 0.1
[train]
epochs = 1
batch_size = {batch}
warmup_epochs = 0
compile = {compile}
[[losses]]
plugin = "ce"
head = "cls"
{teachers}
"""
TEACHER = """
[teachers.{name}]
{model}
compile = {compile}
[[losses]]
plugin = "kl"
head = "{name}"
teachers = ["{name}"]
"""
MODELS = {"conv": 'plugin = "timm"\nmodel = "regnety_006"', "inv": 'plugin = "rednet"\ndepth = 26'}
VARIANTS = {"CivT-Ti, two teachers": ["conv", "inv"], "DeiT-style, one teacher": ["conv"], "student alone": []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="torch.compile the student and the teachers")
    args = parser.parse_args()
    device = torch.device(args.device)
    compile_ = str(args.compile).lower()
    with tempfile.TemporaryDirectory() as tmp:
        variants = {}
        for label, teachers in VARIANTS.items():
            blocks = "".join(TEACHER.format(name=t, model=MODELS[t], compile=compile_) for t in teachers)
            text = RECIPE.format(batch=args.batch_size, tokens=str(["cls", *teachers]).replace("'", '"'),
                                 compile=compile_, teachers=blocks)
            variants[label] = built_from_recipe(text, Path(tmp), label.split(",")[0].replace(" ", "_"), device)
        images = torch.randn(args.batch_size, 3, 224, 224)
        labels = torch.randint(0, 1000, (args.batch_size,))
        times = {label: [] for label in variants}
        for repeat in range(args.repeats + 2):  # two warm-up rounds (and compilation) first
            for label, built in variants.items():
                took = seconds(lambda: built.step(images, labels, epoch=0, step=0), device)
                if repeat >= 2:
                    times[label].append(took)
    rates = {label: args.batch_size / statistics.median(t) for label, t in times.items()}
    alone = rates["student alone"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}; batch {args.batch_size}; precision auto (bf16 on CUDA); compile {args.compile}; medians of "
          f"{args.repeats} steps, variants interleaved")
    for label, rate in rates.items():
        print(f"{label:>24}: {rate:8.1f} img/s, {rate / alone:.2f}x the student alone")


if __name__ == "__main__":
    with alone():
        main()
