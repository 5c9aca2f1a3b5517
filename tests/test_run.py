"""End to end: ``kdkit run`` of a two-teacher recipe on fake data, and what it leaves behind."""
from __future__ import annotations

import json
import os
import shutil
import stat

import pytest
import torch

import kdkit
from kdkit.errors import KdkitError
from kdkit.recipe.toml import load_recipe
from kdkit.store.export import read_meta

from conftest import TWO_TEACHER_RECIPE


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One completed run, shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("run")
    recipe = root / "two_teachers.toml"
    recipe.write_text(TWO_TEACHER_RECIPE)
    out = kdkit.run(recipe, out=root / "out", allow_random_teachers=True)
    return recipe, out


def test_run_directory_holds_everything(finished_run):
    recipe, out = finished_run
    for name in ("recipe.toml", "metrics.jsonl", "summary.json", "checkpoints/last.pt", "checkpoints/best.pt",
                 "student.safetensors"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert set(rows[0]["train"]) == {"loss", "ce/cls", "kl/conv", "kl/inv"}
    assert set(rows[0]["top1"]) == {"cls", "conv", "inv", "eval", "heads_mean"}  # no unused default head on "pool"
    assert rows[0]["images_per_s"] > 0 and rows[0]["wall_s"] > 0 and rows[0]["lr"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs"] == 2 and summary["name"] == "two_teachers"
    assert set(summary["teacher_top1"]) == {"conv", "other"}
    assert summary["best_epoch"] in (1, 2) and summary["top1"] == rows[-1]["top1"]
    assert summary["params"] > 0 and summary["flops"] > 0
    assert summary["train_images_per_s"] > 0 and summary["infer_images_per_s"] > 0
    assert summary["kdkit_version"] == kdkit.__version__ and len(summary["recipe_hash"]) == 16
    assert "[teachers.conv]" in (out / "recipe.toml").read_text()


def test_every_run_file_gets_the_default_mode(finished_run):
    """0666 less the umask, as files are created: the export too (safetensors' own writer makes it 0600)."""
    _, out = finished_run
    umask = os.umask(0)
    os.umask(umask)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in out.rglob("*") if path.is_file()}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask) and "student.safetensors" in modes


def test_checkpoints_load_with_weights_only(finished_run):
    _, out = finished_run
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and state["step"] > 0 and state["batch"] == 0
    assert {"model", "optimizer", "history", "summary", "plugins"} <= set(state)
    assert state["summary"]["teacher_top1"] == json.loads((out / "summary.json").read_text())["teacher_top1"]


def test_export_rebuilds_the_model(finished_run):
    _, out = finished_run
    model = kdkit.load(out)
    meta = read_meta(out / "student.safetensors")
    assert meta["eval"]["heads"] == ["cls", "conv", "inv"] and meta["student"]["plugin"] == "timm"
    assert len(model.meta["class_names"]) == 4 and meta["crop_pct"] == 1.0  # fake data: evaluated uncropped
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    logits = model.predict(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 4)


def test_a_run_directory_serves_as_a_teacher(finished_run, write_recipe, tmp_path):
    _, out = finished_run
    recipe = write_recipe(f"""
        [data]
        dataset = "fake"
        image_size = 32
        num_classes = 4
        train_size = 64
        val_size = 32
        batch_size_eval = 32
        workers = 0
        [student]
        plugin = "timm"
        model = "test_resnet"
        [teachers.previous]
        checkpoint = "{out}"
        [[losses]]
        plugin = "kl"
        head = "pool"
        teachers = ["previous"]
        [train]
        epochs = 1
        batch_size = 16
        [eval]
        heads = ["pool"]
        """)
    weak = r"teachers.previous: validation top-1 .* is at most twice chance .*\(small_input, width"
    with pytest.raises(KdkitError, match=weak):
        kdkit.run(recipe, out=tmp_path / "second")  # trained on noise: near chance, which usually means a mistake
    assert not (tmp_path / "second").exists()
    second = kdkit.run(recipe, out=tmp_path / "second", allow_weak_teachers=True)
    summary = json.loads((second / "summary.json").read_text())
    first = json.loads((out / "summary.json").read_text())
    assert summary["teacher_top1"]["previous"] == pytest.approx(first["top1"]["eval"])


