"""TOML recipes: ``extends`` inheritance, ``-o key.path=value`` overrides, and the resolved text.

mmengine's Config reads no TOML and keeps override values as strings, so this small layer is
kdkit's own (tomllib reads the files, tomli-w writes the resolved text). Tables merge key by key;
arrays (and array-of-tables such as ``[[losses]]``) are replaced whole. Relative paths inside a recipe
(``extends``, ``data.root``, ``teachers.*.checkpoint``) are relative to the file that wrote them.
"""
from __future__ import annotations

import copy
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import tomli_w

from kdkit.errors import RecipeError

DICT_SOURCE = "<recipe dict>"  # what messages name as the file of a recipe given as a dict

# Keys whose string values are file paths, resolved against the recipe that wrote them.
PATH_KEYS = {("data", "root"), ("data", "classes"), ("teachers", "*", "checkpoint"), ("teachers", "*", "recipe"),
             ("teachers", "*", "classes"), ("student", "checkpoint"), ("teacher_cache", "root")}


@dataclass
class Recipe:
    """A resolved recipe: the merged table, the file it came from, and which file set each key."""

    table: dict
    path: Path
    origins: dict[str, str] = field(default_factory=dict)

    def where(self, key: str) -> str:
        """The file (or ``-o``) that set ``key`` or its closest parent; for error messages."""
        parts = key.split(".")
        for n in range(len(parts), 0, -1):
            origin = self.origins.get(".".join(parts[:n]))
            if origin:
                return origin
        return str(self.path)

    def error(self, key: str, message: str) -> RecipeError:
        return RecipeError(message, file=self.where(key), key=key)

    def to_toml(self) -> str:
        """The resolved recipe as TOML text (tomli-w's: any key or string a recipe can hold round-trips)."""
        return tomli_w.dumps(self.table)

    def hash(self) -> str:
        """Stable hash of the resolved recipe, for comparing runs."""
        return hashlib.sha256(json.dumps(self.table, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise RecipeError("recipe file not found", file=path) from None
    except IsADirectoryError:
        raise RecipeError("is a directory, not a recipe file", file=path) from None
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"not valid TOML: {exc}", file=path) from None
    except UnicodeDecodeError as exc:
        raise RecipeError(f"not a text file (a recipe is UTF-8 TOML): {exc.reason} at byte {exc.start}",
                          file=path) from None
    except OSError as exc:
        raise RecipeError(f"cannot read the recipe: {exc.strerror or exc}", file=path) from None


def _absolutize(table: dict, base: Path) -> None:
    """Make recipe-relative paths absolute, in place."""
    for pattern in PATH_KEYS:
        for node, key in _walk(table, pattern):
            value = node.get(key)
            if isinstance(value, str) and value and not value.startswith(("~", "/")):
                node[key] = str((base / value).resolve())
            elif isinstance(value, str) and value.startswith("~"):
                node[key] = str(Path(value).expanduser())


def _walk(table: dict, pattern: tuple):
    """Yield (parent table, key) for every key matching a pattern such as ('teachers', '*', 'checkpoint')."""
    nodes = [table]
    for part in pattern[:-1]:
        nxt = []
        for node in nodes:
            children = node.values() if part == "*" else [node.get(part)]
            nxt.extend(c for c in children if isinstance(c, dict))
        nodes = nxt
    return [(node, pattern[-1]) for node in nodes]


def _merge(base: dict, top: dict, origins: dict, file: str, prefix: str = "") -> dict:
    out = dict(base)
    for key, value in top.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, origins, file, path + ".")
        else:
            out[key] = copy.deepcopy(value)
            _mark(value, path, origins, file)
    return out


def _mark(value: Any, path: str, origins: dict, file: str) -> None:
    origins[path] = file
    if isinstance(value, dict):
        for key, sub in value.items():
            _mark(sub, f"{path}.{key}", origins, file)
    elif isinstance(value, list):
        for i, sub in enumerate(value):
            _mark(sub, f"{path}.{i}", origins, file)


