"""Tests of the metrics module: SQL (DuckDB) against a numpy reference, scikit-learn and the paper's loop."""

from __future__ import annotations

import math

import duckdb
import numpy as np
import pyarrow as pa
import pytest
import torch
from attack_fixtures import paper_inference_loop
from sklearn.metrics import roc_auc_score, roc_curve

from robmia_db.attacks.metrics import (
    METRIC_COLUMNS,
    calibrated_balanced_accuracy,
    compute_metrics,
    compute_metrics_arrays,
    low_fpr_note,
    metrics_sql,
    paper_inference_accuracy,
    reference_metrics,
    roc_points,
)
from robmia_db.errors import StoreError

torch.set_num_threads(1)

INTEGER_COLUMNS = ("n_members", "n_nonmembers", "tp_at_best", "fp_at_best", "auc_numerator2")
FLOAT_COLUMNS = tuple(c for c in METRIC_COLUMNS if c not in INTEGER_COLUMNS)


def _float32_saturated_scores(rng: np.random.Generator, is_member: np.ndarray) -> np.ndarray:
    """True-label confidences as a float32 softmax gives them: many exactly 1.0f, heavy ties near 1."""
    x = rng.gamma(np.where(is_member, 4.0, 3.5), 3.5)
    return (1.0 - np.exp(-x)).astype(np.float32).astype(np.float64)


def _grouped_dataset(seed: int) -> dict[str, np.ndarray]:
    """Several groups at once, each with a different tie structure and size."""
    rng = np.random.default_rng(seed)
    parts = []
    kinds = ("continuous", "rounded", "saturated", "tiny", "constant", "reversed")
    for group_index, kind in enumerate(kinds):
        size = 7 if kind == "tiny" else int(rng.integers(300, 1500))
        is_member = rng.random(size) < 0.6
        if kind == "continuous":
            scores = rng.normal(size=size) + 0.4 * is_member
        elif kind == "rounded":
            scores = np.round(rng.normal(size=size) + 0.5 * is_member, 1)
        elif kind == "saturated":
            scores = _float32_saturated_scores(rng, is_member)
        elif kind == "tiny":
            scores = rng.integers(0, 3, size).astype(np.float64)
            is_member = np.array([True, False, True, False, True, False, True])
        elif kind == "constant":
            scores = np.full(size, 0.25)
        else:
            scores = rng.normal(size=size) - 1.5 * is_member
        parts.append(
            {
                "model": np.full(size, group_index, dtype=np.int64),
                "attack": np.full(size, kind),
                "score": scores,
                "is_member": is_member,
            }
        )
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _assert_rows_match(sql_row: dict, reference: dict) -> None:
    for column in INTEGER_COLUMNS:
        assert sql_row[column] == reference[column], column
    for column in FLOAT_COLUMNS:
        if reference[column] is None:
            assert sql_row[column] is None, column
        else:
            assert sql_row[column] == pytest.approx(reference[column], abs=1e-12, rel=0), column


@pytest.fixture(scope="module")
def grouped() -> dict[str, np.ndarray]:
    return _grouped_dataset(seed=20190101)


@pytest.fixture(scope="module")
def grouped_sql_rows(grouped: dict[str, np.ndarray]) -> list[dict]:
    table = compute_metrics_arrays(
        grouped["score"],
        grouped["is_member"],
        groups={"model": grouped["model"], "attack": grouped["attack"]},
    )
    assert table.column_names == ["model", "attack", *METRIC_COLUMNS]
    return table.to_pylist()


def _group_arrays(grouped: dict[str, np.ndarray], model: int) -> tuple[np.ndarray, np.ndarray]:
    mask = grouped["model"] == model
    return grouped["score"][mask], grouped["is_member"][mask]


def test_sql_equals_numpy_reference_on_every_group(grouped, grouped_sql_rows):
    assert [row["model"] for row in grouped_sql_rows] == list(range(6))
    for row in grouped_sql_rows:
        scores, is_member = _group_arrays(grouped, row["model"])
        _assert_rows_match(row, reference_metrics(scores, is_member))


def test_ties_are_really_present(grouped):
    scores, _ = _group_arrays(grouped, 2)
    assert np.mean(scores == 1.0) > 0.1
    assert np.unique(scores).size < 0.8 * scores.size


