"""Data parallelism on PyTorch's own engine: one process per device, started by torchrun.

kdkit has no cluster code of its own. A launcher that sets torchrun's variables (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and a rendezvous: torchrun itself, on one machine or several, or
SLURM's ``srun`` starting torchrun) makes ``kdkit run`` one run over every process: the process
group is initialised here (NCCL on CUDA, gloo on the CPU), each process trains on its share of every
global batch with the student and its heads in DistributedDataParallel, and rank 0 alone writes the
run directory and prints. Without those variables everything here is a no-op.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Processes:
    """This process's place among the run's processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def device(self) -> torch.device:
        """The device this process trains on: its local GPU, or the CPU."""
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the processes (in place; itself in one process)."""
        if self.active:
            dist.all_reduce(tensor)
        return tensor

    def on_main(self, fn):
        """``fn()`` run on rank 0 alone, its result (or its exception) given to every process.

        For what one process must decide for all (is the run directory writable? is a teacher trained
        yet?), so that no process waits forever in a collective another one never reaches.
        """
        if not self.active:
            return fn()
        outcome = [None]
        if self.is_main:
            try:
                outcome[0] = (True, fn())
            except Exception as exc:  # noqa: BLE001 - passed to every process, raised there
                outcome[0] = (False, exc)
        dist.broadcast_object_list(outcome, src=0)
        ok, value = outcome[0]
        if not ok:
            raise value
        return value


@functools.cache
def processes() -> Processes:
    """This process's place, the process group initialised on first use when torchrun started several."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Processes(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def shutdown() -> None:
    """Leave the process group (the command line does, at exit)."""
    if dist.is_initialized():
        dist.destroy_process_group()
