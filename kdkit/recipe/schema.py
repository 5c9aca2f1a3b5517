"""A factory's typed keyword signature is its recipe schema.

``check_table`` checks a recipe table against a factory (or a config dataclass) before anything
is built: unknown keys (with the closest valid names), missing required keys, wrong types, and values
out of range. A number's range is declared beside it, ``Annotated[float, Range(gt=0)]``; every float
must be finite.
"""
from __future__ import annotations

import inspect
import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from kdkit.errors import RecipeError, did_you_mean

# Keys the engine fills in from the rest of the recipe when a factory asks for them.
CONTEXT_KEYS = {
    "student": {"num_classes", "in_chans", "img_size"},
    "teacher": {"num_classes", "in_chans", "img_size"},
    "head": {"in_features", "num_classes"},
    "loss": set(),
    "dataset": {"root", "image_size", "augment", "num_classes"},
    "callback": set(),
    "config": set(),
}
# Kinds whose recipe tables may set a context key themselves (e.g. a student's own img_size).
SETTABLE_CONTEXT = {"student", "teacher", "config"}


@dataclass(frozen=True)
class Range:
    """Bounds on a recipe number, read by the schema check: ``Annotated[int, Range(ge=1, le=4096)]``."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __str__(self) -> str:
        bounds = [(">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt)]
        return ", ".join(f"{op} {bound:g}" if isinstance(bound, float) else f"{op} {bound}"
                         for op, bound in bounds if bound is not None)

    def admits(self, value: float) -> bool:
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))


class OutOfRange(Exception):
    """A value of the right type outside its field's range; ``path`` locates a list item (".1")."""

    def __init__(self, message: str, path: str = ""):
        super().__init__(message)
        self.message, self.path = message, path


def _parameters(factory) -> dict[str, inspect.Parameter]:
    params = inspect.signature(factory).parameters
    return {
        name: p
        for name, p in params.items()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and name != "self"
    }


def _hints(factory) -> dict[str, Any]:
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        return typing.get_type_hints(target, include_extras=True)
    except Exception:  # unresolvable annotations: accept any value rather than refuse the plugin
        return {}


def type_name(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty or annotation is Any:
        return "any"
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return type_name(annotation.__origin__)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(annotation))
    if origin in (list, tuple):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return f"list of {type_name(args[0])}" if args else "list"
    if annotation is type(None):
        return "none"
    return getattr(annotation, "__name__", str(annotation))


def range_of(annotation: Any) -> Range | None:
    """The ``Range`` of an ``Annotated`` number (or of ``Annotated[...] | None``), for listings."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        found = [r for r in map(range_of, typing.get_args(annotation)) if r is not None]
        return found[0] if found else None
    if typing.get_origin(annotation) is Annotated:
        return next((m for m in annotation.__metadata__ if isinstance(m, Range)), None)
    if typing.get_origin(annotation) in (list, tuple):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return range_of(args[0]) if args else None
    return None


def conform(value: Any, annotation: Any) -> tuple[bool, Any]:
    """(matches, value converted to the annotation: int to float, list to tuple).

    Raises ``OutOfRange`` for a value of the right type outside its ``Range``, or a float that is not finite.
    """
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True, value
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        bounds = range_of(annotation)
        try:
            ok, converted = conform(value, annotation.__origin__)
        except OutOfRange as exc:
            if bounds is None or exc.path:
                raise
            raise OutOfRange(f"must be finite and {bounds}, got {value!r}") from None
        if ok and bounds is not None and not bounds.admits(converted):
            raise OutOfRange(f"must be {bounds}, got {converted!r}")
        return ok, converted
    if origin is Literal:
        return value in typing.get_args(annotation), value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(annotation):
            ok, converted = conform(value, arg)
            if ok:
                return True, converted
        return False, value
    if annotation is type(None):
        return value is None, value
    if origin in (list, tuple) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        items = []
        for i, item in enumerate(value):
            try:
                ok, item = conform(item, args[0]) if args else (True, item)
            except OutOfRange as exc:
                raise OutOfRange(exc.message, f".{i}{exc.path}") from None
            if not ok:
                return False, value
            items.append(item)
        return True, (tuple(items) if (origin or annotation) is tuple else items)
    if origin is dict or annotation is dict:
        return isinstance(value, dict), value
    if annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            raise OutOfRange(f"must be a finite number, got {value!r}")
        return ok, float(value) if ok else value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if isinstance(annotation, type):
        return isinstance(value, annotation), value
    return True, value


def check_table(factory, table: dict, *, kind: str, file: object, key: str, core_keys=()) -> dict:
    """Validate ``table`` against ``factory``'s keyword signature; return the converted kwargs. ``core_keys``,
    which kdkit itself reads from the same table, are named among the valid keys of a refusal."""
    params = _parameters(factory)
    hints = _hints(factory)
    context = CONTEXT_KEYS[kind]
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(factory).parameters.values())
    settable = [n for n in params if n not in context or kind in SETTABLE_CONTEXT]
    kwargs = {}
    for name, value in table.items():
        path = f"{key}.{name}" if key else name
        if name not in settable:
            if accepts_any:
                kwargs[name] = value
                continue
            valid = [*settable, *sorted(set(core_keys) - set(settable))]
            raise RecipeError(f"unknown key{did_you_mean(name, valid)}; valid keys: "
                              f"{', '.join(valid) or '(none)'}", file=file, key=path)
        annotation = hints.get(name, params[name].annotation)
        try:
            ok, converted = conform(value, annotation)
        except OutOfRange as exc:
            raise RecipeError(exc.message, file=file, key=path + exc.path) from None
        if not ok:
            raise RecipeError(f"expected {type_name(annotation)}, got {type(value).__name__} {value!r}",
                              file=file, key=path)
        kwargs[name] = converted
    for name, p in params.items():
        if p.default is p.empty and name not in kwargs and name not in context:
            path = f"{key}.{name}" if key else name
            raise RecipeError(f"missing required key ({type_name(hints.get(name, p.annotation))})",
                              file=file, key=path)
    return kwargs


def accepts(factory, name: str) -> bool:
    return name in _parameters(factory)


def describe_keys(factory, kind: str) -> list[dict]:
    """The recipe keys a factory takes: name, type, range (when bounded), and default (absent when required)."""
    hints = _hints(factory)
    rows = []
    for name, p in _parameters(factory).items():
        if name in CONTEXT_KEYS[kind]:
            continue
        annotation = hints.get(name, p.annotation)
        row = {"key": name, "type": type_name(annotation)}
        if range_of(annotation) is not None:
            row["range"] = str(range_of(annotation))
        if p.default is not p.empty:
            row["default"] = p.default if isinstance(p.default, (int, float, str, bool, list, type(None))) else repr(p.default)
        rows.append(row)
    return rows
