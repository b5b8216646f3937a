"""The metadata tables declared once in SQLModel: pinned DDL, migrations from real v3 stores, typed rows.

The v3 store is built from the DDL text of commit 134d271 (tests/schema_v3.py) and filled with the rows of a
real trained and scored store, copied column by column, so the migration meets what older stores hold.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from conftest import TrainedStore, clean_env
from schema_v3 import V3_MIGRATIONS, create_v3_store

from robmia_db import open_store
from robmia_db.attacks.scoring import score_attacks
from robmia_db.errors import StoreError
from robmia_db.store import ingest, tables
from robmia_db.store.connection import connect
from robmia_db.store.schema import SCHEMA_VERSION

GOLDEN = Path(__file__).parent / "golden" / "declared_tables.sql"
V3_TABLES = ("experiments", "models", "examples", "membership", "perturbations", "signals", "attacks",
             "scores", "metrics", "attack_skips")  # fmt: skip


def layout(db: Path) -> dict[str, list[tuple]]:
    """Every table's columns in order: name, type, nullability."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        found: dict[str, list[tuple]] = {}
        for table, column, kind, nullable in con.execute(
            "SELECT table_name, column_name, data_type, is_nullable FROM information_schema.columns c "
            "JOIN information_schema.tables t USING (table_catalog, table_schema, table_name) "
            "WHERE t.table_type = 'BASE TABLE' ORDER BY table_name, ordinal_position"
        ).fetchall():
            found.setdefault(table, []).append((column, kind, nullable))
        return found
    finally:
        con.close()


def test_the_declared_ddl_is_pinned_and_avoids_the_duckdb_pitfalls():
    ddl = tables.declared_ddl()
    assert ddl == GOLDEN.read_text(), (
        "the declared tables changed: add fields at the end, add a step to schema.MIGRATIONS, then update "
        "tests/golden/declared_tables.sql from robmia_db.store.tables.declared_ddl()"
    )
    assert "SERIAL" not in ddl and "REAL" not in ddl and " FLOAT" not in ddl
    for cls in tables.DECLARED:
        for name, field in cls.model_fields.items():
            definition = tables.column_sql(cls, name)
            annotation = str(field.annotation)
            if "float" in annotation:
                assert "DOUBLE PRECISION" in definition, (cls.__name__, name)
            if "datetime" in annotation:
                assert "TIMESTAMP WITH TIME ZONE" in definition, (cls.__name__, name)
            if "dict" in annotation or ("list" in annotation and name != "input_shape"):
                assert " JSON" in definition, (cls.__name__, name)
    assert not hasattr(ingest, "ModelRecord")  # the dataclass that repeated the models DDL is gone