def test_existing_run_directory_is_refused_and_untouched(finished_run, cli):
    recipe, out = finished_run
    before = (out / "summary.json").read_text()
    result = cli("run", recipe, "--out", out, "--allow-random-teachers")
    assert result.exit_code == 2
    assert "exists and is not empty" in result.output and "--force" in result.output
    assert (out / "summary.json").read_text() == before


def test_force_overwrites(finished_run, cli, tmp_path):
    recipe, finished = finished_run
    out = shutil.copytree(finished, tmp_path / "forced")  # a kdkit run: --force overwrites nothing else
    (out / "old.txt").write_text("old")
    result = cli("run", recipe, "--out", out, "--force", "--allow-random-teachers", "-o", "train.epochs=1")
    assert result.exit_code == 0, result.output
    assert not (out / "old.txt").exists()
    assert json.loads((out / "summary.json").read_text())["epochs"] == 1


def test_predict_prints_top_classes(finished_run, cli, tmp_path):
    from PIL import Image

    _, out = finished_run
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 40), (200, 10, 10)).save(image)
    result = cli("predict", out, image, "--top", "2")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{image}: ") and result.output.count("%") == 2
    bad = cli("predict", out, tmp_path / "missing.png")
    assert bad.exit_code == 2 and "cannot read the image" in bad.output

    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 40), (10, 200, 10)).save(folder / "sub" / "b.JPG")
    (folder / "notes.txt").write_text("not an image")
    shutil.copy(image, folder / "a.png")
    listed = json.loads(cli("predict", out, folder, image, "--top", "3", "--json").output)
    assert [entry["image"] for entry in listed] == [str(folder / "a.png"), str(folder / "sub" / "b.JPG"), str(image)]
    assert listed[0]["top"] == listed[2]["top"] and len(listed[1]["top"]) == 3  # the same pixels, the same answer
    assert sum(c["probability"] for c in listed[0]["top"]) <= 1 and set(listed[0]["top"][0]) == {"class", "probability"}
    (tmp_path / "empty").mkdir()
    empty = cli("predict", out, tmp_path / "empty")
    assert empty.exit_code == 2 and f"{tmp_path / 'empty'}: no image files in this folder" in empty.output


def test_a_broken_run_records_its_status(write_recipe, cli, tmp_path, monkeypatch):
    from kdkit.train.loop import Trainer

    def broken_step(self, images, labels, epoch, views=None):
        raise RuntimeError("stop")

    monkeypatch.setattr(Trainer, "train_step", broken_step)
    recipe = write_recipe(TWO_TEACHER_RECIPE)
    result = cli("run", recipe, "--out", tmp_path / "out", "--allow-random-teachers")
    assert result.exit_code == 1 and "RuntimeError: stop" in result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["epochs"] == 0
    assert set(summary["teacher_top1"]) == {"conv", "other"}


