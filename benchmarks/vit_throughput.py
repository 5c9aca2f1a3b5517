"""Inference throughput of CivT-Ti (learned tokens, three heads) against timm's DeiT-Ti, in one process.

The paper reports 3053 img/s for CivT-Ti against 3083 for DeiT-Ti: two extra tokens and two extra
heads should cost a few percent at most. Both models see the same random 224 px batches.

    python benchmarks/vit_throughput.py --batch-size 64 --repeats 10 --device cuda
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch import nn

from _built import CIVT_KL, built_from_recipe
from _machine import alone
from _timing import seconds

RECIPE = """
[data]
dataset = "fake"
image_size = 224
num_classes = 1000
train_size = 8
val_size = 8
workers = 0
[student]
plugin = "vit"
preset = "ti"
tokens = ["cls", "conv", "inv"]
token_kind = "learned"
[teachers.conv]
plugin = "timm"
model = "test_resnet"
[teachers.inv]
plugin = "timm"
model = "test_resnet"
[[losses]]
plugin = "ce"
head = "cls"
{kl}
[train]
batch_size = 8
[eval]
heads = {eval_heads}
"""


def civt_ti(eval_heads: str, device: torch.device) -> nn.Module:
    """CivT-Ti as ``kdkit run`` builds it (one linear head per token; the teachers, random and small, are
    not timed): the student with its heads, whose ``predict`` is the eval prediction."""
    heads = '["cls", "conv", "inv"]' if eval_heads == "all" else '["cls"]'
    with tempfile.TemporaryDirectory() as tmp:
        return built_from_recipe(RECIPE.format(eval_heads=heads, kl=CIVT_KL), Path(tmp), "civt_ti", device).model


@torch.inference_mode()
def images_per_second(models: dict[str, Callable], batch: torch.Tensor, warmup: int,
                      repeats: int) -> dict[str, list[float]]:
    """Each model's (a forward function's) rate in each of ``repeats`` timed passes, after ``warmup`` untimed ones.

    The models take turns within each repeat, so a machine that slows down or speeds up over the
    run (other jobs, clocks) skews both alike.
    """
    for model in models.values():
        for _ in range(warmup):
            model(batch)
    times = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            times[name].append(seconds(lambda: model(batch), batch.device))
    return {name: [batch.shape[0] / t for t in ts] for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10, help="timed forward passes per model (median taken)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed forward passes per model first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--eval-heads", choices=["all", "cls"], default="all",
                        help="CivT's prediction: the mean of its three heads, or the cls head alone")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    batch = torch.randn(args.batch_size, 3, 224, 224, device=device)
    models = {
        "CivT-Ti": civt_ti(args.eval_heads, device).eval(),
        "DeiT-Ti (timm deit_tiny_patch16_224)": timm.create_model("deit_tiny_patch16_224").to(device).eval(),
    }
    forwards = {name: getattr(model, "predict", model) for name, model in models.items()}  # CivT: its eval prediction
    rates = images_per_second(forwards, batch, args.warmup, args.repeats)
    for name, model in models.items():
        params = sum(p.numel() for p in model.parameters())
        print(f"{name:<38} {params / 1e6:6.2f} M params  {statistics.median(rates[name]):9.1f} img/s (median)")
    civt, deit = rates.values()
    pairs = sorted(c / d for c, d in zip(civt, deit))  # each repeat's two passes ran back to back
    print(f"CivT-Ti / DeiT-Ti throughput, per repeated pair: median {statistics.median(pairs):.3f}, min "
          f"{pairs[0]:.3f}, max {pairs[-1]:.3f} (device {device}, batch {args.batch_size}, {args.repeats} pairs, "
          f"eval heads: {args.eval_heads}; target >= 0.97; paper: 3053 / 3083 = 0.990)")


if __name__ == "__main__":
    with alone():
        main()
