"""The numpy path of the metrics (what `score` writes) against the SQL one (what views and `sql` run): the same
numbers bit for bit, on tie-heavy groups, NaN / NULL / infinite scores and empty groups; and `score` writing
the same per-model and pooled (fleet) metrics through either path, on a real imported fleet."""

from __future__ import annotations

import shutil
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from attack_fixtures import import_synthetic, imported_population_outputs, query
from sklearn.metrics import roc_auc_score
from test_metrics import _grouped_dataset

from robmia_db.attacks import results
from robmia_db.attacks.metrics import (
    METRIC_COLUMNS,
    compute_metrics,
    compute_metrics_table,
    decision_counts_table,
    reference_metrics,
)
from robmia_db.attacks.scoring import score_attacks
from robmia_db.attacks.staging import labelled_scores

torch.set_num_threads(1)


def _sql(table: pa.Table, groups: list[str]) -> pa.Table:
    con = duckdb.connect()
    try:
        con.register("source", table)
        return compute_metrics(con, "source", groups)
    finally:
        con.close()


def _assert_identical(table: pa.Table, groups: list[str]) -> list[dict]:
    expected, got = _sql(table, groups), compute_metrics_table(table, groups)
    assert got.schema == expected.schema
    # == on Python floats: bit-identical values (no tolerance), NULLs in the same places
    assert got.to_pylist() == expected.to_pylist()
    return got.to_pylist()


def test_numpy_metrics_equal_sql_on_tie_heavy_groups():
    data = _grouped_dataset(seed=20190101)
    table = pa.table({k: data[k] for k in ("model", "attack", "score", "is_member")})
    rows = _assert_identical(table, ["model", "attack"])
    assert len(rows) == 6 and {r["attack"] for r in rows} >= {"saturated", "constant", "reversed"}
    assert _assert_identical(table, []) and _assert_identical(table, ["attack"])
    for row in rows:  # and against independent references: numpy's sort-based metrics, scikit-learn's AUC
        mask = data["model"] == row["model"]
        expected = reference_metrics(data["score"][mask], data["is_member"][mask])
        for column in METRIC_COLUMNS:
            if expected[column] is None:
                assert row[column] is None, column
            else:
                assert row[column] == pytest.approx(expected[column], abs=1e-12, rel=0), column
        if row["auc"] is not None:
            auc = roc_auc_score(data["is_member"][mask], data["score"][mask])
            assert row["auc"] == pytest.approx(auc, abs=1e-12)


@pytest.mark.parametrize("seed", range(12))
def test_numpy_metrics_equal_sql_with_nan_null_infinite_scores(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 2500))
    scores = np.round(rng.normal(size=n), int(rng.integers(0, 3)))
    scores[rng.random(n) < 0.05] = np.nan
    scores[rng.random(n) < 0.03] = -np.inf
    scores[rng.random(n) < 0.03] = np.inf
    table = pa.table(
        {
            "model": rng.integers(0, 6, n).astype(str),
            "part": rng.integers(0, 3, n),
            "score": pa.array(scores, mask=rng.random(n) < 0.03),
            "is_member": pa.array(rng.random(n) < rng.random(), mask=rng.random(n) < 0.03),
        }
    )
    for groups in (["model", "part"], ["part"], []):
        _assert_identical(table, groups)


def test_numpy_metrics_of_degenerate_groups():
    # one group all NaN, one without non-members, one of a single member and a single non-member
    table = pa.table(
        {
            "g": ["nan", "nan", "members", "members", "pair", "pair"],
            "score": [np.nan, np.nan, 0.3, 0.2, 1.0, 1.0],
            "is_member": [True, False, True, True, True, False],
        }
    )
    rows = {r["g"]: r for r in _assert_identical(table, ["g"])}
    assert rows["nan"]["n_members"] == 0 and rows["nan"]["auc"] is None
    assert rows["members"]["n_members"] == 2 and rows["members"]["balanced_accuracy"] is None
    assert rows["pair"]["auc"] == 0.5 and rows["pair"]["balanced_accuracy"] == 0.5
    assert _assert_identical(table.slice(0, 0), ["g"]) == []
    [empty] = _assert_identical(table.slice(0, 0), [])  # no groups: one row, as the SQL
    assert empty["n_members"] == 0 and empty["auc"] is None


@pytest.mark.parametrize("threshold", [0.0, 0.25, -np.inf])
def test_decision_counts_equal_sql_and_plain_counting(threshold):
    rng = np.random.default_rng(3)
    n = 3000
    scores = np.round(rng.normal(size=n), 1)
    scores[rng.random(n) < 0.05] = np.nan
    score_null, member_null = rng.random(n) < 0.03, rng.random(n) < 0.03
    members = rng.random(n) < 0.5
    groups = rng.integers(0, 4, n).astype(str)
    table = pa.table(
        {
            "g": groups,
            "score": pa.array(scores, mask=score_null),
            "is_member": pa.array(members, mask=member_null),
        }
    )
    con = duckdb.connect()
    con.register("source", table)
    sql = results._DECISION_SQL.format(groups="g", source="source") + " ORDER BY g"
    expected = con.sql(sql, params={"threshold": threshold}).to_arrow_table()
    got = decision_counts_table(table, ["g"], threshold)
    assert got.schema == expected.schema and got.to_pylist() == expected.to_pylist()
    for row in got.to_pylist():  # DuckDB orders NaN above every number: NaN >= t; NULL >= t is not true
        mine = (groups == row["g"]) & ~member_null
        above = ~score_null & (np.isnan(scores) | (scores >= threshold))
        assert row["d_p"] == int((mine & members).sum()) and row["d_n"] == int((mine & ~members).sum())
        assert row["d_tp"] == int((mine & members & above).sum())
        assert row["d_fp"] == int((mine & ~members & above).sum())


