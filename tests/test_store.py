"""The store: pinned schema and views, signals equal to an independent recomputation, ingest guarantees.

Recomputation: the checkpoint is reloaded, the digits are read straight from scikit-learn, PGD is written
again here (20 sign steps of 2.5 * eps / 20, no random start, projection then clipping), and every
signal column is rebuilt from its textbook formula (scipy entropy, torch cross-entropy in float64, the
modified entropy of Song & Mittal 2021 written out).
"""

from __future__ import annotations

import json

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from conftest import TrainedStore, use_one_torch_thread
from schema_v3 import V3_MIGRATIONS

from robmia_db.errors import StoreError
from robmia_db.store import ingest
from robmia_db.store.connection import connect, reading, writing
from robmia_db.store.query import format_result, run_query
from robmia_db.store.schema import PUBLIC_VIEWS, SCHEMA_VERSION
from robmia_db.store.signals import signal_table, signals_from_logits, signals_from_probs
from robmia_db.store.tables import Model

TS = "TIMESTAMP WITH TIME ZONE"
# The public contract. A change here must be deliberate (and documented in the README).
EXPECTED_COLUMNS: dict[str, list[tuple[str, str]]] = {
    "v_models": [
        ("model_key", "VARCHAR"), ("model_name", "VARCHAR"), ("experiment", "VARCHAR"), ("dataset", "VARCHAR"),
        ("arch", "VARCHAR"), ("width", "DOUBLE"), ("defense", "VARCHAR"), ("eps", "DOUBLE"), ("seed", "INTEGER"),
        ("model_index", "INTEGER"), ("status", "VARCHAR"), ("error", "VARCHAR"), ("origin", "VARCHAR"),
        ("membership_scheme", "VARCHAR"), ("n_members", "INTEGER"), ("n_nonmembers", "INTEGER"),
        ("n_classes", "INTEGER"), ("train_acc", "DOUBLE"), ("test_acc", "DOUBLE"), ("adv_train_acc", "DOUBLE"),
        ("adv_test_acc", "DOUBLE"), ("adv_eps", "DOUBLE"), ("verified_train_acc", "DOUBLE"),
        ("verified_test_acc", "DOUBLE"), ("verified_eps", "DOUBLE"), ("n_perturbations", "BIGINT"),
        ("train_seconds", "DOUBLE"), ("started_at", TS), ("finished_at", TS), ("device", "VARCHAR"),
        ("git_commit", "VARCHAR"), ("git_dirty", "BOOLEAN"), ("host", "VARCHAR"), ("checkpoint", "VARCHAR"),
        ("dataset_checksum", "VARCHAR"), ("config", "JSON"), ("package_versions", "JSON"),
        ("spec_path", "VARCHAR"), ("spec_text", "VARCHAR"),
    ],
    "v_signals": [
        ("model_key", "VARCHAR"), ("model_name", "VARCHAR"), ("example_id", "INTEGER"), ("label", "INTEGER"),
        ("is_member", "BOOLEAN"), ("perturbation", "VARCHAR"), ("kind", "VARCHAR"), ("eps", "DOUBLE"),
        ("signal_key", "VARCHAR"), ("loss", "DOUBLE"), ("confidence", "FLOAT"), ("margin", "DOUBLE"),
        ("entropy", "DOUBLE"), ("mentropy", "DOUBLE"), ("is_correct", "BOOLEAN"), ("probs", "FLOAT[]"),
        ("confidence_logit", "DOUBLE"),
    ],
    "v_perturbations": [
        ("signal_key", "VARCHAR"), ("model_key", "VARCHAR"), ("model_name", "VARCHAR"), ("perturbation", "VARCHAR"),
        ("kind", "VARCHAR"), ("eps", "DOUBLE"), ("settings", "JSON"), ("n_rows", "INTEGER"),
        ("member_acc", "DOUBLE"), ("nonmember_acc", "DOUBLE"), ("seconds", "DOUBLE"), ("created_at", TS),
    ],
    "v_membership": [
        ("model_key", "VARCHAR"), ("model_name", "VARCHAR"), ("example_id", "INTEGER"), ("is_member", "BOOLEAN"),
        ("label", "INTEGER"), ("origin_split", "VARCHAR"),
    ],
    "v_experiments": [
        ("experiment", "VARCHAR"), ("description", "VARCHAR"), ("spec_path", "VARCHAR"), ("spec_text", "VARCHAR"),
        ("updated_at", TS), ("n_models", "BIGINT"),
    ],
    "v_scores": [
        ("model_key", "VARCHAR"), ("model_name", "VARCHAR"), ("attack", "VARCHAR"), ("perturbation", "VARCHAR"),
        ("example_id", "INTEGER"), ("is_member", "BOOLEAN"), ("score", "DOUBLE"), ("attack_key", "VARCHAR"),
    ],
    "v_metrics": [
        ("model_key", "VARCHAR"), ("model_name", "VARCHAR"), ("experiment", "VARCHAR"), ("dataset", "VARCHAR"),
        ("defense", "VARCHAR"), ("eps", "DOUBLE"), ("seed", "INTEGER"), ("attack", "VARCHAR"),
        ("attack_title", "VARCHAR"), ("attack_language", "VARCHAR"), ("perturbation", "VARCHAR"), ("kind", "VARCHAR"),
        ("perturbation_eps", "DOUBLE"), ("balanced_accuracy", "DOUBLE"), ("auc", "DOUBLE"),
        ("tpr_at_fpr_0", "DOUBLE"), ("tpr_at_fpr_1e4", "DOUBLE"), ("tpr_at_fpr_1e3", "DOUBLE"),
        ("tpr_at_fpr_1e2", "DOUBLE"), ("low_fpr_note", "VARCHAR"),
        ("advantage", "DOUBLE"), ("threshold", "DOUBLE"), ("n_members", "INTEGER"), ("n_nonmembers", "INTEGER"),
        ("n_nonfinite", "INTEGER"), ("decision_threshold", "DOUBLE"), ("decision_accuracy", "DOUBLE"),
        ("decision_tpr", "DOUBLE"), ("decision_fpr", "DOUBLE"),
        ("calibrated_accuracy", "DOUBLE"), ("calibrated_threshold", "DOUBLE"), ("calibration_note", "VARCHAR"),
        ("n_reference_models", "INTEGER"),
        ("tp_at_best", "BIGINT"), ("fp_at_best", "BIGINT"), ("auc_numerator2", "HUGEINT"),
        ("attack_key", "VARCHAR"), ("inputs_key", "VARCHAR"), ("seconds", "DOUBLE"), ("created_at", TS),
        # issue 10: bootstrap intervals
        ("balanced_accuracy_ci_low", "DOUBLE"), ("balanced_accuracy_ci_high", "DOUBLE"),
        ("auc_ci_low", "DOUBLE"), ("auc_ci_high", "DOUBLE"),
        ("tpr_at_fpr_0_ci_low", "DOUBLE"), ("tpr_at_fpr_0_ci_high", "DOUBLE"),
        ("tpr_at_fpr_1e3_ci_low", "DOUBLE"), ("tpr_at_fpr_1e3_ci_high", "DOUBLE"),
        ("tpr_at_fpr_1e2_ci_low", "DOUBLE"), ("tpr_at_fpr_1e2_ci_high", "DOUBLE"), ("ci_resamples", "INTEGER"),
    ],
    "v_fleet_metrics": [
        ("attack", "VARCHAR"), ("attack_title", "VARCHAR"), ("perturbation", "VARCHAR"), ("kind", "VARCHAR"),
        ("dataset", "VARCHAR"), ("arch", "VARCHAR"), ("defense", "VARCHAR"), ("eps", "DOUBLE"),
        ("membership_scheme", "VARCHAR"), ("n_targets", "INTEGER"), ("balanced_accuracy", "DOUBLE"),
        ("auc", "DOUBLE"), ("tpr_at_fpr_0", "DOUBLE"), ("tpr_at_fpr_1e4", "DOUBLE"), ("tpr_at_fpr_1e3", "DOUBLE"),
        ("tpr_at_fpr_1e2", "DOUBLE"), ("low_fpr_note", "VARCHAR"), ("advantage", "DOUBLE"), ("threshold", "DOUBLE"),
        ("n_members", "BIGINT"), ("n_nonmembers", "BIGINT"), ("decision_threshold", "DOUBLE"),
        ("decision_accuracy", "DOUBLE"), ("decision_tpr", "DOUBLE"), ("decision_fpr", "DOUBLE"),
        ("recipe_key", "VARCHAR"), ("attack_key", "VARCHAR"), ("created_at", TS),
    ],
    "v_attack_skips": [
        ("model_key", "VARCHAR"), ("model_name", "VARCHAR"), ("attack", "VARCHAR"), ("perturbation", "VARCHAR"),
        ("reason", "VARCHAR"), ("created_at", TS),
    ],
    "v_attacks": [
        ("attack_key", "VARCHAR"), ("attack", "VARCHAR"), ("base_attack", "VARCHAR"), ("title", "VARCHAR"),
        ("paper", "VARCHAR"), ("description", "VARCHAR"), ("language", "VARCHAR"), ("trust", "VARCHAR"),
        ("origin", "VARCHAR"), ("source_path", "VARCHAR"), ("params", "JSON"), ("needs", "JSON"),
        ("decision_threshold", "DOUBLE"), ("nonfinite", "VARCHAR"), ("created_at", TS),
    ],
    "v_configurations": [
        ("experiment", "VARCHAR"), ("dataset", "VARCHAR"), ("arch", "VARCHAR"), ("width", "DOUBLE"),
        ("defense", "VARCHAR"), ("eps", "DOUBLE"), ("attack", "VARCHAR"), ("perturbation", "VARCHAR"),
        ("kind", "VARCHAR"), ("perturbation_eps", "DOUBLE"), ("n_models", "BIGINT"), ("n_seeds", "BIGINT"),
        ("seeds", "INTEGER[]"),
        ("balanced_accuracy_mean", "DOUBLE"), ("balanced_accuracy_sd", "DOUBLE"),
        ("balanced_accuracy_ci_low", "DOUBLE"), ("balanced_accuracy_ci_high", "DOUBLE"),
        ("auc_mean", "DOUBLE"), ("auc_sd", "DOUBLE"), ("auc_ci_low", "DOUBLE"), ("auc_ci_high", "DOUBLE"),
        ("tpr_at_fpr_1e2_mean", "DOUBLE"), ("tpr_at_fpr_1e2_sd", "DOUBLE"),
        ("tpr_at_fpr_1e2_ci_low", "DOUBLE"), ("tpr_at_fpr_1e2_ci_high", "DOUBLE"),
    ],
    "signals": [
        ("signal_key", "VARCHAR"), ("model_key", "VARCHAR"), ("example_id", "INTEGER"), ("label", "INTEGER"),
        ("is_member", "BOOLEAN"), ("loss", "DOUBLE"), ("confidence", "FLOAT"), ("margin", "DOUBLE"),
        ("entropy", "DOUBLE"), ("mentropy", "DOUBLE"), ("is_correct", "BOOLEAN"), ("probs", "FLOAT[]"),
        ("confidence_logit", "DOUBLE"),
    ],
}  # fmt: skip


