"""``kdkit.tools.jobs``: runs side by side never outlive the command that started them, and a stop still says
which of them had failed. Processes are stand-ins here; tests/test_resume.py stops real ones."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

import kdkit.tools.jobs
from kdkit.errors import RunInterrupted
from kdkit.tools.jobs import Job, run_jobs


class StandIn:
    """A job's process stand-in: ``poll`` calls ``on_poll``, then returns ``exit`` (None: still running)."""

    def __init__(self, exit=None, on_poll=lambda: None):
        self.exit, self.on_poll, self.returncode, self.signals = exit, on_poll, None, []

    def poll(self):
        self.on_poll()
        self.returncode = self.exit if self.returncode is None else self.returncode
        return self.returncode

    def send_signal(self, signum):
        self.signals.append(signum)
        self.returncode = 128 + signum

    def wait(self):
        return self.returncode


class StandIns(dict):
    """label -> StandIn, handed out by ``launch`` for the job of that label; ``started``: labels in order."""

    def __init__(self, monkeypatch, **stand_ins):
        super().__init__(stand_ins)
        self.started = []
        monkeypatch.setattr(kdkit.tools.jobs, "launch", self.launch)
        monkeypatch.setattr(kdkit.tools.jobs.time, "sleep", lambda seconds: None)

    def launch(self, job, threads):
        self.started.append(job.label)
        return self[job.label]


def jobs(tmp_path: Path, *labels: str) -> list[Job]:
    return [Job(label, [label], tmp_path / f"{label}.log") for label in labels]


def test_an_error_while_jobs_run_stops_them_before_it_propagates(monkeypatch, tmp_path):
    processes = StandIns(monkeypatch, a=StandIn(), b=StandIn())

    class BrokenConsole:  # fails on its second message: "b: started"
        said = 0

        def print(self, *args, **kwargs):
            self.said += 1
            if self.said == 2:
                raise OSError("the terminal went away")

    with pytest.raises(OSError, match="the terminal went away"):
        run_jobs("students", jobs(tmp_path, "a", "b"), parallel=2, console=BrokenConsole())
    assert processes.started == ["a", "b"]
    assert processes["a"].signals == processes["b"].signals == [signal.SIGTERM]


def test_a_signal_starts_nothing_more_and_names_the_jobs_that_failed_before_it(monkeypatch, tmp_path):
    def signal_now():  # arrives while "b" runs, after "a" has failed
        os.kill(os.getpid(), signal.SIGTERM)

    processes = StandIns(monkeypatch, a=StandIn(exit=1), b=StandIn(on_poll=signal_now), c=StandIn())
    with pytest.raises(RunInterrupted) as stopped:
        run_jobs("students", jobs(tmp_path, "a", "b", "c"), parallel=2)
    assert processes.started == ["a", "b"]  # "c" was not started once the signal had come
    assert processes["b"].signals == [signal.SIGTERM] and processes["a"].signals == []
    assert stopped.value.signum == signal.SIGTERM
    assert str(stopped.value) == ("SIGTERM: stopped 1 students; the same command resumes them and trains the rest; "
                                  f"before that, 1 students failed: a (log {tmp_path / 'a.log'})")
