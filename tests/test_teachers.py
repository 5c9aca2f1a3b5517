"""Teachers: pretrained heads that do not fit the data, teachers naming their own classes, the data a
cached teacher was trained on, and teachers that must not have seen the validation images."""
from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import kdkit
from kdkit.builder.build import teacher_run_dir
from kdkit.builder.parts import build_parts, build_teachers
from kdkit.errors import KdkitError
from kdkit.plugin.discovery import default_plugins
from kdkit.recipe.experiment import resolve
from kdkit.recipe.toml import load_recipe

from conftest import TWO_TEACHER_RECIPE
from test_datasets import make_tree

DATA = """
[data]
dataset = "fake"
image_size = 32
num_classes = 4
train_size = 32
val_size = 16
workers = 0

[student]
plugin = "timm"
model = "test_resnet"

[[losses]]
plugin = "kl"
head = "pool"
teachers = ["big"]

[train]
epochs = 1
batch_size = 16

[eval]
heads = ["pool"]
"""


@pytest.fixture
def pretrained_file(tmp_path):
    """A local 'pretrained' test_resnet with 10 classes, loaded offline through timm's pretrained_cfg_overlay."""
    torch.manual_seed(0)
    path = tmp_path / "pretrained.pth"
    torch.save(kdkit.build_model("teacher", plugin="timm", model="test_resnet", num_classes=10).state_dict(), path)
    return path


def teacher_table(path, classes=None) -> str:
    lines = ['[teachers.big]', 'plugin = "timm"', 'model = "test_resnet"', "pretrained = true",
             f'model_kwargs = {{ pretrained_cfg_overlay = {{ file = "{path}", num_classes = 10 }} }}']
    if classes is not None:
        lines.append(f"classes = {classes!r}".replace("'", '"'))
    return "\n".join(lines) + "\n"


