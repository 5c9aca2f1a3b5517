"""RedNet-26 training and inference images/s against timm's ResNet-26, and small RedNets against small ResNets.

RedNet-26 needs 30% fewer multiply-adds than ResNet-26 (1.69 vs 2.34 G at 224 px); this prints
whether it also runs faster, with the fused CPU involution and with the portable one, in one process:
every model trains the same random batches with SGD, the models take turns within each repeat, and
the medians are reported. The 32 px rows use ``small_input`` stems (full resolution in stage 1), as
the CIFAR-10 study's teachers do.

    python benchmarks/rednet_training.py --threads 2 --repeats 5
    python benchmarks/rednet_training.py --device cuda --batch-224 128 --batch-32 512 --repeats 20
"""
from __future__ import annotations

import argparse
import contextlib
import statistics

import torch

import kdkit
from kdkit_plugins import involution as involution_module
from _machine import alone
from _timing import seconds


@contextlib.contextmanager
def portable_involution():
    """Run the block with the portable (K*K-pass) operator instead of the fused (CPU) or Triton (CUDA) one."""
    fused, triton = involution_module.fused_applies, involution_module.triton_kernels
    involution_module.fused_applies, involution_module.triton_kernels = (lambda *args: False), (lambda: None)
    try:
        yield
    finally:
        involution_module.fused_applies, involution_module.triton_kernels = fused, triton


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
    def step():
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return seconds(step, images.device)


@torch.no_grad()
def infer_step(model, images) -> float:
    return seconds(lambda: model(images), images.device)


def measure(models: dict, batch: int, size: int, classes: int, repeats: int, device: torch.device) -> dict:
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, classes, (batch,), device=device)
    for model, _ in models.values():
        model.to(device)
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
    parser.add_argument("--device", default="cpu", help="cpu (fused = the C++ kernels) or cuda (fused = Triton)")
    parser.add_argument("--batch-224", type=int, default=8)
    parser.add_argument("--batch-32", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    print(f"{device}, threads {args.threads}; fp32 SGD steps on random images; medians of {args.repeats}, "
          f"models interleaved")
    report(f"224 px, batch {args.batch_224}", measure(models_224(), args.batch_224, 224, 1000, args.repeats, device),
           "ResNet-26 (timm)")
    report(f"32 px (small_input), batch {args.batch_32}",
           measure(models_32(), args.batch_32, 32, 10, args.repeats, device), "ResNet-10-T (timm)")


if __name__ == "__main__":
    with alone():
        main()
