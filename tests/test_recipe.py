"""Recipe files: extends, overrides as TOML literals, list entries, relative paths, round trip."""
from __future__ import annotations

import sys

import pytest

from kdkit._errors import RecipeError
from kdkit._recipe import dumps_toml, load_recipe, parse_override

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def test_extends_merges_tables_and_replaces_arrays(write_recipe, tmp_path):
    (tmp_path / "sub").mkdir()
    write_recipe("""
        seed = 1
        [data]
        root = "data"
        image_size = 32
        [teacher_cache]
        root = "outputs"
        [[losses]]
        plugin = "ce"
        head = "cls"
        [[losses]]
        plugin = "kl"
        head = "conv"
        """, "base.toml")
    child = write_recipe("""
        extends = "../base.toml"
        [data]
        image_size = 64
        [[losses]]
        plugin = "ce"
        head = "pool"
        """, "sub/child.toml")
    recipe = load_recipe(child)
    assert recipe.table["seed"] == 1
    assert recipe.table["data"] == {"root": str(tmp_path / "data"), "image_size": 64}
    assert recipe.table["teacher_cache"] == {"root": str(tmp_path / "outputs")}
    assert recipe.table["losses"] == [{"plugin": "ce", "head": "pool"}]
    assert recipe.table["name"] == "child"
    assert recipe.where("data.root") == str(tmp_path / "base.toml")
    assert recipe.where("data.image_size") == str(child)


def test_overrides_are_toml_literals(write_recipe):
    path = write_recipe("""
        [train]
        epochs = 300
        [[losses]]
        plugin = "ce"
        head = "cls"
        """)
    recipe = load_recipe(path, ["train.epochs=5", 'eval.heads=["cls", "conv"]', "losses.0.weight=0.5",
                                "student.plugin=vit", "train.lr=1e-3", "augment.repeated_aug=true"])
    t = recipe.table
    assert t["train"] == {"epochs": 5, "lr": 1e-3}
    assert t["eval"]["heads"] == ["cls", "conv"]
    assert t["losses"][0]["weight"] == 0.5
    assert t["student"]["plugin"] == "vit"
    assert t["augment"]["repeated_aug"] is True
    assert recipe.where("train.epochs") == "-o"


def test_override_paths_are_relative_to_cwd(write_recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(write_recipe("seed = 0\n"), ["data.root=mydata"])
    assert recipe.table["data"]["root"] == str(tmp_path / "mydata")


@pytest.mark.parametrize("text, message", [
    ("novalue", "not of the form key.path=value"),
    ("=3", "not of the form"),
    ("a..b=1", "empty part"),
])
def test_bad_override_syntax(text, message):
    with pytest.raises(RecipeError, match=message):
        parse_override(text)


def test_override_list_index_out_of_range(write_recipe):
    path = write_recipe('[[losses]]\nplugin = "ce"\nhead = "cls"\n')
    with pytest.raises(RecipeError, match=r"no list entry '3': the list has 1 entries"):
        load_recipe(path, ["losses.3.weight=1.0"])


def test_extends_cycle_and_missing_parent(write_recipe):
    write_recipe('extends = "b.toml"\n', "a.toml")
    b = write_recipe('extends = "a.toml"\n', "b.toml")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(b)
    orphan = write_recipe('extends = "nowhere.toml"\n', "orphan.toml")
    with pytest.raises(RecipeError, match="extends a recipe that does not exist"):
        load_recipe(orphan)


def test_invalid_toml_names_the_file(write_recipe):
    path = write_recipe("[train\nepochs = 1\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(path) in str(info.value) and "not valid TOML" in str(info.value)


def test_resolved_recipe_round_trips(write_recipe):
    path = write_recipe("""
        name = "x"
        seed = 3
        [data]
        image_size = 32
        [teachers.conv]
        plugin = "timm"
        model = "resnet18"
        [[losses]]
        plugin = "kl"
        head = "conv"
        teachers = ["conv"]
        [eval]
        heads = ["cls", "conv"]
        """)
    recipe = load_recipe(path)
    assert tomllib.loads(dumps_toml(recipe.table)) == recipe.table
    assert recipe.hash() == load_recipe(path).hash()
    assert recipe.hash() != load_recipe(path, ["seed=4"]).hash()
