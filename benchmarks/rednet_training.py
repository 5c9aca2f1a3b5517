"""RedNet-26 training and inference images/s against timm's ResNet-26, and small RedNets against small ResNets.

RedNet-26 needs 30% fewer multiply-adds than ResNet-26 (1.69 vs 2.34 G at 224 px); this prints
whether it also runs faster, with the fused CPU involution and with the portable one, in one process:
every model trains the same random batches with SGD, the models take turns within each repeat, and
the medians are reported. The 32 px rows use ``small_input`` stems (full resolution in stage 1), as
the CIFAR-10 study's teachers do.

    python benchmarks/rednet_training.py --threads 2 --repeats 5
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

import kdkit
from kdkit_plugins import involution as involution_module
from _machine import alone


@contextlib.contextmanager
def portable_involution():
    """Run the block with the portable (K*K-pass) operator instead of the fused one."""
    fused = involution_module.fused_applies
    involution_module.fused_applies = lambda *args: False
    try:
        yield
    finally:
        involution_module.fused_applies = fused


def models_224() -> dict:
    return {"RedNet-26 fused": (kdkit.build_model("teacher", plugin="rednet", depth=26, num_classes=1000), False),
            "RedNet-26 portable": (kdkit.build_model("teacher", plugin="rednet", depth=26, num_classes=1000), True),
            "ResNet-26 (timm)": (kdkit.build_model("teacher", plugin="timm", model="resnet26", num_classes=1000),
                                 False)}


def models_32() -> dict:
    def rednet(width):
        return kdkit.build_model("teacher", plugin="rednet", depth=26, num_classes=10, small_input=True, width=width)

    def timm(name):
        return kdkit.build_model("teacher", plugin="timm", model=name, num_classes=10, small_input=True)

    return {"RedNet-26 w0.25 fused": (rednet(0.25), False), "RedNet-26 w0.5 fused": (rednet(0.5), False),
            "RedNet-26 w0.5 portable": (rednet(0.5), True), "ResNet-10-T (timm)": (timm("resnet10t"), False),
            "ResNet-18 (timm)": (timm("resnet18"), False)}


def train_step(model, optimizer, images, labels) -> float:
    start = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


@torch.no_grad()
def infer_step(model, images) -> float:
    start = time.perf_counter()
    model(images)
    return time.perf_counter() - start


def measure(models: dict, batch: int, size: int, classes: int, repeats: int) -> dict:
    images = torch.randn(batch, 3, size, size)
    labels = torch.randint(0, classes, (batch,))
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for name, (m, _) in models.items()}
    times = {name: {"train": [], "infer": []} for name in models}
    for repeat in range(repeats + 1):  # the first round warms up
        for name, (model, portable) in models.items():
            with portable_involution() if portable else contextlib.nullcontext():
                model.train()
                train = train_step(model, optimizers[name], images, labels)
                model.eval()
                infer = infer_step(model, images)
            if repeat:
                times[name]["train"].append(train)
                times[name]["infer"].append(infer)
    return {name: {k: batch / statistics.median(v) for k, v in t.items()} for name, t in times.items()}


def report(title: str, rates: dict, reference: str) -> None:
    print(f"\n{title}\n{'model':>26} | {'train img/s':>11} {'infer img/s':>11} | train / {reference}, infer / {reference}")
    base = rates[reference]
    for name, r in rates.items():
        print(f"{name:>26} | {r['train']:11.1f} {r['infer']:11.1f} | {r['train'] / base['train']:.2f}, "
              f"{r['infer'] / base['infer']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"threads {args.threads}; SGD steps on random images; medians of {args.repeats}, models interleaved")
    report("224 px, batch 8", measure(models_224(), 8, 224, 1000, args.repeats), "ResNet-26 (timm)")
    report("32 px (small_input), batch 128", measure(models_32(), 128, 32, 10, args.repeats), "ResNet-10-T (timm)")


if __name__ == "__main__":
    with alone():
        main()
