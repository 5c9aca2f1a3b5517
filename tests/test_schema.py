"""A factory's typed keyword signature is its recipe schema."""
from __future__ import annotations

from typing import Annotated, Literal

import pytest

from kdkit.errors import RecipeError
from kdkit.recipe.schema import Range, check_table, describe_keys


def factory(*, depth: int, width: float = 1.0, name: str = "a", tokens: list[str] = ["cls"],
            kind: Literal["learned", "stem"] = "learned", limit: int | None = None, num_classes: int = 0):
    """A factory with one key of every supported type."""


def check(table):
    return check_table(factory, table, kind="student", file="r.toml", key="student")


def test_valid_table_is_converted():
    kwargs = check({"depth": 2, "width": 2, "tokens": ["cls", "conv"], "kind": "stem", "limit": None})
    assert kwargs == {"depth": 2, "width": 2.0, "tokens": ["cls", "conv"], "kind": "stem", "limit": None}
    assert isinstance(kwargs["width"], float)


@pytest.mark.parametrize("table, message", [
    ({"depht": 2}, r"r.toml: student.depht: unknown key \(did you mean: depth\?\)"),
    ({}, r"student.depth: missing required key \(int\)"),
    ({"depth": "2"}, r"student.depth: expected int, got str '2'"),
    ({"depth": True}, r"student.depth: expected int, got bool True"),
    ({"depth": 2, "tokens": ["cls", 3]}, r"student.tokens: expected list of str"),
    ({"depth": 2, "kind": "both"}, r"student.kind: expected 'learned' \| 'stem', got str 'both'"),
    ({"depth": 2, "limit": 1.5}, r"student.limit: expected int \| none"),
])
def test_bad_tables(table, message):
    with pytest.raises(RecipeError, match=message):
        check(table)


def test_context_keys_are_hidden_from_the_description():
    keys = {row["key"]: row for row in describe_keys(factory, "student")}
    assert "num_classes" not in keys
    assert keys["depth"] == {"key": "depth", "type": "int"}
    assert keys["kind"]["default"] == "learned"


def bounded(*, tau: Annotated[float, Range(gt=0)] = 1.0, scale: list[Annotated[float, Range(gt=0, le=1)]] = [1.0],
            depth: Annotated[int, Range(ge=1, le=64)] | None = None, free: float = 0.0):
    """A factory whose numbers declare ranges."""


@pytest.mark.parametrize("table, message", [
    ({"tau": 0}, "r.toml: loss.tau: must be > 0, got 0.0"),
    ({"tau": float("nan")}, "r.toml: loss.tau: must be finite and > 0, got nan"),
    ({"free": float("-inf")}, "r.toml: loss.free: must be a finite number, got -inf"),
    ({"scale": [0.5, 1.5]}, "r.toml: loss.scale.1: must be > 0, <= 1, got 1.5"),
    ({"depth": 65}, "r.toml: loss.depth: must be >= 1, <= 64, got 65"),
    ({"depth": 2.0}, "r.toml: loss.depth: expected int | none, got float 2.0"),
])
def test_values_out_of_range(table, message):
    with pytest.raises(RecipeError) as raised:
        check_table(bounded, table, kind="loss", file="r.toml", key="loss")
    assert str(raised.value) == message


def test_ranges_are_described():
    keys = {row["key"]: row for row in describe_keys(bounded, "loss")}
    assert keys["tau"] == {"key": "tau", "type": "float", "range": "> 0", "default": 1.0}
    assert keys["scale"]["range"] == "> 0, <= 1" and keys["depth"]["range"] == ">= 1, <= 64"
    assert "range" not in keys["free"]
    assert check_table(bounded, {"depth": None, "scale": [0.25]}, kind="loss", file="", key="loss") == \
        {"depth": None, "scale": [0.25]}
