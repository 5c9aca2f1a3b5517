"""A factory's typed keyword signature is its recipe schema."""
from __future__ import annotations

from typing import Literal

import pytest

from kdkit._errors import RecipeError
from kdkit._schema import check_table, describe_keys


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
