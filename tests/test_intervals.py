"""Bootstrap intervals: the vectorised replicates equal a plain numpy bootstrap with the same seed, the 95 %
interval of the AUC covers a known AUC about 95 % of the time, and `score` stores the intervals in v_metrics."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from robmia_db.attacks.intervals import (
    INTERVAL_COLUMNS,
    ScoreBins,
    bootstrap_intervals,
    bootstrap_replicates,
    draw_positions,
    grouped_intervals,
    percentile_interval,
    reference_replicates,
    replicates_of_groups,
)
from robmia_db.attacks.scoring import score_attacks
from tests.attack_fixtures import import_synthetic, query, scores_of, synthetic_outputs


def _tied_scores(seed: int, n: int, decimals: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    members = rng.random(n) < 0.4
    return np.round(rng.normal(0.6 * members, 1.0), decimals), members


def _plain_numpy_bootstrap(scores, members, n_resamples, seed):
    """The protocol written out as a plain loop, with scikit-learn for AUC and TPR at FPR."""
    m_scores, n_scores = scores[members], scores[~members]
    rng = np.random.default_rng(seed)
    out = {"balanced_accuracy": [], "auc": [], "tpr_at_fpr_1e2": []}
    for _ in range(n_resamples):
        m = m_scores[rng.integers(0, m_scores.size, size=m_scores.size)]
        n = n_scores[rng.integers(0, n_scores.size, size=n_scores.size)]
        y = np.r_[np.ones(m.size), np.zeros(n.size)]
        s = np.r_[m, n]
        best = 0.5
        for t in np.unique(s):
            best = max(best, 0.5 * (np.mean(m >= t) + 1 - np.mean(n >= t)))
        out["balanced_accuracy"].append(best)
        out["auc"].append(roc_auc_score(y, s))
        fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
        # fewer than 100 non-members cannot resolve FPR 1%: NULL (NaN here), as the metrics say
        out["tpr_at_fpr_1e2"].append(tpr[fpr <= 0.01].max() if n.size * 0.01 >= 1 else np.nan)
    return {k: np.asarray(v) for k, v in out.items()}


@pytest.mark.parametrize(("n", "decimals"), [(300, 1), (257, 3), (120, 0)])
def test_vectorised_replicates_equal_the_plain_bootstrap_loop(n, decimals):
    scores, members = _tied_scores(n, n, decimals)
    fast = bootstrap_replicates(scores, members, n_resamples=150, seed=7)
    loop = reference_replicates(scores, members, n_resamples=150, seed=7)
    for name in fast:
        assert np.array_equal(fast[name], loop[name], equal_nan=True), (
            name
        )  # bit for bit: same draws and arithmetic
    independent = _plain_numpy_bootstrap(scores, members, 150, 7)
    for name, values in independent.items():
        np.testing.assert_allclose(fast[name], values, rtol=0, atol=1e-12, err_msg=name, equal_nan=True)


def _assert_same_replicates(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name], equal_nan=True), name


def _edge_cases():
    rng = np.random.default_rng(42)
    members = np.arange(200) < 100
    on_top = np.where(members, 0.5 + rng.random(200), np.where(np.arange(200) % 2, 2.0, rng.random(200)))
    yield "non-members on top", on_top, members
    yield "all tied", np.ones(200), members
    yield "members all above", np.where(members, 1.0, 0.0) + rng.random(200) * 0.1, members
    yield "one member", rng.normal(size=200), np.arange(200) == 7
    # float32 softmax-like confidences, many tied at 1.0f, as the benchmark's
    x = rng.gamma(np.where(members, 4.2, 3.8), 3.6)
    yield "float32 ties at 1", (1.0 - np.exp(-x)).astype(np.float32).astype(np.float64), members
    mixed = np.round(rng.normal(0.4 * members, 1.0), 1)
    mixed[::3] = 9.0  # a top bin shared by both classes
    yield "shared top bin", mixed, members


@pytest.mark.parametrize("case", list(_edge_cases()), ids=lambda c: c[0])
def test_member_columns_keep_the_plain_loops_replicates(case):
    _, scores, members = case
    fast = bootstrap_replicates(scores, members, n_resamples=60, seed=5)
    _assert_same_replicates(fast, reference_replicates(scores, members, n_resamples=60, seed=5))


def test_member_columns_are_fewer_than_distinct_scores():
    scores, members = _tied_scores(9, 2000, 2)
    bins = ScoreBins(scores[members], scores[~members])
    assert bins.n_columns < np.unique(scores[members]).size
    assert bins.tie_columns.size == np.intersect1d(scores[members], scores[~members]).size


def test_blocks_of_draws_are_the_protocols_int64_sequence():
    from robmia_db.attacks.intervals import _draw_block

    for P, N in [(257, 257), (257, 190)]:  # one call for P = N, else two per replicate
        members, nonmembers = _draw_block(np.random.default_rng(4), P, N, 9)
        plain = np.random.default_rng(4)
        for i in range(9):
            assert np.array_equal(members[i], plain.integers(0, P, size=P))
            assert np.array_equal(nonmembers[i], plain.integers(0, N, size=N))
        for i, (m, n) in enumerate(draw_positions(np.random.default_rng(4), P, N, 9)):
            assert np.array_equal(m, members[i]) and np.array_equal(n, nonmembers[i])


def test_equal_split_sizes_keep_the_plain_loops_replicates():
    rng = np.random.default_rng(8)
    members = rng.permutation(np.arange(240) < 120)
    scores = np.round(rng.normal(0.5 * members, 1.0), 1)
    _assert_same_replicates(
        bootstrap_replicates(scores, members, 80, seed=2), reference_replicates(scores, members, 80, seed=2)
    )


def test_groups_sharing_draws_equal_groups_run_alone(monkeypatch):
    from robmia_db.attacks import intervals

    rng = np.random.default_rng(6)
    groups = []
    for size, share in [(300, 0.5), (300, 0.5), (250, 0.4), (300, 0.5), (250, 0.4)]:
        members = rng.permutation(np.arange(size) < int(size * share))
        scores = np.round(rng.normal(0.5 * members, 1.0), 2)
        groups.append((scores[members], scores[~members]))
    monkeypatch.setattr(intervals, "_CHUNK_ELEMENTS", 5000)  # several chunks per (P, N)
    monkeypatch.setattr(intervals, "_BATCH_EXAMPLES", 700)  # batches of 2 groups of 300 (or of 250)
    together = replicates_of_groups(groups, n_resamples=40, seed=3)
    for (m, n), replicates in zip(groups, together):
        alone = bootstrap_replicates(np.r_[m, n], np.r_[np.ones(m.size, bool), np.zeros(n.size, bool)], 40, 3)
        _assert_same_replicates(replicates, alone)
    table = pa.table(
        {
            "model": np.repeat(np.arange(len(groups)), [m.size + n.size for m, n in groups]),
            "example_id": np.concatenate([np.arange(m.size + n.size) for m, n in groups]),
            "score": np.concatenate([np.r_[m, n] for m, n in groups]),
            "is_member": np.concatenate(
                [np.r_[np.ones(m.size, bool), np.zeros(n.size, bool)] for m, n in groups]
            ),
        }
    )
    stored = grouped_intervals(table, ["model"], n_resamples=40, seed=3).to_pylist()
    for row, (m, n) in zip(stored, groups):
        expected = bootstrap_intervals(
            np.r_[m, n], np.r_[np.ones(m.size, bool), np.zeros(n.size, bool)], 40, 3
        )
        assert {c: row[c] for c in INTERVAL_COLUMNS} == expected


def test_large_groups_keep_exact_integer_arithmetic():
    # P = N = 50,000: P * N needs int64 and a draw count may exceed int16, so the wide types are used
    rng = np.random.default_rng(12)
    members = rng.permutation(np.arange(100_000) < 50_000)
    # members mostly below (AUC ~0.02): the pairs with the non-member above, ~2.4e9, overflow int32
    scores = np.round(rng.normal(-3.0 * members, 1.0), 2)  # ~1,000 distinct values: heavy ties
    _assert_same_replicates(
        bootstrap_replicates(scores, members, 3, seed=1), reference_replicates(scores, members, 3, seed=1)
    )


def test_chunking_does_not_change_the_replicates(monkeypatch):
    from robmia_db.attacks import intervals

    scores, members = _tied_scores(3, 400, 2)
    whole = bootstrap_replicates(scores, members, n_resamples=64, seed=11)
    monkeypatch.setattr(intervals, "_CHUNK_ELEMENTS", 1000)  # 2 replicates per chunk
    chunked = bootstrap_replicates(scores, members, n_resamples=64, seed=11)
    for name in whole:
        assert np.array_equal(whole[name], chunked[name], equal_nan=True)


def test_nan_scores_are_left_out_as_in_the_point_metrics():
    scores, members = _tied_scores(5, 200, 2)
    with_nan = scores.copy()
    with_nan[::17] = np.nan
    keep = ~np.isnan(with_nan)
    a = bootstrap_replicates(with_nan, members, 40, seed=1)
    b = bootstrap_replicates(scores[keep], members[keep], 40, seed=1)
    assert all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)
    assert bootstrap_replicates(scores[members], members[members], 10) == {}


def test_auc_interval_covers_a_known_auc_about_95_percent_of_the_time():
    # 200 simulated stores at the metrics level: members ~ N(d, 1), non-members ~ N(0, 1), AUC = Phi(d/sqrt 2)
    d = 0.5
    true_auc = 0.5 * (1 + math.erf(d / 2))
    covered = 0
    for store in range(200):
        rng = np.random.default_rng(1000 + store)
        members = np.arange(200) < 100
        scores = rng.normal(d * members, 1.0)
        low, high = percentile_interval(bootstrap_replicates(scores, members, 1000, seed=store)["auc"])
        covered += low <= true_auc <= high
    # binomial(200, 0.95) lies in [181, 197] with probability > 99.8 %
    assert 181 <= covered <= 197, covered


def test_score_stores_intervals_beside_the_metrics(tmp_path):
    db = tmp_path / "store.duckdb"
    import_synthetic(db, tmp_path / "npz", {"a": synthetic_outputs(1, n=300), "b": synthetic_outputs(2)})
    score_attacks(db, ["confidence", "loss"], resamples=200)
    rows = query(db, "SELECT * FROM v_metrics ORDER BY attack, model_key, perturbation")
    assert len(rows) == 2 * 2 * 2
    for row in rows:
        _, scores, members = scores_of(db, row["attack"], row["model_key"], row["perturbation"])
        expected = bootstrap_intervals(scores, members, n_resamples=200, seed=0)
        assert {c: row[c] for c in INTERVAL_COLUMNS} == pytest.approx(expected, abs=0)
        assert row["ci_resamples"] == 200
        assert row["auc_ci_low"] < row["auc"] < row["auc_ci_high"]
    # re-scoring with no intervals clears them rather than leaving stale ones
    score_attacks(db, ["confidence"], force=True, resamples=0)
    again = query(db, "SELECT attack, auc_ci_low, ci_resamples FROM v_metrics ORDER BY attack")
    assert [r["ci_resamples"] for r in again if r["attack"] == "confidence"] == [None] * 4
    assert all(r["ci_resamples"] == 200 for r in again if r["attack"] == "loss")
