"""Runs survive being stopped: SIGTERM/SIGINT in a real ``kdkit run`` subprocess, then ``--resume``, ends
with the same student, bit for bit, as a run that was never stopped; changed recipes or teachers are
refused; an extended run follows the new schedule; failures keep the last good checkpoint."""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import kdkit
from kdkit.cli import app
from kdkit.plugin.discovery import default_plugins
from kdkit.train.step import DistillStep

from conftest import TWO_TEACHER_RECIPE, contributing_example, make_distribution, make_trainer

# Three steps per epoch, two epochs; BatchNorm, drop path, mixup/cutmix, two loader workers, two
# teachers and the EMA callback from CONTRIBUTING.md: every piece of state a resume must restore.
RESUME_RECIPE = TWO_TEACHER_RECIPE.replace('model = "test_vit"\nmodel_kwargs = { img_size = 32 }',
                                           'model = "test_resnet"\ndrop_path_rate = 0.1') \
    .replace("train_size = 64", "train_size = 48").replace("workers = 0", "workers = 2") \
    + "\n[callbacks.ema]\ndecay = 0.5\n"

SIGNAL_PLUGIN = '''
"""Test plugin: after optimizer step $KDKIT_TEST_SIGNAL_AT_STEP this process signals itself, or with
$KDKIT_TEST_SIGNAL_PARENT=process the compare command that started it (=group: that command's process
group, as a terminal's Ctrl-C does) and waits for the signal to be passed back to it (``trainer.stop``:
the engine's own, which a run's view keeps for its tests)."""
import os
import signal
import time

from kdkit import api


def compare_pid():
    """The compare command that started this run: the parent of the fork server it was forked from."""
    with open(f"/proc/{os.getppid()}/stat") as stat:  # "pid (name) state ppid ..."
        return int(stat.read().rsplit(")", 1)[1].split()[1])


@api.hookimpl
def kdkit_step_end(trainer, logged):
    if trainer.step == int(os.environ.get("KDKIT_TEST_SIGNAL_AT_STEP", "-1")):
        signum = getattr(signal, os.environ.get("KDKIT_TEST_SIGNAL", "SIGTERM"))
        parent = os.environ.get("KDKIT_TEST_SIGNAL_PARENT")
        if parent == "group":
            os.killpg(os.getpgid(compare_pid()), signum)
        elif parent == "process":
            os.kill(compare_pid(), signum)
        else:
            for _ in range(int(os.environ.get("KDKIT_TEST_SIGNAL_COUNT", "1"))):
                os.kill(os.getpid(), signum)
        while parent and trainer._trainer.stop.signum is None:  # until the parent passes the signal back
            time.sleep(0.05)
'''
TIMING = {"images_per_s", "wall_s"}
pytestmark = pytest.mark.xdist_group("resume")  # one worker runs the reference run, once


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A folder with the signalling plugin and the EMA callback, found by entry point."""
    site = tmp_path_factory.mktemp("site")
    make_distribution(site, "kdkit-test-signals", {"kdkit_test_signals": SIGNAL_PLUGIN,
                                                   "kdkit_ema": contributing_example("kdkit_ema.py")},
                      {"signals": "kdkit_test_signals", "ema": "kdkit_ema"})
    return site


@pytest.fixture(scope="module")
def env(site):
    """An environment whose Python finds the test plugins."""
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


@contextlib.contextmanager
def plugins_here(site):
    """This process sees the test plugins too: what is not about signals runs here, not in a new process."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(site))
        default_plugins.cache_clear()
        try:
            yield
        finally:
            default_plugins.cache_clear()


@pytest.fixture
def here(site):
    with plugins_here(site):
        yield


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "resume.toml"
    path.write_text(RESUME_RECIPE)
    return path


def kdkit_run(recipe, out, env, *args, **signal_env):
    """``kdkit run`` in a new process (which a signal can stop)."""
    return subprocess.run([sys.executable, "-m", "kdkit", "run", str(recipe), "--out", str(out),
                           "--allow-random-teachers", *args],
                          env={**env, **{k: str(v) for k, v in signal_env.items()}}, capture_output=True, text=True)


