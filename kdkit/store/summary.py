"""``summary.json``: one typed record of a run, written by the run and read by ``compare``, ``eval`` and the
progress display through the same type.

``Summary.from_json`` checks what it reads (every value's type) and fills in what a run made by an
earlier kdkit did not record, saying so in ``notes`` (which ``compare`` shows) rather than falling
back silently.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import kdkit
from kdkit.errors import KdkitError

SCHEMA = 1  # the "schema" of summary.json; runs made before it (kdkit 0.1.0) have none


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _scores(value) -> bool:
    """Top-1 per head or teacher."""
    return isinstance(value, dict) and all(is_number(v) for v in value.values())


@dataclass
class Summary:
    """What a run reports: its identity and status, its top-1s, its cost, and where it came from.

    ``top1`` is the last epoch's on the validation set per head, ``eval`` (the recipe's prediction) and
    ``heads_mean``; ``test_top1`` the final student's on the test split; ``best_*`` the epoch a held-out
    split chose (``best_selected_on``). ``notes`` is not written: it says what an older run lacked.
    """

    name: str
    seed: int
    status: str = "running"
    epochs: int = 0
    top1: dict = field(default_factory=dict)
    best_top1: float | None = None
    best_epoch: int | None = None
    test_top1: dict = field(default_factory=dict)
    best_test_top1: float | None = None
    teacher_top1: dict = field(default_factory=dict)
    train_images_per_s: float | None = None
    infer_images_per_s: float | None = None
    wall_s: float = 0.0
    stopped_early: bool = False
    stop_reason: str | None = None
    world_size: int = 1
    best_selected_on: str = "test"
    params: int | None = None
    flops: int | None = None
    flops_unsupported: dict = field(default_factory=dict)
    teacher_hashes: dict = field(default_factory=dict)
    teacher_models: dict = field(default_factory=dict)  # each teacher's network, in a few words
    teacher_cache: dict | None = None
    kdkit_version: str = kdkit.__version__
    git_commit: str | None = None
    torch_version: str | None = None
    timm_version: str | None = None
    recipe_hash: str | None = None
    schema: int = SCHEMA
    notes: list[str] = field(default_factory=list, compare=False)

    CHECKS = {"name": lambda v: isinstance(v, str), "seed": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "status": lambda v: isinstance(v, str), "top1": _scores,
              "teacher_models": lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()), "test_top1": _scores, "teacher_top1": _scores,
              **{key: lambda v: v is None or is_number(v) for key in (
                  "best_top1", "best_test_top1", "params", "flops", "train_images_per_s", "infer_images_per_s",
                  "wall_s")}}

    def update(self, **values) -> None:
        """Set these fields (only fields the summary has)."""
        for key, value in values.items():
            if key not in self.__dataclass_fields__:
                raise AttributeError(f"a run's summary has no field {key!r}")
            setattr(self, key, value)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        del out["notes"]
        return out

    def __getitem__(self, key: str):
        """Read access by key, as callbacks written against the summary dict of kdkit 0.1 do."""
        if key not in self.__dataclass_fields__ or key == "notes":
            raise KeyError(key)
        return getattr(self, key)

    @classmethod
    def from_json(cls, data: dict, source) -> Summary:
        """A summary read from ``source`` (a file, for messages): its types checked, what an older kdkit did
        not record filled in with a note; a foreign one is a KdkitError naming ``source``."""
        again = "run it again (kdkit run --force) or leave it out"
        wrong = [f"{key} = {json.dumps(data[key])[:40]}" for key, ok in cls.CHECKS.items()
                 if key in data and not ok(data[key])]
        if wrong:
            raise KdkitError(f"{source}: not a kdkit summary (wrong type: {'; '.join(wrong)}); {again}")
        missing = [key for key in ("name", "seed", "status", "top1") if key not in data]
        if missing:
            raise KdkitError(f"{source}: not a kdkit summary (no {', '.join(missing)}); {again}")
        known = {key: value for key, value in data.items() if key in cls.__dataclass_fields__ and key != "notes"}
        summary = cls(**{"kdkit_version": None, "schema": 0, **known})
        made_by = f"made by kdkit {summary.kdkit_version}"
        if "test_top1" not in data:
            summary.test_top1 = summary.top1
            summary.notes.append(f"{made_by}, before test_top1: its top1, evaluated on the test split, stands in")
        return summary
