"""Every spec file the project ships validates, and every one is described in specs/README.md.

A spec under specs/ that no longer parses (a key renamed in the schema, a defense parameter removed) would
only be found by the user who runs it; this checks them all through the real CLI (`check --no-data`: the
datasets of the paper specs are not on a test machine).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from robmia_db.cli import main

SPECS = Path(__file__).resolve().parents[1] / "specs"
SHIPPED = sorted(SPECS.rglob("*.toml"))


def test_the_project_ships_specs():
    assert len(SHIPPED) >= 10, SHIPPED


@pytest.mark.parametrize("spec", SHIPPED, ids=lambda p: str(p.relative_to(SPECS)))
def test_shipped_spec_validates(spec):
    result = CliRunner().invoke(main, ["check", "--no-data", str(spec)])
    assert result.exit_code == 0, result.output
    assert f"{spec}: ok (" in result.output


@pytest.mark.parametrize("spec", SHIPPED, ids=lambda p: str(p.relative_to(SPECS)))
def test_shipped_spec_is_described_in_specs_readme(spec):
    readme = (SPECS / "README.md").read_text()
    assert spec.name in readme, f"{spec.relative_to(SPECS)} is not described in specs/README.md"
