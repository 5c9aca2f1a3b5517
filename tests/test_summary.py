"""summary.json as one type: written whole, read back equal, checked, and an older run's gaps named."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kdkit import api
from kdkit.errors import KdkitError
from kdkit.store.summary import SCHEMA, Summary

LEGACY = Path(__file__).parent / "fixtures" / "legacy_run"  # summary.json of kdkit 0.1.0, before "schema"


def test_a_summary_round_trips_and_an_old_one_reads_with_what_it_lacks_named(tmp_path, cli):
    legacy = json.loads((LEGACY / "summary.json").read_text())
    summary = Summary.from_json(legacy, "legacy")
    assert (summary.schema, summary.notes, summary.kdkit_version) == (0, [], "0.1.0")
    assert Summary.from_json(summary.to_json(), "again") == summary and "notes" not in summary.to_json()
    assert Summary(name="x", seed=1).schema == SCHEMA and api.Summary is Summary

    older = shutil.copytree(LEGACY, tmp_path / "older")
    del legacy["test_top1"]  # a run made before test_top1 existed: its top1 was on the test split
    (older / "summary.json").write_text(json.dumps(legacy))
    read = Summary.from_json(legacy, older / "summary.json")
    assert read.test_top1 == read.top1
    assert read.notes == ["made by kdkit 0.1.0, before test_top1: its top1, evaluated on the test split, stands in"]
    compared = cli("compare", older)
    assert compared.exit_code == 0 and "before test_top1: its top1" in compared.output, compared.output


@pytest.mark.parametrize("change, message", [
    ({"seed": "0"}, "wrong type: seed = \"0\""), ({"top1": {"eval": "high"}}, "wrong type: top1 = "),
    ({"name": None}, "wrong type: name = null"), ({"status": None, "name": None}, "wrong type: name = null; status")])
def test_a_summary_of_the_wrong_types_is_refused_naming_the_file(change, message):
    data = {**json.loads((LEGACY / "summary.json").read_text()), **change}
    with pytest.raises(KdkitError, match=f"^here: not a kdkit summary \\({message}"):
        Summary.from_json(data, "here")
    with pytest.raises(KdkitError, match=r"^here: not a kdkit summary \(no seed, top1\)"):
        Summary.from_json({"name": "x", "status": "completed"}, "here")


def test_fields_are_set_by_name_only():
    summary = Summary(name="x", seed=0)
    summary.update(epochs=3, top1={"eval": 50.0})
    assert summary["epochs"] == 3 and summary.top1 == {"eval": 50.0}
    with pytest.raises(AttributeError, match="no field 'epoch'"):
        summary.update(epoch=3)
    with pytest.raises(KeyError):
        summary["notes"]