def test_auc_and_balanced_accuracy_match_sklearn(grouped, grouped_sql_rows):
    for row in grouped_sql_rows:
        scores, is_member = _group_arrays(grouped, row["model"])
        if row["attack"] == "constant":
            assert row["auc"] == 0.5
        assert row["auc"] == pytest.approx(roc_auc_score(is_member, scores), abs=1e-12, rel=0)
        fpr, tpr, _ = roc_curve(is_member, scores)
        expected = max(0.5, float(np.max(0.5 * (tpr + 1.0 - fpr))))
        assert row["balanced_accuracy"] == pytest.approx(expected, abs=1e-12, rel=0)
        assert row["advantage"] == pytest.approx(2 * row["balanced_accuracy"] - 1, abs=1e-12, rel=0)


@pytest.mark.parametrize("drop_intermediate", [True, False])
def test_tpr_at_fixed_fpr_matches_sklearn_roc_curve(grouped, grouped_sql_rows, drop_intermediate):
    levels = {"tpr_at_fpr_0": 0.0, "tpr_at_fpr_1e4": 1e-4, "tpr_at_fpr_1e3": 1e-3, "tpr_at_fpr_1e2": 1e-2}
    checked_nonzero = checked_null = 0
    for row in grouped_sql_rows:
        scores, is_member = _group_arrays(grouped, row["model"])
        fpr, tpr, _ = roc_curve(is_member, scores, drop_intermediate=drop_intermediate)
        n_nonmembers = int((~is_member).sum())
        for column, level in levels.items():
            if level and level * n_nonmembers < 1:
                # not one false positive allowed: the level cannot be told apart from FPR 0
                assert row[column] is None, (row["attack"], column)
                checked_null += 1
                continue
            expected = float(tpr[fpr <= level].max())
            assert row[column] == pytest.approx(expected, abs=1e-12, rel=0), (row["attack"], column)
            checked_nonzero += expected > 0
    assert checked_nonzero >= 3 and checked_null >= 6


def test_tpr_at_low_fpr_resolvable_with_many_nonmembers_matches_sklearn():
    """20,000 non-members resolve 0.01% (two false positives allowed); 9,999 do not (NULL, with the reason)."""
    rng = np.random.default_rng(11)
    for n_nonmembers, resolvable in ((20_000, True), (9_999, False)):
        is_member = np.r_[np.ones(3000, bool), np.zeros(n_nonmembers, bool)]
        scores = rng.normal(size=is_member.size) + 1.2 * is_member
        row = compute_metrics_arrays(scores, is_member).to_pylist()[0]
        fpr, tpr, _ = roc_curve(is_member, scores)
        for column, level in (("tpr_at_fpr_1e4", 1e-4), ("tpr_at_fpr_1e3", 1e-3)):
            if column == "tpr_at_fpr_1e4" and not resolvable:
                assert row[column] is None
                assert reference_metrics(scores, is_member)[column] is None
                assert (
                    low_fpr_note(n_nonmembers) == "9,999 non-members cannot resolve FPR 0.01% (needs 10,000)"
                )
            else:
                assert row[column] == pytest.approx(float(tpr[fpr <= level].max()), abs=1e-12, rel=0)
                assert row[column] > 0
        if resolvable:
            assert low_fpr_note(n_nonmembers) is None


def test_paper_accuracy_equals_sql_on_every_group(grouped, grouped_sql_rows):
    for row in grouped_sql_rows:
        scores, is_member = _group_arrays(grouped, row["model"])
        paper = paper_inference_accuracy(scores[is_member], scores[~is_member])
        assert row["balanced_accuracy"] == pytest.approx(paper, abs=1e-12, rel=0)


def test_random_data_sweep_against_reference():
    rng = np.random.default_rng(7)
    models, per_model = 12, 400
    model = np.repeat(np.arange(models), per_model)
    is_member = rng.random(model.size) < rng.uniform(0.05, 0.95, models)[model]
    distinct_values = rng.integers(2, 60, models)[model]
    scores = np.floor(rng.random(model.size) * distinct_values + 0.7 * is_member) / distinct_values
    rows = compute_metrics_arrays(scores, is_member, groups={"model": model}).to_pylist()
    for row in rows:
        mask = model == row["model"]
        _assert_rows_match(row, reference_metrics(scores[mask], is_member[mask]))