@pytest.fixture(scope="module")
def fleet_store(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("numpy_fleet")
    db = folder / "fleet.duckdb"
    import_synthetic(db, folder / "npz", imported_population_outputs(23, n_models=5), dataset="shared")
    return db


def _stored(db: Path) -> dict[str, list[tuple]]:
    return {
        "metrics": [
            tuple(r.values())
            for r in query(db, "SELECT * EXCLUDE (seconds, created_at) FROM metrics ORDER BY ALL")
        ],
        "fleet_metrics": [
            tuple(r.values())
            for r in query(db, "SELECT * EXCLUDE (created_at) FROM fleet_metrics ORDER BY ALL")
        ],
    }


def test_score_writes_the_same_metrics_through_numpy_and_sql(fleet_store, tmp_path, monkeypatch):
    """Pooled metrics from the run's rows in memory (plus the fleet's other stored rows when one model is
    re-scored) equal those of the SQL over the store, which `score` uses past FLEET_ROWS_IN_MEMORY."""
    attacks = ["confidence", "lira_online", "rmia_offline"]
    fast, slow = (shutil.copy2(fleet_store, tmp_path / f"{n}.duckdb") for n in ("fast", "slow"))
    score_attacks(fast, attacks, resamples=0, calibration_models=0)
    monkeypatch.setattr(results, "FLEET_ROWS_IN_MEMORY", 0)
    score_attacks(slow, attacks, resamples=0, calibration_models=0)
    expected = _stored(slow)
    assert len(expected["fleet_metrics"]) == 3 * 2 and len(expected["metrics"]) == 3 * 5 * 2
    assert _stored(fast) == expected
    # re-score one model: its fleet's pooled metrics also read the 4 other targets' stored scores
    [key] = query(fast, "SELECT min(model_key) AS k FROM metrics")[0].values()
    monkeypatch.setattr(results, "FLEET_ROWS_IN_MEMORY", 10_000_000)
    score_attacks(fast, attacks, force=True, models=[key], resamples=0, calibration_models=0)
    monkeypatch.setattr(results, "FLEET_ROWS_IN_MEMORY", 0)
    score_attacks(slow, attacks, force=True, models=[key], resamples=0, calibration_models=0)
    assert _stored(fast) == _stored(slow)
    assert {r["n_targets"] for r in query(fast, "SELECT n_targets FROM fleet_metrics")} == {5}


def test_labels_joined_in_memory_equal_the_sql_join(tmp_path):
    """`labelled_scores` of batches in memory (a sorted lookup) and of staged files (SQL) give the same rows:
    a score without a membership row is dropped, a duplicated membership row repeats its score (SQL's join;
    the lookup leaves that case to SQL)."""
    con = duckdb.connect(str(tmp_path / "m.duckdb"))
    con.execute("CREATE TABLE membership (model_key VARCHAR, example_id INTEGER, is_member BOOLEAN)")
    rng = np.random.default_rng(4)
    models = ["b", "a", "c'x"]
    rows = [(m, int(i), bool(rng.random() < 0.5)) for m in models for i in range(-5, 300)]
    con.executemany("INSERT INTO membership VALUES (?, ?, ?)", rows[::-1])
    ids = np.r_[np.arange(-5, 300), 999]  # 999: no membership row
    scores = pa.table(
        {
            "model_key": np.repeat(models, len(ids)),
            "example_id": pa.array(np.tile(ids, len(models)), pa.int32()),
            "score": rng.normal(size=len(ids) * len(models)),
            "perturbation": np.full(len(ids) * len(models), "benign"),
        }
    )
    pq.write_table(scores, tmp_path / "staged.parquet")

    def rows_of(table: pa.Table) -> list[tuple]:
        return sorted(tuple(r.values()) for r in table.to_pylist())

    def both() -> tuple[pa.Table, pa.Table]:
        files = labelled_scores(con, f"read_parquet('{tmp_path / 'staged.parquet'}')", models)
        return labelled_scores(con, scores, models), files

    in_memory, files = both()
    assert in_memory.schema == files.schema
    assert in_memory.column_names == ["model_key", "perturbation", "example_id", "score", "is_member"]
    assert rows_of(in_memory) == rows_of(files) and in_memory.num_rows == 3 * 305
    expected = {(m, i): b for m, i, b in rows}
    assert all(r["is_member"] == expected[(r["model_key"], r["example_id"])] for r in in_memory.to_pylist())
    con.execute("INSERT INTO membership VALUES ('a', 7, true)")  # a duplicate pair
    in_memory, files = both()
    assert rows_of(in_memory) == rows_of(files) and in_memory.num_rows == 3 * 305 + 1
