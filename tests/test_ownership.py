"""kdkit deletes only what it wrote, and a run directory has one writer: ``--force`` refuses a folder that is
no kdkit run, a run's name is one safe folder name, a second writer is refused naming the holder (a killed
one never blocks), and a teacher that another process trains is waited for, then reused."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kdkit
from kdkit.errors import KdkitError, RecipeError
from kdkit.store.rundir import RunDir

from conftest import TWO_TEACHER_RECIPE

FIXTURE = Path(__file__).parent / "fixtures" / "legacy_run"  # written by kdkit before markers and locks


@pytest.fixture
def legacy(tmp_path):
    """A copy of the run directory an earlier kdkit wrote, and its recipe beside it."""
    out = shutil.copytree(FIXTURE, tmp_path / "legacy")
    recipe = tmp_path / "legacy.toml"
    recipe.write_text((out / "recipe.toml").read_text())
    return recipe, out


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_force_refuses_a_folder_kdkit_did_not_make(legacy, cli, tmp_path):
    recipe, _ = legacy
    folder = tmp_path / "some_folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "important.txt").write_text("keep me")
    (folder / "recipe.toml").write_text("not a run")  # a recipe alone does not make a run
    (folder / "sub" / "data.bin").write_bytes(b"\0" * 10)
    before = snapshot(folder)
    result = cli("run", recipe, "--out", folder, "--force")
    assert result.exit_code == 2, result.output
    assert f"{folder}: not a kdkit run directory" in result.output and "Traceback" not in result.output
    assert snapshot(folder) == before and sorted(p.name for p in folder.iterdir()) == ["important.txt", "recipe.toml",
                                                                                       "sub"]


def test_a_run_of_an_earlier_kdkit_is_forced_and_resumed(legacy, cli, tmp_path):
    recipe, out = legacy
    resumed = cli("run", recipe, "--out", out, "--resume", "--allow-changes", "-o", "train.epochs=2")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((out / "summary.json").read_text())["epochs"] == 2
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (out / ".kdkit-run").is_file()  # marked as kdkit's from now on

    forced = shutil.copytree(FIXTURE, tmp_path / "forced")
    result = cli("run", recipe, "--out", forced, "--force")
    assert result.exit_code == 0, result.output
    assert json.loads((forced / "summary.json").read_text())["status"] == "completed"


def test_force_empties_a_marked_run_but_its_marker_and_lock(legacy, tmp_path):
    recipe, out = legacy
    first = kdkit.run(recipe, out=tmp_path / "run")
    (first / "notes.txt").write_text("written into the run")  # inside kdkit's run: goes with it
    kdkit.run(recipe, out=first, force=True)
    assert not (first / "notes.txt").exists()
    assert {p.name for p in first.iterdir()} >= {".kdkit-run", ".kdkit-lock", "summary.json", "checkpoints"}


@pytest.mark.parametrize("name", ["../../x", "/tmp/x", "", ".", "..", "a/b", ".hidden", "runs\\x", "lehrer ü",
                                  "x" * 101])
def test_a_bad_run_name_is_refused(name, legacy, tmp_path, monkeypatch):
    recipe, _ = legacy
    monkeypatch.chdir(tmp_path)
    recipe.write_text(f"name = {json.dumps(name)}\n" + recipe.read_text().split("\n", 1)[1])
    with pytest.raises(RecipeError) as error:
        kdkit.run(recipe)
    assert str(error.value).startswith(f"{recipe}: name: {name!r} cannot name the run's folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["legacy", "legacy.toml"]  # nothing written


# A kdkit process that takes the lock of a run directory (or with "cache", of a teacher-output cache's
# folder), says so and waits; told to go on, it trains the recipe into the run directory (or builds its
# teacher-output caches) inside the lock, then exits.
HOLDER = """
import sys
from pathlib import Path

import kdkit
from kdkit.store import lock
from kdkit.store.rundir import RunDir
from kdkit.train.run import build_teacher_caches

kind, folder, recipe = sys.argv[1:]
if kind == "cache":
    Path(folder).mkdir(parents=True)
    lock.acquire(Path(folder))
else:
    RunDir(folder).claim()
print("locked", flush=True)
sys.stdin.readline()
if kind == "cache":
    build_teacher_caches(recipe, allow_random_teachers=True)
else:
    kdkit.run(recipe, out=folder, force=True)
