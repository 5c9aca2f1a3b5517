"""Several runs at once: ``kdkit compare --jobs N`` keeps N single-machine runs going side by side.

Each run is its own ``kdkit`` process, with ``OMP_NUM_THREADS`` = cores / N and its output in a log
beside its run directory (``RUNS/<name>/seed<N>.log``). The processes are forked from a server that
imported torch, timm and kdkit once (multiprocessing's fork server), rather than started afresh: a
run then starts in a fraction of a second instead of several seconds, which is most of the cost of a
comparison of short runs. Each gets this process's environment and ``sys.path`` as they are when it
starts. What runs share is made first, in stages, so that no two processes ever build the same thing:
the teachers that recipes train (N at a time: they are independent), then the teacher-output caches
(one recipe at a time, each with every core: recipes share teachers, and so caches), then the
students, N at a time. Each stage's wall time is reported.

SIGINT or SIGTERM is passed on to the running jobs, so that each run stops with a checkpoint and the
same command resumes them. The jobs run in their own sessions: a terminal's Ctrl-C reaches them once,
from here, rather than twice (a run's second signal exits at once).
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kdkit.errors import RunFailed, RunInterrupted
from kdkit.store.rundir import RunDir
from kdkit.train.signals import StopOnSignal


@dataclass
class Job:
    """One ``kdkit`` command line, where its output goes, and what it is for (in messages)."""

    label: str
    args: list[str]
    log: Path


def run_command(label: str, recipe: Path, overrides, out: Path, options: list[str]) -> Job:
    """``kdkit run`` of one recipe into ``out``: resumed when it has a checkpoint, else started afresh."""
    resume = RunDir(out).last.is_file()
    args = ["run", str(recipe), *(a for o in overrides for a in ("-o", o)), "--out", str(out),
            "--resume" if resume else "--force", *options]
    return Job(label, args, out.parent / f"{out.name}.log")


def run_jobs(stage: str, jobs: list[Job], parallel: int, console=None) -> float:
    """Run ``jobs`` ``parallel`` at a time; each gets cores / parallel threads. Returns the stage's wall time;
    raises ``RunInterrupted`` once a signal has stopped the running jobs."""
    threads = max(1, (os.cpu_count() or 1) // parallel)
    start, waiting, running, failed = time.perf_counter(), list(jobs), [], []
    with StopOnSignal() as stop:
        try:
            while (waiting or running) and stop.signum is None:
                while waiting and len(running) < parallel and stop.signum is None:
                    job = waiting.pop(0)
                    job.log.parent.mkdir(parents=True, exist_ok=True)
                    process = launch(job, threads)
                    running.append((job, process, time.perf_counter()))
                    _say(console, f"[{stage}] {job.label}: started ({threads} threads; log {job.log})")
                time.sleep(0.2)
                for entry in [e for e in running if e[1].poll() is not None]:
                    job, process, began = entry
                    running.remove(entry)
                    _say(console, f"[{stage}] {job.label}: {'done' if process.returncode == 0 else 'FAILED'} "
                                  f"in {(time.perf_counter() - began) / 60:.1f} min (exit {process.returncode})")
                    if process.returncode != 0:
                        failed.append(job)
        except BaseException:  # the jobs run in their own sessions: nothing else would ever stop them
            _stop(signal.SIGTERM, stage, running, console)
            raise
        if stop.signum is not None:  # still inside: a second signal exits at once
            _stop(stop.signum, stage, running, console)
            name = signal.Signals(stop.signum).name
            raise RunInterrupted(f"{name}: stopped {len(running)} {stage}; the same command resumes them and trains "
                                 f"the rest{'; before that, ' + _failures(stage, failed) if failed else ''}",
                                 stop.signum)
    if failed:
        raise RunFailed(_failures(stage, failed))
    return time.perf_counter() - start


class Forked:
    """One job's ``kdkit`` process, forked from the fork server; ``poll``, ``send_signal`` and ``wait`` as
    ``subprocess.Popen`` has them."""

    def __init__(self, process: multiprocessing.Process):
        self.process = process

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.process.exitcode is None:
            os.kill(self.process.pid, signum)

    def wait(self) -> int:
        self.process.join()
        return self.process.exitcode


def launch(job: Job, threads: int) -> Forked:
    """Start ``job`` in a process forked from the fork server (started with the first job)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["kdkit.train.run"])  # torch, timm, kdkit and its plugins: what every run imports
    process = context.Process(target=_kdkit, name=job.label,
                              args=(job.args, str(job.log), threads, dict(os.environ), list(sys.path)))
    process.start()
    return Forked(process)


def _kdkit(args: list[str], log: str, threads: int, environ: dict[str, str], path: list[str]) -> None:
    """The job's process: its own session, output appended to its log (a resumed run adds to it), the
    parent's environment and path, then the ``kdkit`` command line; its exit status is the command's."""
    os.setsid()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.clear()
    os.environ.update(environ, OMP_NUM_THREADS=str(threads))
    sys.path[:] = path
    sys.argv = ["kdkit", *args]
    multiprocessing.set_start_method(None, force=True)  # its loader workers start as in a new process

    import torch

    from kdkit.cli import main

    torch.set_num_threads(threads)
    main()


def _stop(signum: int, stage: str, running: list, console) -> None:
    """Signal every running job and wait for each to stop (a run stops with its checkpoint)."""
    for _, process, _ in running:
        process.send_signal(signum)
    for job, process, _ in running:
        _say(console, f"[{stage}] {job.label}: stopped by {signal.Signals(signum).name} (exit {process.wait()})")


def _failures(stage: str, failed: list[Job]) -> str:
    return f"{len(failed)} {stage} failed: " + "; ".join(f"{j.label} (log {j.log})" for j in failed)


def _say(console, text: str) -> None:
    if console is not None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)  # "[stage]" is text