def test_threshold_rule_on_hand_made_example():
    # t=5: tp 2/4, fp 0/4 -> 0.75; t=4: 2/4, 2/4 -> 0.5; t=3: 4/4, 2/4 -> 0.75; t=1: 4/4, 4/4 -> 0.5.
    # Two thresholds tie at 0.75; the rule keeps the largest (5), not the paper loop's first hit (3).
    members = [5.0, 5.0, 3.0, 3.0]
    nonmembers = [4.0, 4.0, 1.0, 1.0]
    scores = np.array(members + nonmembers)
    is_member = np.array([True] * 4 + [False] * 4)
    row = compute_metrics_arrays(scores, is_member).to_pylist()[0]
    assert row["balanced_accuracy"] == 0.75
    assert row["threshold"] == 5.0
    assert (row["tp_at_best"], row["fp_at_best"]) == (2, 0)
    assert row["advantage"] == 0.5
    # Pairs (member, non-member): 5>4 x4, 5>1 x4, 3<4 x4, 3>1 x4 -> 12 wins of 16.
    assert row["auc_numerator2"] == 24
    assert row["auc"] == 0.75
    assert row["tpr_at_fpr_0"] == 0.5
    assert reference_metrics(scores, is_member)["threshold"] == 5.0
    assert paper_inference_accuracy(members, nonmembers) == 0.75


def test_ties_between_member_and_nonmember_count_half():
    # Pairs: 2>1 win, 2>0 win, 1=1 tie, 1>0 win -> 2*3 + 1 = 7 of 2*4.
    scores = np.array([2.0, 1.0, 1.0, 0.0])
    is_member = np.array([True, True, False, False])
    row = compute_metrics_arrays(scores, is_member).to_pylist()[0]
    assert row["auc_numerator2"] == 7
    assert row["auc"] == 7 / 8
    # t=2: 0.5*(1/2 + 1 - 0) = 0.75; t=1 counts the tied non-member too: 0.5*(1 + 1 - 1/2) = 0.75.
    assert row["balanced_accuracy"] == 0.75
    assert row["threshold"] == 2.0


def test_sign_convention_member_iff_score_at_least_threshold():
    scores = np.array([0.9, 0.1])
    is_member = np.array([True, False])
    row = compute_metrics_arrays(scores, is_member).to_pylist()[0]
    # The threshold is a member's own score: that member counts as predicted (>=, not >).
    assert row["threshold"] == 0.9
    assert (row["tp_at_best"], row["fp_at_best"]) == (1, 0)
    assert row["balanced_accuracy"] == 1.0
    assert row["auc"] == 1.0
    flipped = compute_metrics_arrays(-scores, is_member).to_pylist()[0]
    assert flipped["auc"] == 0.0
    assert flipped["balanced_accuracy"] == 0.5


def test_floor_when_nonmembers_score_higher():
    rng = np.random.default_rng(3)
    is_member = rng.random(500) < 0.5
    scores = rng.random(500) - 2.0 * is_member
    row = compute_metrics_arrays(scores, is_member).to_pylist()[0]
    assert row["balanced_accuracy"] == 0.5
    assert row["advantage"] == 0.0
    assert row["threshold"] is None
    assert (row["tp_at_best"], row["fp_at_best"]) == (0, 0)
    assert row["auc"] == 0.0
    assert row["tpr_at_fpr_1e2"] == 0.0
    assert paper_inference_accuracy(scores[is_member], scores[~is_member]) == 0.5
    _assert_rows_match(row, reference_metrics(scores, is_member))