def columns_of(con: duckdb.DuckDBPyConnection, name: str) -> list[tuple[str, str]]:
    return con.execute(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ? ORDER BY ordinal_position",
        [name],
    ).fetchall()


@pytest.fixture
def empty_store(tmp_path):
    db = tmp_path / "empty.duckdb"
    connect(db, read_only=False, create=True).close()
    return db


def test_public_views_and_signals_table_are_pinned(empty_store):
    assert set(PUBLIC_VIEWS) == set(EXPECTED_COLUMNS) - {"signals"}
    with reading(empty_store) as con:
        for name, expected in EXPECTED_COLUMNS.items():
            assert columns_of(con, name) == expected, name
        assert con.execute("SELECT max(version) FROM schema_version").fetchone()[0] == SCHEMA_VERSION


def test_read_only_open_migrates_an_older_store(tmp_path):
    db = tmp_path / "old.duckdb"
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at TIMESTAMPTZ)")
    con.execute(V3_MIGRATIONS[0])  # a version-1 store, as the code of that time created it
    con.execute("INSERT INTO schema_version VALUES (1, now())")
    con.close()
    assert run_query(db, "SELECT count(*) AS n FROM v_metrics").to_pylist() == [{"n": 0}]
    with reading(db) as con:
        assert con.execute("SELECT max(version) FROM schema_version").fetchone()[0] == SCHEMA_VERSION


