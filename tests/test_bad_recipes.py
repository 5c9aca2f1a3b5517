"""Every malformed recipe ends in one clear message naming the file and key, exit status 2, no traceback,
and nothing written: no new run directory, and an existing one (even with --force) left as it was."""
from __future__ import annotations

import pytest
import torch

import kdkit

from conftest import TWO_TEACHER_RECIPE

# (overrides, expected message). Each case starts from the two-teacher recipe.
CASES = [
    (["trian.epochs=1"], "trian: unknown top-level key (did you mean: train?)"),
    (["train.epoch=3"], "train.epoch: unknown key (did you mean: epochs?)"),
    (['train.epochs="ten"'], "train.epochs: expected int, got str 'ten'"),
    (["train.epochs=-1"], "train.epochs: must be >= 0, <= 100000, got -1"),
    (["train.batch_size=0"], "train.batch_size: must be >= 1, <= 65536, got 0"),
    (["data.limit_train=-5"], "data.limit_train: must be >= 0, got -5"),
    (["data.workers=-1"], "data.workers: must be >= 0, <= 256, got -1"),
    (["data.batch_size_eval=0"], "data.batch_size_eval: must be >= 1, <= 65536, got 0"),
    (["train.clip_grad=-1.0"], "train.clip_grad: must be >= 0, got -1.0"),
    (["train.precision=fp16"], "train.precision: expected 'auto' | 'fp32' | 'bf16', got str 'fp16'"),
    (["train.optimizer=adamww"], "train.optimizer: unknown optimizer 'adamww' (did you mean: adamw"),
    (["train.accum_steps=3"], "train.accum_steps: must divide train.batch_size (16)"),
    (["train.batch_size=18", "train.accum_steps=2"], "train.batch_size: mixup/cutmix needs an even micro-batch"),
    (['seed="zero"'], "seed: expected int, got str 'zero'"),
    (["student.plugin=timmm"], "student.plugin: no student plugin named 'timmm' (did you mean: timm?)"),
    (["student.modle=1"], "student.modle: unknown key (did you mean: model?)"),
    (["teachers.conv.mean=[0.5, 0.5, 0.5]"], "teachers.conv.std: give mean and std together"),
    (["teachers.conv.mean=[0.5]", "teachers.conv.std=[0.5, 0.2]"],
     "teachers.conv.std: expected one mean and one std > 0 per channel, got mean [0.5] and std [0.5, 0.2]"),
    (["teachers.conv.mean=[0.5]", "teachers.conv.std=[0.5]"],
     "teachers.conv.mean: 1 values for the data's 3 channels: give one mean and one std per channel"),
    (["teachers.conv.input_size=0"], "teachers.conv.input_size: must be >= 1"),
    (['teachers.conv.checkpiont="x.pt"'], "teachers.conv.checkpiont: unknown key (did you mean: checkpoint?); valid "
                                           "keys: model, num_classes, in_chans, small_input, pretrained, model_kwargs, "
                                           "checkpoint, classes, compile, input_size, mean, plugin, precision, recipe, "
                                           "std"),  # the core's too
    (["data.dataset=cifar11"], "data.dataset: no dataset plugin named 'cifar11' (did you mean: cifar10"),
    (["data.train_sise=10"], "data.train_sise: unknown key (did you mean: train_size?)"),
    (["data.image_size=3.5"], "data.image_size: expected int, got float 3.5"),
    (['losses.1.teachers=["conf"]'], "losses.1.teachers.0: no teacher named 'conf' (did you mean: conv?)"),
    (["losses.1.teachers=[]"], "losses.1.teachers: loss 'kl' distils from teachers: name at least one"),
    (['losses.0.teachers=["conv"]'], "losses.0.teachers: loss 'ce' is a label loss and takes no teachers"),
    (["losses.1.plugin=kld"], "losses.1.plugin: no loss plugin named 'kld' (did you mean: kl?)"),
    (["losses.1.temperature=2.0"], "losses.1.temperature: unknown key"),
    (["losses.1.tau=hot"], "losses.1.tau: expected float, got str 'hot'"),
    (["losses.0.head=clss"], "losses.0.head: no head named 'clss' (did you mean: cls?)"),
    (['eval.heads=["cls", "cnov"]'], "eval.heads.1: no head named 'cnov' (did you mean: conv?)"),
    (["eval.heads=[]"], "eval.heads: must name at least one head"),
    (["heads.cls.embedding=pol"], "heads.cls.embedding: the student has no embedding 'pol' (did you mean: pool?)"),
    (["heads.cls.plugin=lineaar"], "heads.cls.plugin: no head plugin named 'lineaar' (did you mean: linear?)"),
    (["teachers.conv.checkpoint=missing.pt"], "teachers.conv.checkpoint: no such file or directory"),
    (["teachers.conv.precision=half"], "teachers.conv.precision: expected 'auto' | 'fp32' | 'bf16'"),
    (["losses.5.weight=1.0"], "losses.5: no list entry '5': the list has 3 entries"),
    (["augment.mixup=lots"], "augment.mixup: expected float, got str 'lots'"),
    (["losses=3"], "losses: expected an array of tables"),
    (["student=3"], "student: expected a table, got int 3"),
    # found only when the parts are built: still before anything is written
    (["data.limit_train=8"], "train.batch_size: the training set has 8 images, fewer than one batch of 16"),
    (["teachers.conv.num_classes=3"], "teachers.conv: the teacher gives (1, 3) for one image, expected (1, 4)"),
    (['student.model_kwargs={ img_size = 32, global_pool = "" }'],
     "student plugin 'timm' declares embedding 'pool' of size 64 but returns (1, 5, 64)"),
    (["callbacks.stopwatch.plugin=timer"], "callbacks.stopwatch.plugin: no callback plugin named 'timer'"),
    # every number has a range (issue 21, finding 7): NaN and inf fail every one
    (["train.lr=nan"], "train.lr: must be finite and > 0, got nan"),
    (["train.lr=inf"], "train.lr: must be finite and > 0, got inf"),
    (["train.min_lr=nan"], "train.min_lr: must be finite and >= 0, got nan"),
    (["train.weight_decay=nan"], "train.weight_decay: must be finite and >= 0, got nan"),
    (["train.weight_decay=-0.1"], "train.weight_decay: must be >= 0, got -0.1"),
    (["train.warmup_epochs=-5"], "train.warmup_epochs: must be >= 0, <= 100000, got -5"),
    (["train.epochs=1000000000000000000"], "train.epochs: must be >= 0, <= 100000, got 1000000000000000000"),
    (["train.momentum=1.5"], "train.momentum: must be >= 0, < 1, got 1.5"),
    (["train.batch_size=100000"], "train.batch_size: must be >= 1, <= 65536, got 100000"),
    (["augment.label_smoothing=nan"], "augment.label_smoothing: must be finite and >= 0, < 1, got nan"),
    (["augment.label_smoothing=2"], "augment.label_smoothing: must be >= 0, < 1, got 2.0"),
    (["augment.hflip=5"], "augment.hflip: must be >= 0, <= 1, got 5.0"),
    (["augment.random_erasing=-3"], "augment.random_erasing: must be >= 0, <= 1, got -3.0"),
    (["augment.mixup=-0.5"], "augment.mixup: must be >= 0, got -0.5"),
    (["augment.crop_scale=[nan, 1]"], "augment.crop_scale.0: must be finite and > 0, <= 1, got nan"),
    (["augment.crop_scale=[0, 1]"], "augment.crop_scale.0: must be > 0, <= 1, got 0.0"),
    (["augment.crop_scale=[0.9, 0.5]"],
     "augment.crop_scale: must be two fractions, min then max (min <= max), got [0.9, 0.5]"),
    (["augment.crop_scale=[0.5]"], "augment.crop_scale: must be two fractions, min then max (min <= max), got [0.5]"),
    (["seed=-1"], "seed: must be >= 0, got -1"),
    (["data.image_size=0"], "data.image_size: must be >= 1, <= 4096, got 0"),
    (["data.image_size=-16"], "data.image_size: must be >= 1, <= 4096, got -16"),
    (["data.image_size=100000"], "data.image_size: must be >= 1, <= 4096, got 100000"),
    (["data.image_size=8"], "student plugin 'timm' cannot take one 8x8 image (data.image_size, or the student's "
                            "size keys): Input height (8) should be divisible by patch size (16)"),
    (["data.val_split=nan"], "data.val_split: must be finite and >= 0, < 1, got nan"),
    (["data.train_size=0"], "data.train_size: must be >= 1, <= 1000000, got 0"),
    (["losses.1.weight=nan"], "losses.1.weight: must be finite and >= 0, got nan"),
    (["losses.1.weight=-1"], "losses.1.weight: must be >= 0, got -1.0"),
    (["losses.1.tau=nan"], "losses.1.tau: must be finite and > 0, got nan"),
    (["losses.1.tau=0"], "losses.1.tau: must be > 0, got 0.0"),
    (["losses.1.tau=-1"], "losses.1.tau: must be > 0, got -1.0"),
    (["student.drop_path_rate=2.0"], "student.drop_path_rate: must be >= 0, < 1, got 2.0"),
    (["teacher_cache.top_k=-1"], "teacher_cache.top_k: must be >= 0, <= 100000, got -1"),
]


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def existing_run(tmp_path):
    """A run directory that a bad command must leave exactly as it is."""
    out = tmp_path / "existing"
    (out / "checkpoints").mkdir(parents=True)
    (out / "recipe.toml").write_text('name = "existing"\n')
    (out / "summary.json").write_text('{"status": "completed"}\n')
    (out / "checkpoints" / "last.pt").write_bytes(b"weights")
    return out


