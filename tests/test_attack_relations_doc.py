"""The README's table of the relations an attack reads matches what a Python attack's `ctx.sql` returns."""

from __future__ import annotations

import json
import re
from pathlib import Path

from conftest import TrainedStore

from robmia_db.store.query import run_query

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()

PROBE = """
import json

ATTACK = {{
    "title": "records what it sees",
    "needs": ["benign", "adversarial"],
    "description": "test probe",
}}


def score(ctx, params):
    seen = {{}}
    for name in ("target", "benign", "adversarial"):
        table = ctx.sql(f"SELECT * FROM {{name}}")
        seen[name] = {{"type": f"{{type(table).__module__}}.{{type(table).__name__}}", "columns": table.column_names}}
    with open({out!r}, "w") as handle:
        json.dump(seen, handle)
    return ctx.sql("SELECT model_key, example_id, -loss AS score FROM target")
"""


def documented_relations() -> dict[str, list[str]]:
    rows = re.findall(r"^  \| (`[^|]+`) \| [^|]+ \| ([^|]+) \|$", README, flags=re.M)
    relations: dict[str, list[str]] = {}
    for names, columns in rows:
        for name in re.findall(r"`(\w+)`", names):
            relations[name] = [c.strip() for c in columns.split(" (")[0].split(",")]
    return relations


def test_python_attack_relations_are_the_documented_arrow_tables(trained_store: TrainedStore, tmp_path: Path):
    from robmia_db.attacks.scoring import score_attacks

    db = trained_store.copy_to(tmp_path / "store")
    out = tmp_path / "seen.json"
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE.format(out=str(out)), encoding="utf-8")
    outcomes = score_attacks(db, attacks=[probe])
    assert sum(o.scored for o in outcomes) > 0, outcomes
    seen = json.loads(out.read_text())
    documented = documented_relations()
    assert set(documented) == {"target", "benign", "adversarial", "verified", "reference"}
    for name in ("target", "benign", "adversarial"):
        assert seen[name]["type"] == "pyarrow.lib.Table"
        assert seen[name]["columns"] == documented["target"], name
    # the code: `target` is v_signals without is_member, `reference` is target_model_key + v_signals
    signals = run_query(db, "SELECT * FROM v_signals LIMIT 0").column_names
    assert documented["target"] == [c for c in signals if c != "is_member"]
    assert documented["reference"] == ["target_model_key", *signals]