def test_a_store_that_already_has_a_later_steps_column_still_migrates(tmp_path):
    """Stores written by a development build between merges (the confidence_logit column there came with an
    earlier version number) migrate instead of failing on "column already exists"."""
    db = tmp_path / "branch.duckdb"
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at TIMESTAMPTZ)")
    con.execute(V3_MIGRATIONS[0])
    con.execute("ALTER TABLE signals ADD COLUMN confidence_logit DOUBLE")
    con.execute("INSERT INTO schema_version VALUES (1, now())")
    con.close()
    with reading(db) as con:
        assert con.execute("SELECT max(version) FROM schema_version").fetchone()[0] == SCHEMA_VERSION
        assert ("confidence_logit", "DOUBLE") in columns_of(con, "signals")


def test_newer_or_foreign_files_are_refused(tmp_path, empty_store):
    with writing(empty_store) as con:
        con.execute("INSERT INTO schema_version VALUES (?, now())", [SCHEMA_VERSION + 1])
    with pytest.raises(StoreError, match="newer than this robmia-db"):
        run_query(empty_store, "SELECT 1")
    foreign = tmp_path / "foreign.duckdb"
    duckdb.connect(str(foreign)).close()
    with pytest.raises(StoreError, match="is not a robmia-db store"):
        run_query(foreign, "SELECT 1")
    text = tmp_path / "notes.duckdb"
    text.write_text("hello\n")
    with pytest.raises(StoreError, match="cannot open"):
        run_query(text, "SELECT 1")
    with pytest.raises(StoreError, match="no store at"):
        run_query(tmp_path / "absent.duckdb", "SELECT 1")


