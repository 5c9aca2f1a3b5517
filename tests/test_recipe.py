"""Recipe files: extends, overrides as TOML literals, list entries, relative paths, round trip."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdkit.errors import RecipeError
from kdkit.recipe.toml import Recipe, load_recipe, parse_override

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
    assert tomllib.loads(recipe.to_toml()) == recipe.table
    assert recipe.hash() == load_recipe(path).hash()
    assert recipe.hash() != load_recipe(path, ["seed=4"]).hash()


# What a TOML file can hold: any Unicode text but lone surrogates (not encodable), 64-bit integers, every
# float (inf and nan included), arrays (of anything, tables too), nested tables.
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=8)
SCALARS = st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(), TEXT, st.just("lehrerü"))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                      max_leaves=12)


@settings(derandomize=True, deadline=None, max_examples=150)
@given(st.dictionaries(TEXT | st.sampled_from(["teachers", "lehrerü", "ü", "a.b", "a b", ""]), VALUES, max_size=5))
def test_written_recipes_reload_to_the_same_table(table):
    back = tomllib.loads(Recipe(table=table, path=Path("r.toml")).to_toml())
    # JSON with sorted keys is what Recipe.hash() digests; unlike ==, it also holds for nan
    assert json.dumps(back, sort_keys=True) == json.dumps(table, sort_keys=True)


def test_a_unicode_table_key_is_written_quoted():
    table = {"teachers": {"lehrerü": {"plugin": "timm", "model": "test_resnet"}}, "name": "straße"}
    recipe = Recipe(table=table, path=Path("r.toml"))
    assert tomllib.loads(recipe.to_toml()) == table