def test_null_nan_and_unknown_membership_are_excluded():
    con = duckdb.connect(":memory:")
    con.execute(
        "CREATE TABLE signal AS SELECT * FROM (VALUES "
        "('a', 0.9, true), ('a', 0.4, true), ('a', 0.7, false), ('a', 0.1, false), "
        "('a', NULL, true), ('a', 'nan'::DOUBLE, false), ('a', 0.95, NULL), "
        "('only_null', NULL, true), ('only_null', NULL, false)) AS t(model, score, is_member)"
    )
    rows = {row["model"]: row for row in compute_metrics(con, "signal", ["model"]).to_pylist()}
    clean = reference_metrics(np.array([0.9, 0.4, 0.7, 0.1]), np.array([True, True, False, False]))
    _assert_rows_match(rows["a"], clean)
    assert (rows["a"]["n_members"], rows["a"]["n_nonmembers"]) == (2, 2)
    # 0.95 belongs only to a row of unknown membership: it must not become a candidate threshold.
    assert rows["a"]["threshold"] == 0.9
    only_null = rows["only_null"]
    assert (only_null["n_members"], only_null["n_nonmembers"]) == (0, 0)
    assert all(only_null[c] is None for c in METRIC_COLUMNS if c not in ("n_members", "n_nonmembers"))
    nan_in_reference = reference_metrics(
        np.array([0.9, 0.4, 0.7, 0.1, np.nan]), np.array([1, 1, 0, 0, 1], bool)
    )
    assert nan_in_reference == clean


def test_group_without_nonmembers_has_only_counts():
    scores = np.array([0.3, 0.6, 0.8, 0.9, 0.5])
    is_member = np.array([True, True, True, True, False])
    groups = {"model": np.array(["all_members"] * 3 + ["mixed"] * 2)}
    rows = {r["model"]: r for r in compute_metrics_arrays(scores, is_member, groups=groups).to_pylist()}
    lonely = rows["all_members"]
    assert (lonely["n_members"], lonely["n_nonmembers"]) == (3, 0)
    assert all(lonely[c] is None for c in METRIC_COLUMNS if c not in ("n_members", "n_nonmembers"))
    reference = reference_metrics(scores[:3], is_member[:3])
    assert {c: lonely[c] for c in METRIC_COLUMNS} == reference
    assert rows["mixed"]["balanced_accuracy"] == 1.0
    assert math.isnan(calibrated_balanced_accuracy(0.5, scores[:3], is_member[:3]))


