"""``tests/mutation/equivalent.txt`` stays true to the code: each accepted survivor names a source line
that still exists in its module, a cosmic-ray operator, and a reason."""
from __future__ import annotations

from mutation.run import ROOT, equivalent_entries


def test_every_accepted_equivalent_names_an_existing_line_an_operator_and_a_reason():
    entries = equivalent_entries()
    assert entries
    for module, operator, source, why in entries:
        lines = {line.strip() for line in (ROOT / module).read_text().splitlines()}
        assert source in lines, f"{module} no longer has: {source}"
        assert operator.startswith("core/") and why, (module, operator, source)
