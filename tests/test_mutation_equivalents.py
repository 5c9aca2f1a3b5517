"""``tests/mutation/equivalent.txt`` stays true to the code: each accepted survivor names a source line
that still exists in its module, a cosmic-ray operator, and a reason."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_accepted_equivalent_names_an_existing_line_an_operator_and_a_reason():
    entries = [line for line in (ROOT / "tests" / "mutation" / "equivalent.txt").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert entries
    for entry in entries:
        module, operator, source, why = (part.strip() for part in entry.split(" | ", 3))
        lines = {line.strip() for line in (ROOT / module).read_text().splitlines()}
        assert source in lines, f"{module} no longer has: {source}"
        assert operator.startswith("core/") and why, entry