def test_teachers_given_by_recipes_are_trained_once_and_cached(write_recipe, cli, tmp_path, monkeypatch):
    monkeypatch.setenv("KDKIT_CACHE", str(tmp_path / "cache"))
    data = """
        [data]
        dataset = "fake"
        image_size = 32
        num_classes = 4
        train_size = 32
        val_size = 16
        workers = 0
        [train]
        epochs = 1
        batch_size = 16
        """
    write_recipe(data + '[student]\nplugin = "timm"\nmodel = "test_resnet"\n'
                 '[[losses]]\nplugin = "ce"\nhead = "pool"\n[eval]\nheads = ["pool"]\n', "teacher.toml")
    student = write_recipe(data + '[student]\nplugin = "timm"\nmodel = "test_vit"\nmodel_kwargs = { img_size = 32 }\n'
                           '[teachers.conv]\nrecipe = "teacher.toml"\n'
                           '[[losses]]\nplugin = "kl"\nhead = "pool"\nteachers = ["conv"]\n'
                           '[eval]\nheads = ["pool"]\n', "student.toml")
    missing = cli("run", student, "--out", tmp_path / "refused", "--no-train-teachers")
    assert missing.exit_code == 2 and "teachers.conv.recipe: teacher not trained yet" in missing.output
    first = cli("run", student, "--out", tmp_path / "first", "--allow-weak-teachers")
    assert first.exit_code == 0, first.output
    assert "training teacher 'conv'" in first.output
    cached = list((tmp_path / "cache" / "teachers").iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("teacher-")
    second = cli("run", student, "--out", tmp_path / "second", "--no-train-teachers", "--allow-weak-teachers")
    assert second.exit_code == 0, second.output
    assert "training teacher" not in second.output
    teacher_top1 = [json.loads((tmp_path / d / "summary.json").read_text())["teacher_top1"]["conv"]
                    for d in ("first", "second")]
    assert teacher_top1[0] == teacher_top1[1]


def test_a_broken_teacher_recipe_is_reported_before_anything_trains(write_recipe, cli, tmp_path):
    write_recipe('[student]\nplugin = "timm"\n[[losses]]\nplugin = "ce"\nhead = "pool"\n', "teacher.toml")
    student = write_recipe(TWO_TEACHER_RECIPE.replace('[teachers.conv]\nplugin = "timm"\nmodel = "test_resnet"',
                                                      '[teachers.conv]\nrecipe = "teacher.toml"'))
    result = cli("run", student, "--out", tmp_path / "out", "--allow-random-teachers")
    assert result.exit_code == 2
    assert f"{tmp_path / 'teacher.toml'}: student.model: missing required key" in result.output


def test_a_held_out_validation_split_selects_and_the_test_split_reports(write_recipe, tmp_path):
    """With data.val_split the epochs are compared on held-out training images; the test split is
    evaluated once, at the end, for the final student and for the epoch validation chose."""
    from kdkit.builder.parts import build_splits
    from kdkit.plugin.discovery import default_plugins
    from kdkit.recipe.experiment import resolve
    from kdkit.recipe.toml import load_recipe

    recipe = write_recipe(TWO_TEACHER_RECIPE)
    out = kdkit.run(recipe, ["data.val_split=0.25"], out=tmp_path / "run", allow_random_teachers=True)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_selected_on"] == "validation" and summary["best_test_top1"] is not None
    assert set(summary["test_top1"]) == set(summary["top1"])
    test = build_splits(resolve(load_recipe(recipe), allow_random_teachers=True), default_plugins()).val  # 32 images
    model = kdkit.load(out)
    with torch.no_grad():
        predictions = model.predict(torch.stack([test[i][0] for i in range(len(test))])).argmax(-1)
    labels = torch.tensor([test[i][1] for i in range(len(test))])
    assert summary["test_top1"]["eval"] == pytest.approx(100.0 * (predictions == labels).float().mean().item())
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["top1"].keys() == summary["top1"].keys()


def test_a_unicode_teacher_name_gives_a_run_that_reloads(write_recipe, cli, tmp_path):
    recipe = write_recipe(TWO_TEACHER_RECIPE.replace("[teachers.conv]", '[teachers."lehrerü"]')
                          .replace('teachers = ["conv"]', 'teachers = ["lehrerü"]'))
    overrides = ["train.epochs=1", "data.train_size=32"]
    result = cli("run", recipe, "--out", tmp_path / "out", "--allow-random-teachers",
                 *(arg for o in overrides for arg in ("-o", o)))
    assert result.exit_code == 0, result.output
    written = load_recipe(tmp_path / "out" / "recipe.toml")
    assert written.table == load_recipe(recipe, overrides).table
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["recipe_hash"] == written.hash()


def test_a_run_in_this_process_leaves_no_loader_worker_behind(write_recipe, tmp_path):
    """A notebook's ``kdkit.run`` with loader workers: they end with the run, not at some later garbage
    collection (which waited seconds for each in vain)."""
    import multiprocessing

    recipe = write_recipe(TWO_TEACHER_RECIPE.replace("workers = 0", "workers = 2"))
    kdkit.run(recipe, ["train.epochs=1"], out=tmp_path / "run", allow_random_teachers=True)
    assert multiprocessing.active_children() == []


def test_callback_objects_from_python_join_the_run(write_recipe, tmp_path):
    """A notebook's logger: ``kdkit.run(..., callbacks=[obj])``, its hooks called like a recipe callback's."""
    from kdkit import api
    from kdkit.errors import PluginError

    class Epochs:
        def __init__(self):
            self.rows, self.ended = [], None

        @api.hookimpl
        def kdkit_epoch_end(self, trainer, row):
            self.rows.append((trainer.epoch, row["epoch"], row["top1"]["eval"]))

        @api.hookimpl
        def kdkit_run_end(self, trainer, status):
            self.ended = status

    seen = Epochs()
    out = kdkit.run(write_recipe(TWO_TEACHER_RECIPE), ["train.epochs=2"], out=tmp_path / "run",
                    allow_random_teachers=True, callbacks=[seen])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert seen.rows == [(row["epoch"], row["epoch"], row["top1"]["eval"]) for row in rows]
    assert seen.ended == "completed"

    class Misspelt:
        @api.hookimpl
        def kdkit_epoch_ends(self, trainer, row):
            pass

    with pytest.raises(PluginError, match="kdkit_epoch_ends"):
        kdkit.run(write_recipe(TWO_TEACHER_RECIPE), out=tmp_path / "again", allow_random_teachers=True,
                  callbacks=[Misspelt()])
    assert not (tmp_path / "again").exists()


def test_the_student_exports_for_other_runtimes(finished_run, cli, tmp_path):
    """``torch.export`` and ONNX: the same eval prediction on a batch of another size, the metadata inside."""
    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    _, out = finished_run
    model = kdkit.load(out)
    images = torch.randn(3, 3, 32, 32)  # the files were traced on a batch of 2
    expected = model.predict(images).detach()

    result = cli("export", out, "--format", "pt2", "-o", tmp_path / "s.pt2")
    assert result.exit_code == 0, result.output
    extra = {"kdkit.json": ""}
    program = torch.export.load(tmp_path / "s.pt2", extra_files=extra)
    torch.testing.assert_close(program.module()(images), expected)
    assert json.loads(extra["kdkit.json"])["class_names"] == model.meta["class_names"]

    again = cli("export", out, "--format", "pt2", "-o", tmp_path / "s.pt2")
    assert again.exit_code == 2 and "already exists (--force replaces a file that kdkit export wrote" in again.output
    assert cli("export", out, "--format", "pt2", "-o", tmp_path / "s.pt2", "--force").exit_code == 0
    (tmp_path / "mine.pt2").write_text("a user's file")
    assert cli("export", out, "--format", "pt2", "-o", tmp_path / "mine.pt2", "--force").exit_code == 2
    assert (tmp_path / "mine.pt2").read_text() == "a user's file"  # never replaced

    shutil.copy(out / "student.safetensors", tmp_path)
    result = cli("export", tmp_path / "student.safetensors")  # ONNX, beside it
    assert result.exit_code == 0 and result.output.strip() == str(tmp_path / "student.onnx"), result.output
    graph = onnx.load(tmp_path / "student.onnx")
    onnx.checker.check_model(graph)
    [answer] = ReferenceEvaluator(graph).run(None, {graph.graph.input[0].name: images.numpy()})
    torch.testing.assert_close(torch.from_numpy(answer), expected, rtol=1e-4, atol=1e-5)
    meta = json.loads({p.key: p.value for p in graph.metadata_props}["kdkit"])
    assert meta["mean"] == model.meta["mean"] and meta["image_size"] == 32
    from kdkit.tools.convert import written_by_kdkit

    assert written_by_kdkit(tmp_path / "student.onnx", "onnx") and not written_by_kdkit(tmp_path / "mine.pt2", "onnx")