def kdkit_here(*args):
    """A ``kdkit`` command line run in this process."""
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def reference(recipe, site, tmp_path_factory):
    """The run nobody stopped."""
    out = tmp_path_factory.mktemp("reference") / "run"
    with plugins_here(site):
        result = kdkit_here("run", recipe, "--out", out, "--allow-random-teachers")
    assert result.exit_code == 0, result.output
    return out


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(run, reference):
    ours, theirs = load_file(run / "student.safetensors"), load_file(reference / "student.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    rows, expected = metrics(run), metrics(reference)
    assert [r["epoch"] for r in rows] == [1, 2]  # every epoch exactly once
    for row, other in zip(rows, expected):
        assert {k: v for k, v in row.items() if k not in TIMING} == {k: v for k, v in other.items() if k not in TIMING}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["top1"] == rows[-1]["top1"]


@pytest.mark.slow
@pytest.mark.parametrize("at_step, signame, epoch, batch", [(4, "SIGTERM", 1, 1), (3, "SIGINT", 0, 3)],
                         ids=["sigterm-mid-epoch", "sigint-after-an-epochs-last-step"])
def test_a_stopped_run_resumes_bit_for_bit(at_step, signame, epoch, batch, recipe, env, reference, site, tmp_path):
    """``epoch`` completed epochs and ``batch`` steps into the next one when the signal arrives."""
    out = tmp_path / "run"
    stopped = kdkit_run(recipe, out, env, KDKIT_TEST_SIGNAL_AT_STEP=at_step, KDKIT_TEST_SIGNAL=signame)
    signum = getattr(signal, signame)
    assert stopped.returncode == 128 + signum, stopped.stderr
    assert f"{signame}: stopped at epoch {epoch + 1}, step {batch} of 3; resume with --resume" in stopped.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["epochs"] == epoch
    checkpoint = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["batch"], checkpoint["step"]) == (epoch, batch, at_step)
    assert not (out / "student.safetensors").exists()

    with plugins_here(site):
        resumed = kdkit_here("run", recipe, "--out", out, "--allow-random-teachers", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming {out} at epoch {epoch + 1}, step {batch}" in resumed.output
    assert_same_run(out, reference)


@pytest.mark.slow
def test_a_second_signal_exits_at_once_and_leaves_the_last_checkpoint(recipe, env, here, tmp_path):
    out = tmp_path / "run"
    stopped = kdkit_run(recipe, out, env, KDKIT_TEST_SIGNAL_AT_STEP=5, KDKIT_TEST_SIGNAL_COUNT=2)
    assert stopped.returncode == 128 + signal.SIGTERM
    checkpoint = torch.load(out / "checkpoints" / "last.pt", weights_only=True)  # epoch 1's, readable
    assert (checkpoint["epoch"], checkpoint["batch"]) == (1, 0)
    assert json.loads((out / "summary.json").read_text())["status"] == "running"  # nothing could record more
    assert not list(out.rglob("*.tmp"))
    resumed = kdkit_here("run", recipe, "--out", out, "--allow-random-teachers", "--resume")
    assert resumed.exit_code == 0, resumed.output


@pytest.mark.slow
@pytest.mark.parametrize("signame, to", [("SIGTERM", "process"), ("SIGINT", "group")],
                         ids=["sigterm-to-compare", "ctrl-c-to-compares-process-group"])
def test_compare_passes_a_signal_on_to_its_runs_and_the_same_command_resumes_them(signame, to, recipe, env, reference,
                                                                                  site, tmp_path):
    """Each run gets the signal once (a second would stop it at once, without a checkpoint at its step)."""
    command = [sys.executable, "-m", "kdkit", "compare", str(recipe), "--seeds", "0", "--runs", str(tmp_path),
               "--jobs", "2", "--allow-random-teachers"]
    signal_env = {"KDKIT_TEST_SIGNAL_AT_STEP": "4", "KDKIT_TEST_SIGNAL": signame, "KDKIT_TEST_SIGNAL_PARENT": to}
    stopped = subprocess.run(command, env={**env, **signal_env}, capture_output=True, text=True,
                             start_new_session=True)  # its own process group, as in a terminal
    status = 128 + getattr(signal, signame)
    assert stopped.returncode == status, stopped.stderr
    assert f"[students] resume seed 0: stopped by {signame} (exit {status})" in stopped.stderr
    assert f"{signame}: stopped 1 students; the same command resumes them and trains the rest" in stopped.stderr
    run = tmp_path / "resume" / "seed0"
    checkpoint = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["batch"], checkpoint["step"]) == (1, 1, 4)  # stopped after step 4

    with plugins_here(site):
        resumed = kdkit_here(*command[3:])
    assert resumed.exit_code == 0, resumed.output
    assert_same_run(run, reference)


