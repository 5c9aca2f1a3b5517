"""What kdkit's loop costs over the same work done by hand or by timm, per training step, in one process.

1. DeiT-style distillation (one teacher, a class and a distillation token): kdkit's step (``kdkit.build``)
   against timm's ``TokenDistillationTask`` with a timm distilled ViT of the same shape, the same
   teacher, batch and AdamW. Target: at most 1.05x.
2. CivT (two teachers, three tokens): kdkit's step against a minimal hand-written PyTorch
   step doing the same work (student forward, teachers under no_grad, CE + two KL terms, backward,
   AdamW) on the same batch in memory. Target: at most 1.05x.
3. The CivT step's achieved multiply-add rate (3x the forward's multiply-adds per image: forward,
   and twice that backward), as a fraction of a large fp32 matrix multiply's on the same machine.

Every variant sees the same random batch; variants take turns within each repeat; medians reported.

    python benchmarks/engine_cost.py --threads 2 --repeats 15
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.task import TokenDistillationTask

from _machine import alone
from _timing import seconds
import kdkit
from _built import built_from_recipe

SIZE, PATCH, DIM, DEPTH, HEADS, BATCH, CLASSES = 64, 8, 192, 6, 3, 32, 10

RECIPE = f"""
seed = 0
[data]
dataset = "fake"
image_size = {SIZE}
num_classes = {CLASSES}
train_size = {BATCH}
val_size = 8
workers = 0
[student]
plugin = "vit"
tokens = {{tokens}}
patch_size = {PATCH}
embed_dim = {DIM}
depth = {DEPTH}
num_heads = {HEADS}
drop_path_rate = 0.0
{{teachers}}
[[losses]]
plugin = "ce"
head = "cls"
{{losses}}
[train]
epochs = 1
batch_size = {BATCH}
lr = 5e-4
warmup_epochs = 0
"""
TEACHER = """
[teachers.{name}]
plugin = "timm"
model = "{model}"
[[losses]]
plugin = "kl"
head = "{head}"
teachers = ["{name}"]
"""


def kdkit_built(folder: Path, name: str, tokens: list[str], teachers: dict[str, str]):
    blocks = "".join(TEACHER.format(name=t, model=m, head=h) for h, (t, m) in zip(tokens[1:], teachers.items()))
    return built_from_recipe(RECIPE.format(tokens=str(tokens).replace("'", '"'), teachers="", losses=blocks),
                               folder, name)


def timm_deit_step(images, labels, teacher: torch.nn.Module):
    """timm's distilled ViT of the kdkit student's shape, trained by TokenDistillationTask."""
    student = timm.create_model("deit_tiny_distilled_patch16_224", img_size=SIZE, patch_size=PATCH, embed_dim=DIM,
                                depth=DEPTH, num_heads=HEADS, num_classes=CLASSES, drop_path_rate=0.0)
    task = TokenDistillationTask(student, teacher, criterion=torch.nn.CrossEntropyLoss(), distill_loss_weight=1.0,
                                 task_loss_weight=1.0, verbose=False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=5e-4, weight_decay=0.05)

    def step():
        task(images, labels)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def hand_civt_step(built, images, labels):
    """The CivT step written out by hand: what kdkit's step does, with nothing around it."""
    model, teachers = built.model, built.teachers
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
    target = F.one_hot(labels, CLASSES).float()
    mean, std = built.step.mean, built.step.std

    def step():
        logits = model(images)
        loss = torch.sum(-target * F.log_softmax(logits["cls"], -1), -1).mean()
        with torch.no_grad():
            t = {name: teachers[name].model(teachers[name].normalize_input(images, mean, std)) for name in teachers}
        for head, name in (("conv", "conv"), ("inv", "inv")):
            loss = loss + F.kl_div(F.log_softmax(logits[head], -1), F.log_softmax(t[name], -1), reduction="batchmean",
                                   log_target=True)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def matmul_rate() -> float:
    m = torch.randn(1024, 1024)
    return 1024**3 / min(seconds(lambda: m @ m) for _ in range(5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images, labels = torch.randn(BATCH, 3, SIZE, SIZE), torch.randint(0, CLASSES, (BATCH,))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        deit = kdkit_built(folder, "deit", ["cls", "dist"], {"teacher": "resnet18"})
        civt = kdkit_built(folder, "civt", ["cls", "conv", "inv"], {"conv": "resnet18", "inv": "resnet26"})
        variants = {
            "kdkit DeiT-style": lambda: deit.step(images, labels, epoch=0, step=0),
            "timm TokenDistillationTask": timm_deit_step(images, labels, deit.teachers["teacher"]),
            "kdkit CivT": lambda: civt.step(images, labels, epoch=0, step=0),
            "hand-written CivT": hand_civt_step(civt, images, labels),
        }
        for step in variants.values():
            step()  # warm-up
        times = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, step in variants.items():
                times[name].append(seconds(step))
        med = {name: statistics.median(t) for name, t in times.items()}
        macs = kdkit.count_flops(civt.model, images[:1]).total
        teacher_macs = sum(kdkit.count_flops(t.model, images[:1]).total for t in civt.teachers.values())
    print(f"threads {args.threads}; ViT {SIZE} px, patch {PATCH}, dim {DIM}, depth {DEPTH}; batch {BATCH}; AdamW; "
          f"medians of {args.repeats} steps, variants interleaved")
    for name, value in med.items():
        print(f"{name:>28}: {value * 1e3:8.1f} ms per step")
    print(f"kdkit DeiT-style / timm TokenDistillationTask: {med['kdkit DeiT-style'] / med['timm TokenDistillationTask']:.3f}"
          " (target <= 1.05)")
    print(f"kdkit CivT / hand-written CivT: {med['kdkit CivT'] / med['hand-written CivT']:.3f} (target <= 1.05)")
    achieved = BATCH * (3 * macs + teacher_macs) / med["kdkit CivT"]
    rate = matmul_rate()
    print(f"CivT step: {achieved / 1e9:.1f} G multiply-adds/s (student forward+backward, teachers forward) = "
          f"{achieved / rate:.2f} of a 1024x1024 fp32 matmul's {rate / 1e9:.1f} G/s")


if __name__ == "__main__":
    with alone():
        main()