@pytest.fixture(scope="module")
def v3_store(trained_store: TrainedStore, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(v3 store, source store): the trained store scored with `loss`, its rows copied into a v3 store."""
    folder = tmp_path_factory.mktemp("v3")
    source = trained_store.copy_to(folder / "source")
    score_attacks(source, ["loss"])
    db = folder / "v3.duckdb"
    create_v3_store(db)
    con = duckdb.connect(str(db))
    try:
        con.execute(f"ATTACH '{source}' AS src (READ_ONLY)")
        for table in V3_TABLES:
            names = [r[0] for r in con.execute(f"SELECT column_name FROM (DESCRIBE main.{table})").fetchall()]
            columns = ", ".join(names)
            con.execute(f"INSERT INTO main.{table} ({columns}) SELECT {columns} FROM src.{table}")
        con.execute("DETACH src")
    finally:
        con.close()
    return db, source


def _v3_rows(db: Path, invalidated: bool = False) -> dict[str, list[tuple]]:
    """Every v3 column's rows; `invalidated`: metrics' cache keys carry step 8's 'pre-v8:' mark, taken off."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        rows = {}
        for table in V3_TABLES:
            names = [r[0] for r in con.execute(f"SELECT column_name FROM (DESCRIBE {table})").fetchall()]
            v3_names = [n for n in names if n in _V3_COLUMNS[table]]
            if invalidated and table == "metrics":
                marked = con.execute("SELECT bool_and(starts_with(inputs_key, 'pre-v8:')) FROM metrics")
                assert marked.fetchall() == [(True,)]  # every stored metric is re-scored by the next `score`
                v3_names = [
                    "substr(inputs_key, 8) AS inputs_key" if n == "inputs_key" else n for n in v3_names
                ]
            rows[table] = sorted(
                con.execute(f"SELECT {', '.join(v3_names)} FROM {table}").fetchall(), key=repr
            )
        return rows
    finally:
        con.close()


def _v3_columns() -> dict[str, list[str]]:
    con = duckdb.connect()
    for sql in V3_MIGRATIONS:
        con.execute(sql)
    columns = {
        t: [r[0] for r in con.execute(f"SELECT column_name FROM (DESCRIBE {t})").fetchall()]
        for t in V3_TABLES
    }
    con.close()
    return columns


_V3_COLUMNS = _v3_columns()


def test_a_v3_store_migrates_with_every_row_and_the_layout_of_a_new_store(v3_store, tmp_path: Path):
    db, source = v3_store
    work = tmp_path / "v3.duckdb"
    work.write_bytes(db.read_bytes())
    before = _v3_rows(work)
    assert all(before[t] for t in V3_TABLES if t != "attack_skips"), {t: len(r) for t, r in before.items()}
    connect(work, read_only=False).close()
    # every row of every table, every value, unchanged (but step 8's deliberate cache invalidation)
    assert _v3_rows(work, invalidated=True) == before
    fresh = tmp_path / "fresh.duckdb"
    connect(fresh, read_only=False, create=True).close()
    migrated, new = layout(work), layout(fresh)
    assert migrated.keys() == new.keys()
    for table in new:
        assert migrated[table] == new[table], table  # same columns, types, order and nullability
    con = duckdb.connect(str(work), read_only=True)
    try:
        assert con.execute("SELECT max(version) FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        assert con.execute("SELECT count(*) FROM v_models WHERE spec_text IS NOT NULL").fetchall() == [(0,)]
        # the views read the migrated rows as they read the original store's
        for view in ("v_metrics", "v_models", "v_signals"):
            count = con.execute(f"SELECT count(*) FROM {view}").fetchall()[0][0]
            assert (
                count
                == duckdb.connect(str(source), read_only=True)
                .execute(f"SELECT count(*) FROM {view}")
                .fetchall()[0][0]
            )
    finally:
        con.close()


def test_a_stored_column_of_another_type_is_refused_not_retyped(tmp_path: Path):
    db = tmp_path / "odd.duckdb"
    create_v3_store(db)
    con = duckdb.connect(str(db))
    con.execute("ALTER TABLE metrics ALTER COLUMN auc TYPE FLOAT")
    con.close()
    with pytest.raises(StoreError, match="column auc is FLOAT in the store but declared DOUBLE"):
        connect(db, read_only=False).close()
    con = duckdb.connect(str(db), read_only=True)  # the failed migration left the store as it was
    assert con.execute("SELECT max(version) FROM schema_version").fetchall() == [(3,)]
    assert "metric_intervals" not in {r[0] for r in con.execute("SHOW TABLES").fetchall()}
    con.close()


def test_the_python_api_returns_typed_rows(v3_store):
    _, source = v3_store
    store = open_store(source)
    models = store.models()
    assert models and all(isinstance(m, tables.Model) for m in models)
    con = duckdb.connect(str(source), read_only=True)
    try:
        expected = con.execute(
            "SELECT model_key, model_name, width, eps, n_members, config, started_at, spec_text FROM models "
            "ORDER BY experiment, model_name, model_key"
        ).fetchall()
        attack_names = sorted(r[0] for r in con.execute("SELECT name FROM attacks").fetchall())
        n_perturbations = con.execute("SELECT count(*) FROM perturbations").fetchall()[0][0]
    finally:
        con.close()
    for model, row in zip(models, expected, strict=True):
        assert (model.model_key, model.model_name, model.width, model.eps, model.n_members) == row[:5]
        assert model.config == json.loads(row[5]) and model.config["training"]["epochs"] == 30
        assert model.started_at == row[6] and model.started_at.tzinfo is not None
        assert model.spec_text == row[7] and "[training]" in model.spec_text
    assert [m.model_name for m in store.models(experiment="tiny")] == [m.model_name for m in models]
    assert store.models(experiment="nope") == []
    assert [e.name for e in store.experiments()] == ["tiny"]
    assert sorted(a.name for a in store.attacks()) == attack_names
    perturbations = store.perturbations()
    assert len(perturbations) == n_perturbations and all(isinstance(p.settings, dict) for p in perturbations)
    assert {p.model_key for p in store.perturbations(models[0].model_key)} == {models[0].model_key}


def test_reading_a_current_store_never_imports_sqlmodel(v3_store):
    _, source = v3_store
    code = (
        "import sys; from robmia_db.store.query import run_query; "
        f"run_query({str(source)!r}, 'SELECT count(*) FROM v_metrics'); "
        "assert 'sqlmodel' not in sys.modules and 'sqlalchemy' not in sys.modules"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(), timeout=60
    )
    assert result.returncode == 0, result.stderr
