"""Data parallelism on PyTorch's own engine: one process per device, started by torchrun.

kdkit has no cluster code of its own. A launcher that sets torchrun's variables (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and a rendezvous: torchrun itself, on one machine or several, or
SLURM's ``srun`` starting torchrun) makes ``kdkit run`` one run over every process: the process
group is initialised here (NCCL on CUDA, gloo on the CPU), each process trains on its share of every
global batch with the student and its heads in DistributedDataParallel, and rank 0 alone writes the
run directory and prints. Without those variables everything here is a no-op.

A process that stalls (stopped, hung, its node gone) must not leave the others waiting for ever: every
collective of the training loop gives up after ``KDKIT_COLLECTIVE_TIMEOUT_S`` seconds (default 1800,
longer than compiling or writing a checkpoint takes), and the run fails naming the rank that gave up.
Waits that are legitimately long (the other processes waiting while rank 0 alone works in ``on_main``,
or for the slowest share of a teacher-output cache build in ``wait_for_all``) go through a second
group, of gloo, without that limit.
"""
from __future__ import annotations

import datetime
import functools
import math
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kdkit.errors import KdkitError, RunFailed

TIMEOUT_VARIABLE = "KDKIT_COLLECTIVE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800.0
LONG_WAIT = datetime.timedelta(days=7)  # no practical limit: rank 0 alone may work for hours (a cache)


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

    def wait_for_all(self) -> None:
        """A barrier where some processes may wait for hours (uneven shares of work): no collective timeout."""
        if self.active:
            dist.barrier(group=_long_waits())

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
        dist.broadcast_object_list(outcome, src=0, group=_long_waits())
        ok, value = outcome[0]
        if not ok:
            raise value
        return value


@functools.cache
def processes() -> Processes:
    """This process's place, the process group initialised on first use when torchrun started several."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=collective_timeout_s())
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)
        _long_waits()  # every process creates the group now, in the same order
    return Processes(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def collective_timeout_s() -> float:
    """``KDKIT_COLLECTIVE_TIMEOUT_S``: seconds a process waits in a collective for the others."""
    text = os.environ.get(TIMEOUT_VARIABLE, "")
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise KdkitError(f"{TIMEOUT_VARIABLE}={text!r}: expected a number of seconds > 0 (default {DEFAULT_TIMEOUT_S:g})")
    return seconds


@functools.cache
def _long_waits():
    """The process group for waits without a practical limit (gloo: CPU only, any device)."""
    return dist.new_group(backend="gloo", timeout=LONG_WAIT)


def timed_out(exc: BaseException) -> RunFailed | None:
    """A collective that gave up waiting as RunFailed naming the ranks; None for any other error.

    gloo's errors say ``Timed out waiting 5000ms for recv``, then (the connection closed, for a collective
    after it, such as the run's last barrier) ``Application timeout caused pair closure``, raised while the
    first is handled. NCCL's watchdog ends the process itself, with a message naming the rank.
    """
    causes = []
    while exc is not None:
        causes.append(exc)
        exc = exc.__context__
    messages = [str(e).lower() for e in causes if isinstance(e, RuntimeError)]
    if not (dist.is_initialized() and any("timed out" in m or "timeout" in m for m in messages)):
        return None
    me = processes()
    others = ", ".join(str(rank) for rank in range(me.world) if rank != me.rank)
    return RunFailed(f"rank {me.rank} of {me.world} ({socket.gethostname()}) waited {collective_timeout_s():g} s "
                     f"({TIMEOUT_VARIABLE}) in a collective operation for rank(s) {others}: one of them stalled, "
                     "hung or died")


def shutdown() -> None:
    """Leave the process group (the command line does, at exit)."""
    if dist.is_initialized():
        dist.destroy_process_group()