def assert_nothing_written(cli, args, message, new_dir, existing_run):
    """``args`` fail with exit 2 and ``message``, writing neither ``new_dir`` nor into ``existing_run`` (forced)."""
    for out, extra in ((new_dir, []), (existing_run, ["--force"])):
        before = snapshot(existing_run)
        result = cli(*args, "--out", out, *extra)
        assert result.exit_code == 2, result.output
        assert message in result.output
        assert "Traceback" not in result.output
        assert snapshot(existing_run) == before
    assert not new_dir.exists()


@pytest.mark.parametrize("overrides, message", CASES, ids=[c[1].split(":")[0] for c in CASES])
def test_bad_recipe(overrides, message, write_recipe, cli, tmp_path, existing_run):
    args = ["run", write_recipe(TWO_TEACHER_RECIPE), "--allow-random-teachers"]
    for override in overrides:
        args += ["-o", override]
    assert_nothing_written(cli, args, message, tmp_path / "out", existing_run)


def test_error_names_the_file_that_set_the_key(write_recipe, cli, tmp_path):
    base = write_recipe(TWO_TEACHER_RECIPE, "base.toml")
    child = write_recipe(f'extends = "{base.name}"\n[train]\nlr = 1e-3\n', "child.toml")
    result = cli("run", child, "--out", tmp_path / "out", "--allow-random-teachers", "-o", "train.epochs=-1")
    assert result.exit_code == 2 and "error: -o: train.epochs: must be >= 0" in result.output
    result = cli("run", child, "--out", tmp_path / "out", "--allow-random-teachers", "-o", "train.accum_steps=5")
    assert f"{base}: train.accum_steps" not in result.output  # set by -o
    result = cli("run", child, "--out", tmp_path / "out", "-o", "losses.1.tau=-x")
    assert result.exit_code == 2