def test_resume_refuses_a_changed_recipe_and_leaves_the_run_alone(recipe, reference, here):
    before = {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()}
    result = kdkit_here("run", recipe, "--out", reference, "--allow-random-teachers", "--resume",
                        "-o", "train.lr=0.002")
    assert result.exit_code == 2
    assert "the recipe differs from the run's; --allow-changes resumes anyway" in result.output
    assert "train.lr: 0.001 -> 0.002" in result.output
    assert {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()} == before


def test_resume_needs_a_checkpoint(write_recipe, cli, tmp_path):
    missing = cli("run", write_recipe(TWO_TEACHER_RECIPE), "--out", tmp_path / "none", "--resume",
                  "--allow-random-teachers")
    assert missing.exit_code == 2 and "nothing to resume" in missing.output
    assert not (tmp_path / "none").exists()


def test_resume_refuses_changed_teacher_weights(write_recipe, cli, tmp_path):
    weights = tmp_path / "teacher.pt"
    torch.manual_seed(0)
    torch.save(kdkit.build_model("teacher", plugin="timm", model="test_resnet", num_classes=4).state_dict(), weights)
    recipe = write_recipe(TWO_TEACHER_RECIPE.replace('model = "test_resnet"\n',
                                                     f'model = "test_resnet"\ncheckpoint = "{weights}"\n', 1))
    out = tmp_path / "run"
    assert cli("run", recipe, "--out", out, "--allow-random-teachers", "-o", "train.epochs=1").exit_code == 0
    torch.manual_seed(1)
    torch.save(kdkit.build_model("teacher", plugin="timm", model="test_resnet", num_classes=4).state_dict(), weights)
    refused = cli("run", recipe, "--out", out, "--resume", "--allow-random-teachers", "-o", "train.epochs=1")
    assert refused.exit_code == 2 and "the weights of teacher(s) conv differ" in refused.output
    accepted = cli("run", recipe, "--out", out, "--resume", "--allow-changes", "--allow-random-teachers",
                   "-o", "train.epochs=1")
    assert accepted.exit_code == 0, accepted.output


def test_an_extended_run_follows_the_schedule_of_its_new_length(write_recipe, cli, tmp_path):
    recipe = write_recipe(TWO_TEACHER_RECIPE)
    out = tmp_path / "run"
    assert cli("run", recipe, "--out", out, "--allow-random-teachers").exit_code == 0
    extended = cli("run", recipe, "--out", out, "--resume", "--allow-changes", "--allow-random-teachers",
                   "-o", "train.epochs=4")
    assert extended.exit_code == 0, extended.output
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert "epochs = 4" in (out / "recipe.toml").read_text()
    # the lr at the end of epoch 3 is the 4-epoch schedule's, not the 2-epoch one's
    trainer = make_trainer(recipe, ["train.epochs=4"])
    trainer.scheduler.step_update(3 * trainer.steps_per_epoch)
    assert rows[2]["lr"] == pytest.approx(trainer.lr)
    assert rows[2]["lr"] > rows[1]["lr"]  # the cosine restarts higher: the run is longer now


def test_a_non_finite_loss_stops_the_run_naming_the_term(write_recipe, cli, tmp_path, monkeypatch):
    real_losses, calls = DistillStep.losses, []

    def poisoned(self, images, target, labels, teacher_logits):
        total, values = real_losses(self, images, target, labels, teacher_logits)
        calls.append(None)
        if len(calls) == 6:  # the sixth step (one micro-batch each): epoch 2, its second step
            values["kl/conv"] = values["kl/conv"] * math.nan
        return total, values

    monkeypatch.setattr(DistillStep, "losses", poisoned)
    recipe = write_recipe(TWO_TEACHER_RECIPE)
    out = tmp_path / "run"
    result = cli("run", recipe, "--out", out, "--allow-random-teachers")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "the loss term 'kl/conv' is nan at epoch 2, step 2 of 4 (optimizer step 6)" in result.output
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1  # the last good one
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["epochs"] == 1


def test_the_python_api_prints_nothing(write_recipe, tmp_path, capfd):
    recipe = write_recipe(TWO_TEACHER_RECIPE.split("[teachers.conv]")[0] + """
        [[losses]]
        plugin = "ce"
        head = "pool"
        [train]
        epochs = 1
        batch_size = 16
        [eval]
        heads = ["pool"]
        """.replace("        ", ""))
    kdkit.run(recipe, out=tmp_path / "quiet")
    assert capfd.readouterr() == ("", "")
    kdkit.run(recipe, out=tmp_path / "loud", progress=True)
    assert "epoch 1:" in capfd.readouterr().err
