"""Edited specs under the same name, and the same arrays imported under another name, through the real CLI.

An edited spec rerun under its old names trains a second model per changed recipe: each model keeps the
spec text that trained it, `run` warns before training and in its summary, and `models` shows what differs.
"""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
from attack_fixtures import synthetic_outputs
from conftest import DELETE, robmia
from schema_v3 import create_v3_store

from robmia_db.store.connection import connect
from robmia_db.store.schema import SCHEMA_VERSION

# one natural MLP, 5 epochs: well under a second per training on one core
SMALL = {
    "training": {"defenses": ["natural"], "epochs": 5},
    "defense": DELETE,
    "signals": [{"kind": "benign"}],
}


def rows(db: Path, sql: str, params=None) -> list[tuple]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


def test_an_edited_spec_keeps_each_models_text_and_says_what_changed(write_spec, tmp_path: Path):
    db = tmp_path / "store.duckdb"
    spec = write_spec(SMALL)
    first_text = spec.read_text()
    result = robmia("run", str(spec), "--db", str(db))
    assert result.returncode == 0, result.stderr
    [(old_key, stored_text, stored_path)] = rows(db, "SELECT model_key, spec_text, spec_path FROM v_models")
    assert stored_text == first_text and stored_path == str(spec)

    write_spec(
        {**SMALL, "training": {**SMALL["training"], "epochs": 3}, "experiment": {"description": "edited"}}
    )
    second_text = spec.read_text()
    dry = robmia("run", str(spec), "--db", str(db), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "training.epochs 5 -> 3" in dry.stderr
    result = robmia("run", str(spec), "--db", str(db))
    assert result.returncode == 0, result.stderr
    [(new_key,)] = rows(db, "SELECT model_key FROM v_models WHERE model_key != ?", [old_key])
    warning = f"tiny/natural-s0 now names model {new_key}; the stored model {old_key} keeps that name too"
    assert f"warning: {warning}. Differences: training.epochs 5 -> 3" in result.stderr
    assert f"note: {warning}. Differences: training.epochs 5 -> 3" in result.stdout  # and in the summary

    texts = dict(rows(db, "SELECT model_key, spec_text FROM v_models"))
    assert texts == {old_key: first_text, new_key: second_text}
    assert rows(db, "SELECT spec_text, description FROM v_experiments") == [(second_text, "edited")]
    configs = dict(rows(db, "SELECT model_key, config FROM v_models"))
    assert json.loads(configs[old_key])["training"]["epochs"] == 5
    assert json.loads(configs[new_key])["training"]["epochs"] == 3

    listing = robmia("models", "--db", str(db))
    assert listing.returncode == 0, listing.stderr
    assert f"note: tiny/natural-s0 names {old_key} and {new_key}: training.epochs 5 -> 3" in listing.stdout
    as_json = robmia("models", "--db", str(db), "--format", "json")
    assert len(json.loads(as_json.stdout)) == 2 and "training.epochs 5 -> 3" in as_json.stderr

    # a rerun of the unchanged spec warns again (the name is still shared) but trains nothing
    again = robmia("run", str(spec), "--db", str(db))
    assert again.returncode == 0 and "0 to train" in again.stderr and "training.epochs 5 -> 3" in again.stderr


def test_the_same_arrays_under_another_name_are_not_renamed_silently(tmp_path: Path):
    db = tmp_path / "store.duckdb"
    path = tmp_path / "outputs.npz"
    np.savez(path, **synthetic_outputs(3, n=60, n_classes=4).arrays())
    first = robmia("import", str(path), "--format", "npz", "--name", "first", "--db", str(db))
    assert first.returncode == 0 and first.stdout.startswith("imported first ("), first.stdout
    [(key, name)] = rows(db, "SELECT model_key, model_name FROM v_models")
    other = robmia("import", str(path), "--format", "npz", "--name", "second", "--db", str(db))
    assert other.returncode == 0, other.stderr
    assert other.stdout.startswith(f"already stored as first ({key}): the same arrays make the same model")
    assert "nothing imported and not renamed to second" in other.stdout
    assert rows(db, "SELECT model_key, model_name FROM v_models") == [(key, "first")]
    same = robmia("import", str(path), "--format", "npz", "--name", "first", "--db", str(db))
    assert same.returncode == 0 and same.stdout.startswith(f"replaced first ({key})")
    assert rows(db, "SELECT count(*) FROM v_models") == [(1,)]


def test_a_version_3_store_gains_the_spec_columns_and_keeps_every_row(tmp_path: Path):
    db = tmp_path / "v3.duckdb"
    create_v3_store(db)
    con = duckdb.connect(str(db))
    con.execute("INSERT INTO experiments VALUES ('e', 'd', 'e.toml', 'text', now())")
    con.execute(
        "INSERT INTO models (model_key, model_name, experiment, origin, status) VALUES ('k', 'n', 'e', 'trained', 'completed')"
    )
    con.close()
    connect(db, read_only=False).close()
    assert rows(db, "SELECT max(version) FROM schema_version") == [(SCHEMA_VERSION,)]
    # no guess: which version of the experiment's text trained an old model is unknown, so it stays NULL
    assert rows(db, "SELECT model_key, model_name, spec_path, spec_text FROM v_models") == [
        ("k", "n", None, None)
    ]
    assert rows(db, "SELECT experiment, spec_text FROM v_experiments") == [("e", "text")]