def test_a_pretrained_head_for_other_classes_is_refused(write_recipe, cli, tmp_path, pretrained_file):
    recipe = write_recipe(DATA + teacher_table(pretrained_file))
    result = cli("run", recipe, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "teachers.big.pretrained: the pretrained classifier has 10 classes and the teacher would get 4" in result.output
    assert "teachers.big.classes" in result.output and not (tmp_path / "out").exists()


def test_a_teacher_naming_its_classes_gives_the_datas_logits(write_recipe, pretrained_file):
    names = [f"class{i}" for i in (7, 3, 9, 0, 5, 1, 8, 2, 6, 4)]  # the teacher's own order, a superset
    recipe = write_recipe(DATA + teacher_table(pretrained_file, names))
    plugins, cpu = default_plugins(), torch.device("cpu")
    exp = resolve(load_recipe(recipe), plugins)
    parts = build_parts(exp, plugins, cpu)
    teacher = build_teachers(exp, plugins, parts, cpu)["big"]
    images = torch.stack([parts.val_set[i][0] for i in range(4)])
    mapped = teacher.logits(images, *parts.normalization(cpu))
    teacher.class_index = None
    full = teacher.logits(images, *parts.normalization(cpu))  # every one of its 10 outputs
    weights = torch.load(pretrained_file)
    assert torch.equal(teacher.model.fc.weight, weights["fc.weight"])  # the pretrained head, not a random one
    assert torch.equal(mapped, full[:, [names.index(f"class{c}") for c in range(4)]])


def test_a_teacher_without_some_of_the_datas_classes_is_refused(write_recipe, pretrained_file):
    names = [f"other{i}" for i in range(9)] + ["class0"]
    recipe = write_recipe(DATA + teacher_table(pretrained_file, names))
    plugins, cpu = default_plugins(), torch.device("cpu")
    exp = resolve(load_recipe(recipe), plugins)
    with pytest.raises(KdkitError, match=r"teachers.big.classes: the teacher has no output for 3 of the data's 4"):
        build_teachers(exp, plugins, build_parts(exp, plugins, cpu), cpu)


def test_a_teacher_recipe_must_not_train_on_the_students_validation_images(write_recipe):
    write_recipe(DATA.split("[student]")[0] + '[student]\nplugin = "timm"\nmodel = "test_resnet"\n'
                 '[[losses]]\nplugin = "ce"\nhead = "pool"\n[eval]\nheads = ["pool"]\n', "teacher.toml")
    student = write_recipe(DATA.replace("workers = 0", "workers = 0\nval_split = 0.25")
                           + '[teachers.big]\nrecipe = "teacher.toml"\n')
    with pytest.raises(KdkitError, match="holds out data.val_split = 0.25 .* the teacher would have seen"):
        resolve(load_recipe(student))
    resolve(load_recipe(student, ["data.val_split=0.0"]))  # without a held-out split there is nothing to leak


def test_the_teacher_cache_is_keyed_by_the_datas_content(write_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("KDKIT_CACHE", str(tmp_path / "cache"))
    make_tree(tmp_path / "data")
    recipe = write_recipe(textwrap.dedent(f"""
        [data]
        dataset = "cifar10"
        root = "{tmp_path / 'data'}"
        image_size = 8
        [student]
        plugin = "timm"
        model = "test_resnet"
        [[losses]]
        plugin = "ce"
        head = "pool"
        [eval]
        heads = ["pool"]
        """), "teacher.toml")
    plugins = default_plugins()
    before = teacher_run_dir(load_recipe(recipe), plugins)
    assert before == teacher_run_dir(load_recipe(recipe), plugins)
    image = tmp_path / "data" / "train" / "cat" / "000.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)  # same path, same recipe, other pixels
    assert teacher_run_dir(load_recipe(recipe), plugins) != before



def small_model():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False), torch.nn.BatchNorm1d(2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    return model


def test_the_weights_hash_is_stable_and_sees_names_dtypes_and_buffers():
    """Teacher caches and resumed runs are keyed by it: it must not change between versions of kdkit."""
    from kdkit.builder.teacher import weights_hash

    assert weights_hash(small_model()) == "a593651b7b08dc0c"
    renamed = torch.nn.Sequential(torch.nn.Identity(), *small_model())  # the same tensors under other names
    other_buffer = small_model()
    other_buffer[1].running_mean += 1
    hashes = {weights_hash(m) for m in (renamed, small_model().double(), other_buffer)}
    assert len(hashes) == 3 and "a593651b7b08dc0c" not in hashes


def test_a_teacher_given_by_a_recipe_keeps_its_precision_and_compile_switch(write_recipe):
    write_recipe(DATA.split("[student]")[0] + '[student]\nplugin = "timm"\nmodel = "test_resnet"\n'
                 '[[losses]]\nplugin = "ce"\nhead = "pool"\n[eval]\nheads = ["pool"]\n', "teacher.toml")
    student = write_recipe(DATA + '[teachers.big]\nrecipe = "teacher.toml"\nprecision = "bf16"\ncompile = true\n')
    spec = resolve(load_recipe(student)).teachers["big"]
    assert (spec.recipe.path.name, spec.precision, spec.compile) == ("teacher.toml", "bf16", True)


def test_a_checkpoint_teacher_takes_the_normalization_and_size_its_weights_were_trained_with(write_recipe):
    """Foreign weights (ImageNet statistics, 48 px) on 32 px data with the data's own statistics."""
    declared = ["teachers.conv.mean=[0.485, 0.456, 0.406]", "teachers.conv.std=[0.229, 0.224, 0.225]",
                "teachers.conv.input_size=48"]
    built = kdkit.build(write_recipe(TWO_TEACHER_RECIPE), declared, allow_random_teachers=True)
    conv, other = built.teachers["conv"], built.teachers["other"]
    assert conv.mean_kd.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406]) and conv.input_size == 48
    assert conv.std_kd.flatten().tolist() == pytest.approx([0.229, 0.224, 0.225])
    data = built.parts.splits
    assert other.mean_kd.flatten().tolist() == pytest.approx(data.mean) and other.input_size is None  # the default