def test_teacher_without_weights_needs_the_flag(write_recipe, cli, tmp_path, existing_run):
    recipe = write_recipe(TWO_TEACHER_RECIPE)
    assert_nothing_written(cli, ["run", recipe], f"{recipe}: teachers.conv: the teacher has no weights",
                           tmp_path / "out", existing_run)
    assert "--allow-random-teachers" in cli("run", recipe, "--out", tmp_path / "out").output


def test_checkpoint_that_does_not_fit(write_recipe, cli, tmp_path, existing_run):
    bad = tmp_path / "bad.pt"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, bad)
    args = ["run", write_recipe(TWO_TEACHER_RECIPE), "--allow-random-teachers", "-o", f"teachers.conv.checkpoint={bad}"]
    assert_nothing_written(cli, args, f"{bad}: the weights do not fit teachers.conv: 1 tensor of other shapes "
                           "(fc.weight [2, 2] in the file, [4, 96] in the model)", tmp_path / "out", existing_run)
    imagenet = tmp_path / "imagenet.pt"  # the same network with a 1000-class head: its classifier differs
    torch.save({"model": kdkit.build_model("teacher", plugin="timm", model="test_resnet", num_classes=1000).state_dict()},
               imagenet)
    args[-1] = f"teachers.conv.checkpoint={imagenet}"
    result = cli(*args)
    assert result.exit_code == 2 and "2 tensors of other shapes (" in result.output and "[1000, " in result.output
    assert "need teachers.conv.classes (the checkpoint's class names in output order)" in result.output
    assert len(result.output.strip().splitlines()[-1]) < 600  # one line, not torch's list


@pytest.mark.parametrize("content, message", [
    (None, "recipe file not found"),
    ("[train\n", "not valid TOML"),
])
def test_unreadable_recipe_files(content, message, tmp_path, cli, existing_run):
    path = tmp_path / "r.toml"
    if content is not None:
        path.write_text(content)
    assert_nothing_written(cli, ["run", path], f"{path}: {message}", tmp_path / "out", existing_run)


def test_missing_data_says_where_it_looked(write_recipe, cli, tmp_path, existing_run):
    recipe = write_recipe(TWO_TEACHER_RECIPE.replace("train_size = 64\nval_size = 32\n", ""))
    args = ["run", recipe, "--allow-random-teachers", "-o", "data.dataset=cifar10",
            "-o", f"data.root={tmp_path / 'nodata'}", "-o", "data.num_classes=0"]
    assert_nothing_written(cli, args, str(tmp_path / "nodata"), tmp_path / "out", existing_run)


def test_cli_exit_code_in_a_subprocess(write_recipe, tmp_path):
    import subprocess
    import sys

    recipe = write_recipe(TWO_TEACHER_RECIPE)
    proc = subprocess.run([sys.executable, "-m", "kdkit", "run", str(recipe), "-o", "train.epoch=1"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "train.epoch: unknown key" in proc.stderr and "Traceback" not in proc.stderr
