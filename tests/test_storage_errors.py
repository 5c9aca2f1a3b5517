"""A write that fails (a full disk, a read-only file system) fails the run with one line naming the file and
the reason (exit 1), keeps the previous checkpoint, and leaves ``status: failed`` where it can be written;
a run directory that cannot be created is bad input (exit 2); a killed run's temporaries go at its next start."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess

import pytest
import torch

from kdkit.train.loop import Trainer

from conftest import TWO_TEACHER_RECIPE

ONE_EPOCH_RECIPE = TWO_TEACHER_RECIPE.replace("epochs = 2", "epochs = 1")


@pytest.fixture
def tmpfs(tmp_path):
    """A small file system of its own (root only; skipped where mounting is not allowed), unmounted after."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def after_first_epoch(monkeypatch, action) -> None:
    """``action()`` once epoch 1 is over and its files are written (checkpoints, metrics, summary)."""
    end_epoch = Trainer.end_epoch

    def then(self, epoch):
        end_epoch(self, epoch)
        if epoch == 0:
            action()

    monkeypatch.setattr(Trainer, "end_epoch", then)


def fill(folder) -> None:
    """Fill ``folder``'s file system to its last byte."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, bytes(1 << 16))  # a short write takes the last bytes, the next one raises
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


def error_line(output: str) -> str:
    """The CLI's one error line; nothing like a traceback around it."""
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output
    return lines[0]


def test_a_full_disk_fails_the_run_naming_the_file_and_keeps_the_last_checkpoint(write_recipe, cli, tmpfs,
                                                                                 monkeypatch):
    after_first_epoch(monkeypatch, lambda: fill(tmpfs))
    out = tmpfs / "run"
    result = cli("run", write_recipe(TWO_TEACHER_RECIPE), "--out", out, "--allow-random-teachers")
    assert result.exit_code == 1, result.output
    line = error_line(result.output)
    assert f"cannot write {out / 'checkpoints' / 'last.pt'}: No space left on device" in line  # torch's own error
    assert "the previous one is intact; then cannot write" in line  # the summary: the disk is still full
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    assert json.loads((out / "summary.json").read_text())["epochs"] == 1
    assert [json.loads(row)["epoch"] for row in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert not list(out.rglob("*.tmp"))


def test_a_read_only_file_system_fails_the_run_with_the_first_error_shown(write_recipe, cli, tmpfs, monkeypatch):
    after_first_epoch(monkeypatch, lambda: subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True))
    out = tmpfs / "run"
    result = cli("run", write_recipe(TWO_TEACHER_RECIPE), "--out", out, "--allow-random-teachers")
    assert result.exit_code == 1, result.output
    line = error_line(result.output)
    first = f"cannot write {out / 'checkpoints' / 'last.pt'}: Read-only file system"
    then = f"then cannot write {out / 'summary.json'}: Read-only file system"  # status: failed cannot be written
    assert first in line and then in line and line.index(first) < line.index(then)
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    assert json.loads((out / "summary.json").read_text())["status"] == "running"


def test_a_run_directory_that_cannot_be_created_is_one_line_and_exit_2(write_recipe, cli, tmpfs):
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    out = tmpfs / "fresh" / "run"
    result = cli("run", write_recipe(ONE_EPOCH_RECIPE), "--out", out, "--allow-random-teachers")
    assert result.exit_code == 2, result.output
    assert f"{out}: cannot create the run directory: Read-only file system" in error_line(result.output)


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")])
def test_a_checkpoint_that_cannot_be_written_fails_the_run_and_keeps_the_previous(error, write_recipe, cli, tmp_path,
                                                                                  monkeypatch):
    """torch reports a full disk as a ``RuntimeError``: it fails the run like an ``OSError`` does."""
    real_save, calls = torch.save, []

    def full_disk(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) > 2:  # epoch 1 wrote last.pt and best.pt; then the disk is full
            raise error
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "run"
    result = cli("run", write_recipe(TWO_TEACHER_RECIPE), "--out", out, "--allow-random-teachers")
    assert result.exit_code == 1, result.output
    line = error_line(result.output)
    assert f"cannot write {out / 'checkpoints' / 'last.pt'}: " in line and str(error.args[-1]) in line
    assert line.endswith("; the previous one is intact")
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    assert json.loads((out / "summary.json").read_text())["status"] == "failed"
    assert not list(out.rglob("*.tmp"))


