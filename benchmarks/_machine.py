"""Whether a benchmark had the machine to itself: timings are only comparable when it did.

``alone()`` wraps a benchmark's ``main``; when it ends it prints how much CPU other processes used
while it ran (from ``/proc/stat``, minus this process and its children), so a number measured beside
another job says so in its own output.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator


def _busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent outside idle and iowait since boot (None off Linux)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except OSError:
        return None
    busy = sum(fields) - fields[3] - fields[4]  # user nice system idle iowait irq softirq steal ...
    return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@contextlib.contextmanager
def alone(threshold: float = 0.1) -> Iterator[None]:
    """Print, at the end, the average number of cores other processes kept busy meanwhile."""
    start_busy, start_own, start = _busy_cpu_seconds(), _own_cpu_seconds(), time.perf_counter()
    try:
        yield
    finally:
        end_busy = _busy_cpu_seconds()
        if start_busy is None or end_busy is None:
            print("machine load: unknown (no /proc/stat); these timings may not have run alone")
        else:
            wall = time.perf_counter() - start
            others = max(0.0, (end_busy - start_busy) - (_own_cpu_seconds() - start_own)) / wall
            verdict = ("ran alone" if others < threshold else
                       "NOT alone: timings are disturbed, compare only ratios measured in this same run")
            print(f"machine load: other processes kept {others:.2f} of {os.cpu_count()} cores busy "
                  f"on average over {wall:.0f} s: {verdict}")