def test_queries_are_read_only(trained_store: TrainedStore):
    before = run_query(trained_store.db, "SELECT count(*) AS n FROM models").to_pylist()
    for statement in (
        "DELETE FROM models",
        "INSERT INTO experiments (name) VALUES ('x')",
        "DROP VIEW v_models",
    ):
        with pytest.raises(StoreError, match="^query failed: .*read-only"):
            run_query(trained_store.db, statement)
    assert run_query(trained_store.db, "SELECT count(*) AS n FROM models").to_pylist() == before
    with pytest.raises(StoreError, match="^query failed: "):
        run_query(trained_store.db, "SELECT no_such_column FROM v_models")


# ------------------------------------------------------------------------------------------- the trained store


def test_store_is_consistent(trained_store: TrainedStore):
    db = trained_store.db
    models = run_query(db, "SELECT * FROM v_models ORDER BY model_name").to_pylist()
    assert [(m["model_name"], m["status"], m["n_perturbations"]) for m in models] == [
        ("tiny/natural-s0", "completed", 2),
        ("tiny/pgd_at-eps0.1-s0", "completed", 2),
    ]
    for m in models:
        assert (m["n_members"], m["n_nonmembers"], m["n_classes"], m["origin"]) == (200, 200, 10, "trained")
        assert m["arch"] == "mlp" and m["dataset"] == "digits" and m["device"] == "cpu"
        assert json.loads(m["config"])["training"]["epochs"] == 30
        assert m["train_seconds"] > 0 and m["finished_at"] >= m["started_at"]
    assert models[0]["eps"] is None and models[1]["eps"] == 0.1
    counts = run_query(
        db,
        """SELECT model_key, signal_key, count(*) AS n, count(DISTINCT example_id) AS d, sum(is_member::INT) AS m
           FROM signals GROUP BY ALL""",
    ).to_pylist()
    assert len(counts) == 4 and all((c["n"], c["d"], c["m"]) == (400, 400, 200) for c in counts)
    # is_member in signals agrees with membership, and membership with labels in `examples`
    mismatches = run_query(
        db,
        """SELECT count(*) AS n FROM v_signals s JOIN v_membership b USING (model_key, example_id)
           WHERE s.is_member != b.is_member OR s.label != b.label""",
    ).to_pylist()
    assert mismatches == [{"n": 0}]
    n_rows = run_query(db, "SELECT DISTINCT n_rows FROM v_perturbations").to_pylist()
    assert n_rows == [{"n_rows": 400}]


def test_membership_is_a_seeded_disjoint_split_with_true_labels(trained_store: TrainedStore):
    from sklearn.datasets import load_digits

    rows = run_query(
        trained_store.db, "SELECT * FROM v_membership ORDER BY model_key, example_id"
    ).to_pylist()
    target = load_digits().target
    by_model: dict[str, dict[bool, set[int]]] = {}
    for r in rows:
        assert r["label"] == target[r["example_id"]] and r["origin_split"] == "train"
        by_model.setdefault(r["model_key"], {True: set(), False: set()})[r["is_member"]].add(r["example_id"])
    splits = list(by_model.values())
    assert len(splits) == 2 and splits[0] == splits[1]  # same split seed, same members for both defenses
    assert len(splits[0][True]) == 200 and len(splits[0][False]) == 200
    assert not splits[0][True] & splits[0][False]


