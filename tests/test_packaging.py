"""What pyproject.toml asks for is what kdkit needs."""
from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def test_timm_is_required_at_a_version_with_what_kdkit_imports():
    """timm.task (1.0.24) took only model names; DistillationTeacher wraps a module from 1.0.25 on."""
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    [timm] = [d for d in project["dependencies"] if d.startswith("timm")]
    assert timm.replace(" ", "") == "timm>=1.0.25"


def test_the_command_line_says_its_version_and_offers_completion(cli):
    import kdkit

    version = cli("--version")
    assert version.exit_code == 0 and version.output == f"kdkit {kdkit.__version__}\n"
    assert "--install-completion" in cli("--help").output