"""


def hold(folder: Path, recipe: Path, kind: str = "run") -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, kind, str(folder), str(recipe)],
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    return holder


# The lock as kdkit takes it (kdkit.store.lock), by a process that needs no kdkit import to hold it.
FLOCK = """
import fcntl, os, socket, sys
file = open(sys.argv[1], "a+")
fcntl.flock(file, fcntl.LOCK_EX)
file.write(f"pid {os.getpid()} on {socket.gethostname()}\\n")
file.flush()
print("locked", flush=True)
sys.stdin.readline()
"""


def test_a_second_writer_is_refused_naming_the_holder(legacy, cli):
    recipe, out = legacy
    holder = subprocess.Popen([sys.executable, "-c", FLOCK, str(out / ".kdkit-lock")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    try:
        for args in (["--force"], ["--resume"]):
            result = cli("run", recipe, "--out", out, *args)
            assert result.exit_code == 2, result.output
            assert f"{out}: in use by another kdkit process (pid {holder.pid} on " in result.output
        with pytest.raises(KdkitError, match=f"in use by another kdkit process \\(pid {holder.pid} on "):
            RunDir(out).claim()  # the check at the last moment, after every other check has passed
    finally:
        holder.kill()
        holder.wait()
    # killed while holding it: the kernel released the lock; the file still names the dead holder
    assert f"pid {holder.pid} on" in (out / ".kdkit-lock").read_text()
    result = cli("run", recipe, "--out", out, "--resume")
    assert result.exit_code == 0, result.output


TEACHER = """
name = "teacher"
[data]
dataset = "fake"
image_size = 16
num_classes = 4
train_size = 32
val_size = 16
batch_size_eval = 16
workers = 0
[student]
plugin = "mixer"
img_size = 16
patch_size = 8
depth = 1
embed_dim = 16
[[losses]]
plugin = "ce"
head = "pool"
[train]
epochs = 1
batch_size = 16
[eval]
heads = ["pool"]
"""


class Console:
    """Records what a run says; its first waiting message lets the holder go on (train the teacher)."""

    def __init__(self, holder: subprocess.Popen):
        self.lines, self.holder = [], holder

    def print(self, text, **_):
        self.lines.append(str(text))
        if "waiting" in str(text):
            self.holder.stdin.write("go\n")
            self.holder.stdin.flush()


def test_a_teacher_trained_elsewhere_is_waited_for_then_reused(tmp_path, monkeypatch):
    from kdkit.builder.build import teacher_run_dir
    from kdkit.plugin.discovery import default_plugins
    from kdkit.recipe.toml import load_recipe

    monkeypatch.setenv("KDKIT_CACHE", str(tmp_path / "cache"))
    teacher = tmp_path / "teacher.toml"
    teacher.write_text(TEACHER)
    student = tmp_path / "student.toml"
    student.write_text(TEACHER.replace('name = "teacher"', 'name = "student"')
                       + '[teachers.t]\nrecipe = "teacher.toml"\n[[losses]]\nplugin = "kl"\nhead = "pool"\n'
                         'teachers = ["t"]\n')
    teacher_dir = teacher_run_dir(load_recipe(teacher), default_plugins())
    holder = hold(teacher_dir, teacher)
    console = Console(holder)
    try:
        out = kdkit.run(student, out=tmp_path / "student", allow_weak_teachers=True, console=console)
    finally:
        holder.kill()
        holder.wait()
    assert console.lines[0] == (f"{teacher_dir}: in use by another kdkit process (pid {holder.pid} on "
                                f"{socket.gethostname()}): waiting for it to finish")
    assert not any("training teacher" in line for line in console.lines)  # reused, not trained again
    assert json.loads((teacher_dir / "summary.json").read_text())["status"] == "completed"
    assert len((teacher_dir / "metrics.jsonl").read_text().splitlines()) == 1  # trained once, by the holder
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"


CACHED = TWO_TEACHER_RECIPE.replace("train_size = 64", "train_size = 32").replace("epochs = 2", "epochs = 1") + """
[teacher_cache]
views = 1
"""


def test_a_teacher_output_cache_built_elsewhere_is_waited_for_then_reused(tmp_path, monkeypatch, cli):
    from kdkit.builder import teacher_cache
    from kdkit.builder.build import build_all_parts
    from kdkit.plugin.discovery import default_plugins
    from kdkit.recipe.experiment import resolve
    from kdkit.recipe.sections import cache_root
    from kdkit.recipe.toml import load_recipe

    monkeypatch.setenv("KDKIT_CACHE", str(tmp_path / "cache"))
    recipe = tmp_path / "cached.toml"
    recipe.write_text(CACHED)
    exp = resolve(load_recipe(recipe), allow_random_teachers=True)
    parts = build_all_parts(exp, default_plugins(), torch.device("cpu"), train_teachers=False, caches=False)
    cache = cache_root() / "teacher_outputs" / f"conv-{parts.teacher_hashes['conv']}"
    holder = hold(cache, recipe, kind="cache")
    try:
        refused = cli("cache", "build", recipe, "--allow-random-teachers")
        assert refused.exit_code == 2, refused.output
        assert f"{cache}: in use by another kdkit process (pid {holder.pid} on " in refused.output
        assert not (cache / "key.json").exists()

        def never(*args, **kwargs):
            raise AssertionError("built again")

        monkeypatch.setattr(teacher_cache, "build_cache", never)  # this process only reads the caches
        console = Console(holder)
        out = kdkit.run(recipe, out=tmp_path / "run", allow_random_teachers=True, console=console)
    finally:
        holder.kill()
        holder.wait()
    assert console.lines[0].startswith(f"{cache}: in use by another kdkit process (pid {holder.pid} on ")
    assert set(json.loads((out / "summary.json").read_text())["teacher_cache"]) == {"conv", "other"}


def test_a_forked_child_never_keeps_the_lock(tmp_path):
    from kdkit.store import lock

    lock.acquire(tmp_path)
    read, write = os.pipe()
    forked, ready = os.pipe()
    child = os.fork()
    if child == 0:  # as a data loader's worker: it outlives the lock's release below
        os.write(ready, b"x")  # the at-fork hooks have run by now
        os.read(read, 1)
        os._exit(0)
    try:
        os.read(forked, 1)
        lock.release(tmp_path)
        assert lock.holder(tmp_path) is None  # free, although the child still has the parent's descriptors
    finally:
        os.write(write, b"x")
        os.waitpid(child, 0)