def test_an_export_that_cannot_be_written_fails_the_run(write_recipe, cli, tmp_path, monkeypatch):
    real_replace = os.replace

    def broken_disk(src, dst, *args, **kwargs):
        if os.path.basename(dst) == "student.safetensors":
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", broken_disk)
    out = tmp_path / "run"
    result = cli("run", write_recipe(ONE_EPOCH_RECIPE), "--out", out, "--allow-random-teachers")
    assert result.exit_code == 1, result.output
    assert f"cannot write {out / 'student.safetensors'}: Input/output error" in error_line(result.output)
    assert json.loads((out / "summary.json").read_text())["status"] == "failed"  # not 'completed': no export
    assert not (out / "student.safetensors").exists() and not list(out.rglob("*.tmp"))


def test_when_the_summary_cannot_be_written_either_the_first_error_is_the_one_shown(write_recipe, cli, tmp_path,
                                                                                    monkeypatch):
    real_replace = os.replace
    full = []

    def full_disk(src, dst, *args, **kwargs):  # every atomic write fails once the disk is full
        if full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", full_disk)
    after_first_epoch(monkeypatch, lambda: full.append(True))
    out = tmp_path / "run"
    result = cli("run", write_recipe(TWO_TEACHER_RECIPE), "--out", out, "--allow-random-teachers")
    assert result.exit_code == 1, result.output
    line = error_line(result.output)
    assert line.startswith(f"error: cannot write {out / 'checkpoints' / 'last.pt'}: No space left on device")
    assert f"then cannot write {out / 'summary.json'}: No space left on device" in line
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1


def test_a_killed_runs_temporaries_go_at_its_next_start_and_nothing_else(write_recipe, cli, tmp_path):
    recipe, out = write_recipe(ONE_EPOCH_RECIPE), tmp_path / "run"
    assert cli("run", recipe, "--out", out, "--allow-random-teachers").exit_code == 0
    left = [out / "checkpoints" / ".last.pt.4242.tmp", out / ".summary.json.17.tmp", out / ".metrics.jsonl.9.tmp"]
    others = [out / ".last.pt.x.tmp", out / "checkpoints" / ".notes.17.tmp", out / "mine.tmp"]
    for path in left + others:
        path.touch()  # a SIGKILL leaves zero-byte ones
    result = cli("run", recipe, "--out", out, "--resume", "--allow-random-teachers")
    assert result.exit_code == 0, result.output
    assert not any(path.exists() for path in left)
    assert all(path.exists() for path in others)  # not kdkit's temporaries: not touched


def test_a_signal_whose_checkpoint_cannot_be_written_says_so_and_keeps_its_exit_status(write_recipe, cli, tmp_path,
                                                                                       monkeypatch):
    """The stop is the first error (exit 143); the mid-epoch checkpoint that could not be written follows it."""
    step = Trainer.train_step

    def step_then_sigterm(self, *args):
        logged = step(self, *args)
        os.kill(os.getpid(), signal.SIGTERM)
        return logged

    monkeypatch.setattr(Trainer, "train_step", step_then_sigterm)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "run"
    result = cli("run", write_recipe(ONE_EPOCH_RECIPE), "--out", out, "--allow-random-teachers")
    assert result.exit_code == 128 + signal.SIGTERM, result.output
    line = error_line(result.output)
    assert line.startswith("error: SIGTERM: stopped at epoch 1, step 1 of 4")
    assert f"then cannot write {out / 'checkpoints' / 'last.pt'}: No space left on device" in line
    assert json.loads((out / "summary.json").read_text())["status"] == "failed"
