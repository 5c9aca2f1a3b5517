"""torchrun data parallelism on the CPU (gloo): one run over several processes, equal to one process with
the same global batch, checkpoints that move between world sizes, and a two-node launch on localhost."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import kdkit
from kdkit.errors import KdkitError
from kdkit.train.processes import collective_timeout_s

from conftest import make_distribution

# No BatchNorm in the student (test_vit), no drop path, no mixing: what makes 2 processes equal 1.
RECIPE = """
seed = 0
[data]
dataset = "fake"
image_size = 32
num_classes = 4
train_size = 64
val_size = 30
batch_size_eval = 8
workers = 0
[student]
plugin = "timm"
model = "test_vit"
model_kwargs = { img_size = 32 }
[teachers.conv]
plugin = "timm"
model = "test_resnet"
[heads.cls]
embedding = "pool"
[heads.conv]
embedding = "pool"
[[losses]]
plugin = "ce"
head = "cls"
[[losses]]
plugin = "kl"
head = "conv"
teachers = ["conv"]
[train]
epochs = 2
batch_size = 16
lr = 1e-3
warmup_epochs = 0
[augment]
label_smoothing = 0.1
[eval]
heads = ["cls", "conv"]
"""
SIGNAL_PLUGIN = '''
import os
import signal

from kdkit import api


@api.hookimpl
def kdkit_step_end(trainer, logged):
    if trainer.step == int(os.environ.get("KDKIT_TEST_SIGNAL_AT_STEP", "-1")) and trainer.is_main:
        os.kill(os.getpid(), signal.SIGTERM)
    if trainer.step == int(os.environ.get("KDKIT_TEST_STOP_AT_STEP", "-1")) and not trainer.is_main:
        os.kill(os.getpid(), signal.SIGSTOP)  # a stalled peer
'''
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("distributed")]  # one worker: one reference run


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    (root / "recipe.toml").write_text(RECIPE)
    site = root / "site"
    site.mkdir()
    make_distribution(site, "kdkit-test-signals", {"kdkit_test_signals": SIGNAL_PLUGIN}, {"signals": "kdkit_test_signals"})
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    return root, env


def kdkit_run_args(out, *args) -> list[str]:
    """``python`` arguments for a ``kdkit run`` of the module's recipe into ``out``."""
    return ["-m", "kdkit", "run", "recipe.toml", "--out", str(out), "--allow-random-teachers", *args]


def torchrun(root, env, out, *args, **extra_env):
    """``kdkit run`` as two processes on this machine, started by torchrun."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    return subprocess.run([*launcher, *kdkit_run_args(out, *args)], cwd=root, env={**env, **extra_env},
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def one_process(setup):
    """The run of one process (this one: the test plugin is not needed)."""
    root, _ = setup
    return kdkit.run(root / "recipe.toml", out=root / "one", allow_random_teachers=True)


def assert_close_runs(run, reference, atol=1e-4):
    ours, theirs = load_file(run / "student.safetensors"), load_file(reference / "student.safetensors")
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-3, atol=atol, msg=key)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in expected]
    for row, other in zip(rows, expected):
        assert row["train"] == pytest.approx(other["train"], rel=1e-4)
        assert row["top1"] == pytest.approx(other["top1"])  # every validation image counted once


def test_two_processes_train_the_student_one_process_trains(setup, one_process):
    root, env = setup
    result = torchrun(root, env, "two")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines() == ["two"]  # rank 0 alone prints the run directory
    assert_close_runs(root / "two", one_process)
    summary = json.loads((root / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "completed"
    assert summary["teacher_top1"] == json.loads((one_process / "summary.json").read_text())["teacher_top1"]


def test_a_two_process_run_resumes_in_one_process(setup, one_process):
    root, env = setup
    stopped = torchrun(root, env, "moved", KDKIT_TEST_SIGNAL_AT_STEP="6")  # epoch 2, step 2 of 4
    assert stopped.returncode != 0
    checkpoint = torch.load(root / "moved" / "checkpoints" / "last.pt", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["batch"]) == (1, 2)
    assert all(not key.startswith("module.") for key in checkpoint["model"])  # the unwrapped model
    kdkit.run(root / "recipe.toml", out=root / "moved", resume=True, allow_random_teachers=True)  # in this process
    assert_close_runs(root / "moved", one_process)


def start_ranks(root, env, out, *args, **extra_env) -> list[subprocess.Popen]:
    """Two ``kdkit run`` processes with the environment torchrun gives its ranks, started here: for what is
    about kdkit's handling, not torchrun's (which, for one, waits 30 s for a stopped rank before killing it)."""
    port = free_port()
    ranks = [{"MASTER_ADDR": "localhost", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank),
              "LOCAL_RANK": str(rank)} for rank in range(2)]
    return [subprocess.Popen([sys.executable, *kdkit_run_args(out, *args)], cwd=root, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**env, **extra_env, **rank}) for rank in ranks]


def test_a_batch_that_does_not_split_over_the_processes_is_refused(setup):
    root, env = setup
    ranks = start_ranks(root, env, "odd", "-o", "train.batch_size=15")
    outputs = [rank.communicate(timeout=300) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [2, 2]
    assert all("train.batch_size: 15 does not split into 2 processes x 1 micro-batches" in err for _, err in outputs)
    assert not (root / "odd").exists()


def test_a_stalled_process_ends_the_run_naming_the_ranks(setup):
    root, env = setup
    ranks = start_ranks(root, env, "stalled", KDKIT_TEST_STOP_AT_STEP="2", KDKIT_COLLECTIVE_TIMEOUT_S="5")
    try:
        _, stderr = ranks[0].communicate(timeout=120)
    finally:
        ranks[1].kill()
        ranks[1].communicate()
    assert ranks[0].returncode == 1
    assert ("rank 0 of 2" in stderr and "waited 5 s (KDKIT_COLLECTIVE_TIMEOUT_S) in a collective operation "
            "for rank(s) 1" in stderr), stderr[-3000:]
    assert json.loads((root / "stalled" / "summary.json").read_text())["status"] == "failed"


@pytest.mark.parametrize("value", ["nan", "0", "-5", "inf", "soon"])
def test_a_bad_collective_timeout_is_refused(value, monkeypatch):
    monkeypatch.setenv("KDKIT_COLLECTIVE_TIMEOUT_S", value)
    with pytest.raises(KdkitError, match=f"KDKIT_COLLECTIVE_TIMEOUT_S='{value}': expected a number of seconds > 0"):
        collective_timeout_s()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_nodes_on_localhost_make_one_run(setup, one_process):
    root, env = setup
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{free_port()}", "--rdzv-id", "kdkit-test"]
    command = [*launcher, *kdkit_run_args("nodes")]
    nodes = [subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    summary = json.loads((root / "nodes" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "completed"
    assert_close_runs(root / "nodes", one_process)