def test_accuracy_columns_equal_the_signals(trained_store: TrainedStore):
    rows = run_query(
        trained_store.db,
        """SELECT m.model_name, m.train_acc, m.test_acc, m.adv_train_acc, m.adv_test_acc, m.adv_eps,
                  avg(s.is_correct::INT) FILTER (WHERE s.perturbation = 'benign' AND s.is_member) AS b_in,
                  avg(s.is_correct::INT) FILTER (WHERE s.perturbation = 'benign' AND NOT s.is_member) AS b_out,
                  avg(s.is_correct::INT) FILTER (WHERE s.perturbation = 'pgd' AND s.is_member) AS a_in,
                  avg(s.is_correct::INT) FILTER (WHERE s.perturbation = 'pgd' AND NOT s.is_member) AS a_out
           FROM v_models m JOIN v_signals s USING (model_key) GROUP BY ALL""",
    ).to_pylist()
    for r in rows:
        assert (r["train_acc"], r["test_acc"], r["adv_train_acc"], r["adv_test_acc"]) == (
            r["b_in"], r["b_out"], r["a_in"], r["a_out"],
        )  # fmt: skip
        assert r["adv_eps"] == 0.1


def test_pgd_lowers_natural_accuracy_and_pgd_at_resists_it(trained_store: TrainedStore):
    rows = run_query(trained_store.db, "SELECT * FROM v_models").to_pylist()
    models = {r["defense"]: r for r in rows}
    natural, robust = models["natural"], models["pgd_at"]
    assert natural["test_acc"] > 0.8  # the model learned something
    assert natural["adv_test_acc"] < natural["test_acc"] - 0.2
    assert natural["adv_train_acc"] < natural["train_acc"] - 0.2
    assert robust["adv_test_acc"] > natural["adv_test_acc"] + 0.1
    assert robust["adv_train_acc"] > natural["adv_train_acc"] + 0.1


def _pgd_reference(model, x, y, eps: float, steps: int = 20):
    """The paper's evaluation PGD, written independently: no random start, sign steps, project, clip."""
    import torch
    import torch.nn.functional as F

    step = 2.5 * eps / steps
    x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y, reduction="sum")
        grad = torch.autograd.grad(loss, x_adv)[0]
        with torch.no_grad():
            x_adv = x_adv + step * torch.sign(grad)
            x_adv = torch.clamp(torch.clamp(x_adv, x - eps, x + eps), 0.0, 1.0)
    return x_adv.detach()