def _load_chain(path: Path, origins: dict, seen: tuple = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise RecipeError(f"'extends' forms a cycle: {' -> '.join(str(p) for p in (*seen, path))}", file=path)
    return _extend(_read(path), path, origins, seen)


def _extend(table: dict, path: Path, origins: dict, seen: tuple = ()) -> dict:
    """``table`` (read from ``path``) merged over the recipe it ``extends``, its paths made absolute."""
    _absolutize(table, path.parent)
    parent = table.pop("extends", None)
    if parent is None:
        base = {}
    elif not isinstance(parent, str):
        raise RecipeError(f"expected a file path string, got {parent!r}", file=path, key="extends")
    else:
        parent_path = Path(parent).expanduser()
        if not parent_path.is_absolute():
            parent_path = path.parent / parent_path
        if not parent_path.is_file():
            raise RecipeError(f"extends a recipe that does not exist: {parent_path}", file=path, key="extends")
        base = _load_chain(parent_path, origins, (*seen, path))
    return _merge(base, table, origins, str(path))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``key.path=value`` with the value read as a TOML literal (bare words are strings)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"override {text!r} is not of the form key.path=value", file="-o")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as -o student.plugin=vit
    parts = key.split(".")
    if any(not p for p in parts):
        raise RecipeError(f"override key {key!r} has an empty part", file="-o")
    return parts, value


def _apply_override(table: dict, parts: list[str], value: Any, origins: dict) -> None:
    node: Any = table
    for depth, part in enumerate(parts[:-1]):
        here = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            node = _list_item(node, part, here)
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise RecipeError(f"cannot set a key inside {type(node).__name__} value", file="-o", key=here)
    last = parts[-1]
    if isinstance(node, list):
        _list_item(node, last, ".".join(parts))
        node[int(last)] = value
    else:
        node[last] = value
    _mark(value, ".".join(parts), origins, "-o")


def _relative_to_cwd(parts: list[str], value: Any) -> Any:
    """Paths given with ``-o`` are relative to the working directory."""
    nested: dict = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        nested = {part: nested}
    _absolutize(nested, Path.cwd())
    for part in parts:
        nested = nested[part]
    return nested


def _list_item(items: list, part: str, key: str):
    if not part.isdigit() or int(part) >= len(items):
        raise RecipeError(f"no list entry {part!r}: the list has {len(items)} entries (0..{len(items) - 1})",
                          file="-o", key=key)
    return items[int(part)]


def load_recipe(source: str | Path | dict, overrides: list[str] | tuple = ()) -> Recipe:
    """Read a recipe with its ``extends`` chain, then apply the overrides in order. ``source`` is a file,
    or a recipe table as a dict (from a notebook), whose relative paths and ``extends`` are relative to
    the working directory and whose ``name`` defaults to "recipe"."""
    origins: dict[str, str] = {}
    if isinstance(source, dict):
        path = Path.cwd() / DICT_SOURCE
        table = _extend(_plain_table(source), path, origins)
    else:
        path = Path(source).expanduser()
        table = _load_chain(path, origins)
    for text in overrides:
        parts, value = parse_override(text)
        _apply_override(table, parts, _relative_to_cwd(parts, value), origins)
    table.setdefault("name", "recipe" if isinstance(source, dict) else path.stem)
    return Recipe(table=table, path=path.resolve(), origins=origins)


def _plain_table(source: dict) -> dict:
    """A copy of a recipe dict holding only what a TOML file can (so that the run's recipe.toml can be written)."""
    try:
        return tomllib.loads(tomli_w.dumps(source))
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"not a TOML table: {exc}", file=DICT_SOURCE) from None


def diff_tables(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every leaf that differs (a missing side shows as ``(unset)``)."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    unset = "(unset)"
    return [f"{key}: {_shown(flat_old[key]) if key in flat_old else unset} -> "
            f"{_shown(flat_new[key]) if key in flat_new else unset}"
            for key in sorted(flat_old.keys() | flat_new.keys()) if flat_old.get(key, unset) != flat_new.get(key, unset)]


def _shown(value: Any) -> str:
    """A leaf value in a message (JSON reads like the TOML literal for strings, numbers, booleans, arrays)."""
    return json.dumps(value, ensure_ascii=False, default=str)


def _is_table_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        items = value.items()
    elif _is_table_list(value):
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return {prefix: value}
    out = {}
    for key, sub in items:
        out.update(_flatten(sub, f"{prefix}.{key}" if prefix else str(key)))
    return out
