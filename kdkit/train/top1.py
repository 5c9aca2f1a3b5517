"""Top-1 accuracy, counted one way for the student's heads, its prediction and the teachers.

Each process counts the hits of its shard of the data; the counts (not the percentages) are summed
over the processes, so every image counts exactly once.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from kdkit.train.processes import Processes


class Top1:
    """Hits per named prediction and the number of images, added batch by batch. The names are fixed
    first, so a process whose shard is empty still sums the same counts as the others."""

    def __init__(self, names: Iterable[str]):
        self.hits = dict.fromkeys(names, 0)
        self.images = 0

    def add(self, logits: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        """One batch: ``logits`` per name, each (batch, classes), against ``labels``."""
        for name in self.hits:
            self.hits[name] += (logits[name].argmax(-1) == labels).sum().item()
        self.images += len(labels)

    def percent(self, processes: Processes = Processes(), device: torch.device = torch.device("cpu")) -> dict[str, float]:
        """Top-1 (%) per name, from the hits of every process (summed on ``device``, where they communicate)."""
        counts = torch.tensor([*self.hits.values(), self.images], dtype=torch.float64, device=device)
        counts = processes.sum(counts).tolist()
        return {name: 100.0 * counts[i] / counts[-1] for i, name in enumerate(self.hits)}


@torch.no_grad()
def top1(predict: Callable[[torch.Tensor], dict[str, torch.Tensor]], names: Iterable[str], loader: Iterable, *,
         device: torch.device, processes: Processes = Processes()) -> dict[str, float]:
    """Top-1 (%) of the ``names`` among the predictions ``predict(images)`` returns, over ``loader``'s
    (images, labels)."""
    count = Top1(names)
    for images, labels in loader:
        count.add(predict(images.to(device)), labels.to(device))
    return count.percent(processes, device)