def _reference_columns(logits32: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    import scipy.stats
    import torch
    import torch.nn.functional as F

    rows = np.arange(len(labels))
    # the paper's softmax, float32 throughout (its `softmax_by_row`)
    shifted = logits32 - logits32.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    probs32 = exp / exp.sum(axis=1, keepdims=True)
    z = logits32.astype(np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    py = p[rows, labels]
    others = np.ones_like(p, dtype=bool)
    others[rows, labels] = False
    mentropy = -(1 - py) * np.log(py) - np.where(others, p * np.log(1 - p), 0.0).sum(axis=1)
    return {
        "probs": probs32,
        "probs64": p,
        "confidence": probs32[rows, labels],
        "loss": F.cross_entropy(torch.from_numpy(z), torch.from_numpy(labels), reduction="none").numpy(),
        "margin": z[rows, labels] - np.where(others, z, -np.inf).max(axis=1),
        "entropy": scipy.stats.entropy(p, axis=1),
        "mentropy": mentropy,
        "is_correct": logits32.argmax(axis=1) == labels,
    }


@pytest.mark.parametrize("defense", ["natural", "pgd_at"])
@pytest.mark.parametrize("perturbation", ["benign", "pgd"])
def test_stored_signals_equal_a_recomputation_from_the_checkpoint(
    trained_store: TrainedStore, defense, perturbation
):
    use_one_torch_thread()
    import torch
    from sklearn.datasets import load_digits

    from robmia_db.runner.models import load_checkpoint

    (model_row,) = run_query(
        trained_store.db, "SELECT model_key, checkpoint FROM v_models WHERE defense = $d", {"d": defense}
    ).to_pylist()
    # the path is relative to the store's folder (so a renamed or moved store still finds it)
    model, meta = load_checkpoint(trained_store.db.parent / model_row["checkpoint"])
    assert meta["model_key"] == model_row["model_key"]
    stored = run_query(
        trained_store.db,
        """SELECT * FROM v_signals WHERE model_key = $k AND perturbation = $p
           ORDER BY is_member DESC, example_id""",  # the runner's evaluation order: members, then the rest
        {"k": model_row["model_key"], "p": perturbation},
    )
    digits = load_digits()
    ids = np.asarray(stored["example_id"].to_pylist())
    labels = digits.target[ids].astype(np.int64)
    assert stored["label"].to_pylist() == labels.tolist()
    x = torch.from_numpy((digits.images[ids].astype(np.float32) / np.float32(16))[:, None])
    y = torch.from_numpy(labels)
    if perturbation == "pgd":
        x_adv = _pgd_reference(model, x, y, eps=0.1)
        assert (
            float((x_adv - x).abs().max()) <= 0.1 + 1e-7
            and 0 <= float(x_adv.min()) <= float(x_adv.max()) <= 1
        )
        x = x_adv
    with torch.no_grad():
        logits = model(x).numpy()
    want = _reference_columns(logits, labels)

    probs = np.asarray(stored["probs"].to_pylist(), dtype=np.float32)
    np.testing.assert_array_max_ulp(probs, want["probs"], maxulp=1)
    np.testing.assert_allclose(probs, want["probs64"], rtol=1e-5, atol=1e-12)
    confidence = np.asarray(stored["confidence"].to_pylist(), dtype=np.float32)
    np.testing.assert_array_equal(confidence, probs[np.arange(len(ids)), labels])
    np.testing.assert_array_max_ulp(confidence, want["confidence"], maxulp=1)
    for column in ("loss", "entropy", "mentropy"):
        np.testing.assert_allclose(
            stored[column].to_numpy(), want[column], rtol=1e-9, atol=1e-12, err_msg=column
        )
    np.testing.assert_allclose(stored["margin"].to_numpy(), want["margin"], rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(stored["is_correct"].to_numpy(zero_copy_only=False), want["is_correct"])


# ------------------------------------------------------------------------------------------------- ingest


def _synthetic_table(signal_key: str, model_key: str, n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    logits = rng.normal(size=(n, 10)).astype(np.float32) * 5
    columns = signals_from_logits(logits, labels)
    return signal_table(signal_key, model_key, np.arange(n), labels, np.arange(n) < n // 2, columns)


def _model(key: str) -> Model:
    return Model(model_key=key, model_name=f"x/{key}", experiment="x", origin="trained", dataset="digits")


def test_rewriting_a_perturbation_replaces_its_rows(empty_store):
    membership = pa.table(
        {"example_id": pa.array(np.arange(50, dtype=np.int32)), "is_member": np.arange(50) < 25}
    )
    for seed in (0, 1):
        record = ingest.PerturbationRecord(
            "s1", "m1", "benign", "benign", None, {}, _synthetic_table("s1", "m1", 50, seed)
        )
        with writing(empty_store) as con:
            ingest.write_model(con, _model("m1"), membership if seed == 0 else None, None, [record])
    rows = run_query(
        empty_store, "SELECT count(*) AS n, count(DISTINCT example_id) AS d FROM signals"
    ).to_pylist()
    assert rows == [{"n": 50, "d": 50}]
    expected = _synthetic_table("s1", "m1", 50, seed=1)["loss"].to_pylist()
    stored = run_query(empty_store, "SELECT loss FROM signals ORDER BY example_id")["loss"].to_pylist()
    assert stored == expected
    assert run_query(empty_store, "SELECT count(*) AS n FROM membership").to_pylist() == [{"n": 50}]


def test_a_failing_write_leaves_nothing(empty_store):
    good = ingest.PerturbationRecord(
        "s1", "m1", "benign", "benign", None, {}, _synthetic_table("s1", "m1", 20)
    )
    table = _synthetic_table("s2", "m1", 20)
    ids = np.arange(20, dtype=np.int32)
    ids[5] = 4
    bad_table = table.set_column(table.schema.get_field_index("example_id"), "example_id", pa.array(ids))
    bad = ingest.PerturbationRecord("s2", "m1", "pgd", "adversarial", 0.1, {}, bad_table)
    membership = pa.table(
        {"example_id": pa.array(np.arange(20, dtype=np.int32)), "is_member": np.arange(20) < 10}
    )
    with writing(empty_store) as con, pytest.raises(StoreError, match="repeats example ids"):
        ingest.write_model(con, _model("m1"), membership, None, [good, bad])
    for table_name in ("models", "membership", "perturbations", "signals"):
        assert run_query(empty_store, f"SELECT count(*) AS n FROM {table_name}").to_pylist() == [{"n": 0}]


def test_failed_model_row_never_downgrades_a_completed_one(empty_store):
    membership = pa.table({"example_id": pa.array([0, 1], pa.int32()), "is_member": [True, False]})
    with writing(empty_store) as con:
        ingest.write_model(con, _model("m1"), membership, None, [])
        ingest.write_failed_model(con, _model("m1"))
        failed = _model("m2")
        failed.error = "boom"
        ingest.write_failed_model(con, failed)
    rows = run_query(empty_store, "SELECT model_key, status, error FROM v_models ORDER BY 1").to_pylist()
    assert rows == [
        {"model_key": "m1", "status": "completed", "error": None},
        {"model_key": "m2", "status": "failed", "error": "boom"},
    ]


def test_signal_columns_saturate_like_the_paper_but_stay_finite():
    """Confident rows: float32 confidence ties at 1.0f, while float64 loss and margin keep ranking them."""
    logits = np.array(
        [[20.0, 0.0, 0.0], [30.0, 0.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 0.0]], dtype=np.float32
    )
    labels = np.array([0, 0, 0, 2])
    columns = signals_from_logits(logits, labels)
    assert columns["confidence"][0] == columns["confidence"][1] == np.float32(1.0)
    np.testing.assert_allclose(columns["loss"][0], 2 * np.exp(-20.0), rtol=1e-6)
    assert 0 < columns["loss"][1] < columns["loss"][0]
    np.testing.assert_allclose(columns["margin"], [20.0, 30.0, -3.0, 0.0], rtol=1e-12)
    assert columns["is_correct"].tolist() == [True, True, False, False]  # a tie is not a correct argmax
    np.testing.assert_allclose(columns["entropy"][3], np.log(3), rtol=1e-12)
    np.testing.assert_allclose(columns["mentropy"][3], -(2 / 3) * np.log(1 / 3) - 2 * (1 / 3) * np.log(2 / 3))
    # from stored probabilities (imported outputs), the same columns up to float32 rounding of the input
    from_probs = signals_from_probs(columns["probs"][2:], labels[2:])
    np.testing.assert_allclose(from_probs["loss"], columns["loss"][2:], rtol=1e-6)
    np.testing.assert_allclose(from_probs["entropy"], columns["entropy"][2:], rtol=1e-6)


def test_loss_stays_positive_and_ordered_beyond_float64_saturation_of_the_sum():
    logits = np.array([[30.0, 0.0, 0.0], [40.0, 0.0, 0.0], [60.0, 0.0, 0.0]], dtype=np.float32)
    columns = signals_from_logits(logits, np.array([0, 0, 0]))
    np.testing.assert_allclose(columns["loss"], 2 * np.exp([-30.0, -40.0, -60.0]), rtol=1e-6)


def test_format_result_round_trips(trained_store: TrainedStore):
    import csv
    import io

    table = run_query(trained_store.db, "SELECT model_name, eps, test_acc FROM v_models ORDER BY model_name")
    parsed_json = json.loads(format_result(table, "json"))
    assert parsed_json == table.to_pylist()
    parsed_csv = list(csv.DictReader(io.StringIO(format_result(table, "csv"))))
    assert [r["model_name"] for r in parsed_csv] == ["tiny/natural-s0", "tiny/pgd_at-eps0.1-s0"]
    assert parsed_csv[0]["eps"] == "" and float(parsed_csv[1]["eps"]) == 0.1
    assert [float(r["test_acc"]) for r in parsed_csv] == [r["test_acc"] for r in table.to_pylist()]
    text = format_result(table, "table", max_rows=1).splitlines()
    assert text[0].split() == ["model_name", "eps", "test_acc"]
    assert text[2].split()[:2] == ["tiny/natural-s0", "NULL"] and text[-1] == "(2 rows, first 1 shown)"