def _softmax_by_row_float32(logits: np.ndarray) -> np.ndarray:
    """The paper's `softmax_by_row(logits, T=1)`: max-subtracted, all in float32."""
    shifted = logits - np.max(logits, axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / np.sum(exp, axis=1, keepdims=True)


def test_golden_format_float32_softmax_matches_paper_loop():
    rng = np.random.default_rng(1900514)
    classes, n_train, n_test = 38, 380, 103
    outputs = {}
    for split, size, margin in (("train", n_train, 16.0), ("test", n_test, 12.0)):
        labels = rng.integers(0, classes, size)
        logits = rng.normal(scale=3.0, size=(size, classes)).astype(np.float32)
        logits[np.arange(size), labels] += rng.gamma(2.0, margin / 2.0, size).astype(np.float32)
        probs = _softmax_by_row_float32(logits)
        assert probs.dtype == np.float32
        outputs[split] = probs[np.arange(size), labels]
    members, nonmembers = outputs["train"], outputs["test"]
    assert np.mean(members == 1.0) > 0.2 and np.mean(nonmembers == 1.0) > 0.05

    expected = paper_inference_loop(members, nonmembers)
    assert paper_inference_accuracy(members, nonmembers) == expected

    scores = np.concatenate([members, nonmembers]).astype(np.float64)
    is_member = np.r_[np.ones(n_train, bool), np.zeros(n_test, bool)]
    row = compute_metrics_arrays(scores, is_member).to_pylist()[0]
    assert row["balanced_accuracy"] == pytest.approx(expected, abs=1e-12, rel=0)
    assert reference_metrics(scores, is_member)["balanced_accuracy"] == pytest.approx(
        expected, abs=1e-12, rel=0
    )
    # The threshold is an observed float32 confidence, carried exactly through DOUBLE.
    assert np.float32(row["threshold"]) == row["threshold"]


def test_calibrated_threshold_accuracy():
    rng = np.random.default_rng(11)
    is_member = rng.random(800) < 0.3
    scores = rng.normal(size=800) + is_member
    oracle = reference_metrics(scores, is_member)
    assert calibrated_balanced_accuracy(oracle["threshold"], scores, is_member) == oracle["balanced_accuracy"]
    threshold = 0.25
    tpr = np.mean(scores[is_member] >= threshold)
    fpr = np.mean(scores[~is_member] >= threshold)
    expected = 0.5 * (tpr + 1 - fpr)
    assert calibrated_balanced_accuracy(threshold, scores, is_member) == pytest.approx(expected, abs=1e-15)
    # No floor: a threshold calibrated on the wrong side can score below 0.5.
    assert calibrated_balanced_accuracy(threshold, -scores, is_member) < 0.5


def test_roc_points_small_curve_equals_sklearn():
    rng = np.random.default_rng(5)
    is_member = rng.random(300) < 0.5
    scores = np.round(rng.normal(size=300) + 0.8 * is_member, 1)
    curve = roc_points(scores, is_member)
    fpr, tpr, thresholds = roc_curve(is_member, scores, drop_intermediate=False)
    np.testing.assert_allclose(curve["fpr"], fpr, rtol=0, atol=1e-15)
    np.testing.assert_allclose(curve["tpr"], tpr, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(curve["thresholds"][1:], thresholds[1:])
    assert curve["thresholds"][0] == np.inf


def test_roc_points_downsampling_keeps_endpoints_and_low_fpr_detail():
    rng = np.random.default_rng(9)
    is_member = rng.random(40_000) < 0.5
    scores = rng.normal(size=40_000) + 0.6 * is_member
    full = roc_points(scores, is_member, max_points=10**9)
    thin = roc_points(scores, is_member, max_points=300)
    assert full["fpr"].size > 30_000
    assert 100 < thin["fpr"].size <= 300
    assert (thin["fpr"][0], thin["tpr"][0]) == (0.0, 0.0)
    assert (thin["fpr"][-1], thin["tpr"][-1]) == (1.0, 1.0)
    assert np.all(np.diff(thin["fpr"]) >= 0) and np.all(np.diff(thin["tpr"]) >= 0)
    full_points = set(zip(full["fpr"], full["tpr"], full["thresholds"], strict=True))
    assert set(zip(thin["fpr"], thin["tpr"], thin["thresholds"], strict=True)) <= full_points
    for level in (0.0, 1e-3, 1e-2, 0.123):
        best_full = full["tpr"][full["fpr"] <= level].max()
        if level == 0.123:  # not a kept level: the thinned curve may only fall short, by little
            assert 0 <= best_full - thin["tpr"][thin["fpr"] <= level].max() < 0.01
        else:
            assert thin["tpr"][thin["fpr"] <= level].max() == best_full
    assert roc_points(scores[is_member], is_member[is_member])["fpr"].size == 0


def test_sql_text_forms_and_errors():
    con = duckdb.connect(":memory:")
    con.register("signal", pa.table({"score": [0.2, 0.8, 0.5], "is_member": [False, True, True]}))
    by_name = compute_metrics(con, "signal", []).to_pylist()
    bare_select = compute_metrics(con, "SELECT score, is_member FROM signal", []).to_pylist()
    subquery = compute_metrics(con, "(SELECT * FROM signal)", []).to_pylist()
    assert by_name == bare_select == subquery
    assert by_name[0]["balanced_accuracy"] == 1.0 and by_name[0]["threshold"] == 0.5
    assert "GROUP BY" in metrics_sql("signal", [])
    # Attack SQL runs on a locked-down connection (conventions section 5); metrics must work there too.
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    assert compute_metrics(con, "signal", []).to_pylist() == by_name
    with pytest.raises(StoreError):
        compute_metrics(con, "SELECT score FROM signal", [])
    with pytest.raises(ValueError):
        metrics_sql("signal", ["score"])
    with pytest.raises(ValueError):
        metrics_sql("signal", ["model", "model"])


def test_float32_source_column_and_odd_group_names():
    con = duckdb.connect(":memory:")
    scores32 = np.array([1.0, 1.0, 0.99999994, 0.7, 1.0, 0.5], dtype=np.float32)
    con.register(
        "signal",
        pa.table(
            {
                'odd "name"': ["x"] * 6,
                "score": pa.array(scores32, type=pa.float32()),
                "is_member": [True, True, True, False, True, False],
            }
        ),
    )
    row = compute_metrics(con, "signal", ['odd "name"']).to_pylist()[0]
    reference = reference_metrics(scores32.astype(np.float64), np.array([1, 1, 1, 0, 1, 0], bool))
    assert row['odd "name"'] == "x"
    _assert_rows_match(row, reference)
    assert row["threshold"] == float(np.float32(0.99999994))
