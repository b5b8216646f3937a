"""Paired statistics: the permutation p-value against scipy's exact paired permutation test, the paired
bootstrap against a plain loop, Holm against hand-computed values, `compare` and `v_configurations` on real
imported stores (scipy's t interval as the reference)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats

from robmia_db.analysis.paired import Pair, holm, paired_difference, permutation_pvalue, shared_replicates
from robmia_db.attacks.intervals import bootstrap_replicates
from robmia_db.attacks.metrics import reference_metrics
from robmia_db.attacks.scoring import score_attacks
from robmia_db.cli import main
from tests.attack_fixtures import import_outputs, query, synthetic_outputs


def _pair(seed: int, n: int, shift: float, decimals: int = 1) -> Pair:
    rng = np.random.default_rng(seed)
    members = np.arange(n) % 2 == 0
    a = np.round(rng.normal(shift * members, 1.0), decimals)
    b = np.round(rng.normal(0.0, 1.0, n), decimals)
    return Pair(a, b, members)


def _metric(scores, members, metric):
    return reference_metrics(scores, members)[metric]


@pytest.mark.parametrize("metric", ["balanced_accuracy", "auc"])
@pytest.mark.parametrize("shift", [0.0, 1.5])
def test_permutation_pvalue_equals_scipy_exact_paired_test(metric, shift):
    pairs = [_pair(1, 6, shift), _pair(2, 4, shift)]
    p, count, exact = permutation_pvalue(pairs, metric, n_permutations=5000)
    assert exact and count == 2**10

    def statistic(x, y):
        return np.mean(
            [
                _metric(x[lo:hi], pairs[k].is_member, metric) - _metric(y[lo:hi], pairs[k].is_member, metric)
                for k, (lo, hi) in enumerate([(0, 6), (6, 10)])
            ]
        )

    data = (np.concatenate([q.a for q in pairs]), np.concatenate([q.b for q in pairs]))
    ref = stats.permutation_test(
        data, statistic, permutation_type="samples", n_resamples=np.inf, vectorized=False
    )
    assert p == pytest.approx(ref.pvalue, abs=1e-15)


def test_sampled_permutation_pvalue_is_close_to_the_exact_one():
    pairs = [_pair(3, 14, 1.0)]
    exact_p, _, exact = permutation_pvalue(pairs, "auc", n_permutations=2**14)
    sampled_p, _, sampled_exact = permutation_pvalue(pairs, "auc", n_permutations=4000, seed=5)
    assert exact and not sampled_exact
    assert abs(sampled_p - exact_p) < 4 * np.sqrt(exact_p * (1 - exact_p) / 4000) + 1e-3


def test_paired_bootstrap_equals_a_plain_loop_on_shared_resamples():
    pair = _pair(4, 120, 0.8)
    result = paired_difference([pair], "balanced_accuracy", n_resamples=100, n_permutations=10, seed=9)
    rng = np.random.default_rng([9, 0])
    members, nonmembers = np.flatnonzero(pair.is_member), np.flatnonzero(~pair.is_member)
    expected = []
    for _ in range(100):
        rows = np.r_[members[rng.integers(0, 60, 60)], nonmembers[rng.integers(0, 60, 60)]]
        m = pair.is_member[rows]
        expected.append(
            _metric(pair.a[rows], m, "balanced_accuracy") - _metric(pair.b[rows], m, "balanced_accuracy")
        )
    np.testing.assert_allclose(result.replicates, expected, rtol=0, atol=1e-12)
    single = shared_replicates([pair.a], pair.is_member, "auc", 50, 3)[0]
    assert np.array_equal(single, bootstrap_replicates(pair.a, pair.is_member, 50, 3)["auc"])


def test_paired_interval_and_pvalue_see_a_real_difference_and_not_a_null_one():
    strong = paired_difference([_pair(k, 400, 1.0, 3) for k in range(3)], "auc", 400, 200)
    assert strong.ci_low > 0 and strong.p_value < 0.01
    null = paired_difference(
        [Pair(p.a, p.a.copy(), p.is_member) for p in [_pair(7, 200, 1.0)]], "auc", 200, 200
    )
    assert null.difference == 0 and null.ci_low == 0 and null.ci_high == 0 and null.p_value == 1.0


def test_holm_adjusts_as_computed_by_hand():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, max(0.06, 0.04*1) = 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def _import(db, folder, name, outputs, defense, dataset="shared"):
    folder.mkdir(parents=True, exist_ok=True)
    path = outputs.save(folder / f"{name}.npz")
    return import_outputs(db, path, "npz", name=name, dataset=dataset, defense=defense).model_key


def test_compare_command_on_a_store(tmp_path):
    db = tmp_path / "store.duckdb"
    members = np.arange(400) % 2 == 0
    labels = np.random.default_rng(0).integers(0, 10, 400)
    _import(db, tmp_path, "robust", synthetic_outputs(1, n=400, is_member=members, labels=labels), "pgd_at")
    weak = synthetic_outputs(2, n=400, is_member=members, labels=labels)
    weak.logits = {k: np.where(members[:, None], v * 0.6, v) for k, v in weak.logits.items()}  # smaller gap
    _import(db, tmp_path, "natural", weak, "natural")
    score_attacks(db, ["confidence"], resamples=0)
    runner = CliRunner()
    result = runner.invoke(
        main, ["compare", "--db", str(db), "--a", "pgd_at", "--b", "natural", "--kind", "benign", "--format", "json",
               "--resamples", "300", "--permutations", "200"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    import json

    (row,) = json.loads(result.output)
    assert row["kind"] == "benign" and row["n_pairs"] == 1
    metrics = {
        r["model_name"]: r["balanced_accuracy"]
        for r in query(db, "SELECT * FROM v_metrics WHERE kind = 'benign'")
    }
    assert row["difference"] == pytest.approx(metrics["robust"] - metrics["natural"], abs=1e-15)
    assert row["ci_low"] <= row["difference"] <= row["ci_high"]
    assert row["p_holm"] == row["p_value"]  # one row, nothing to correct

    bad = runner.invoke(main, ["compare", "--db", str(db), "--a", "trades", "--b", "natural"])
    assert bad.exit_code == 1
    assert bad.output.strip() == f"Error: no models of defense 'trades' have 'confidence' scores in {db}"

    other = synthetic_outputs(3, n=400, is_member=~members, labels=labels)
    _import(db, tmp_path, "trades-other-members", other, "trades")
    score_attacks(db, ["confidence"], resamples=0)
    mismatch = runner.invoke(main, ["compare", "--db", str(db), "--a", "trades", "--b", "natural"])
    assert mismatch.exit_code == 1
    assert "not evaluated on the same examples with the same membership" in mismatch.output
    assert "Traceback" not in mismatch.output


def test_configurations_view_matches_scipy_t_interval(tmp_path):
    db = tmp_path / "store.duckdb"
    labels = np.random.default_rng(0).integers(0, 10, 200)  # one dataset: the same examples, the same labels
    for k in range(3):
        _import(
            db,
            tmp_path,
            f"m{k}",
            synthetic_outputs(10 + k, n=200, labels=labels[:200]),
            "pgd_at",
            dataset="d",
        )
    for k in range(32):  # 32 seeds: beyond the t table, the Cornish-Fisher branch
        _import(
            db, tmp_path, f"w{k}", synthetic_outputs(50 + k, n=60, labels=labels[:60]), "trades", dataset="d"
        )
    score_attacks(db, ["confidence"], resamples=0)
    for defense, n in (("pgd_at", 3), ("trades", 32)):
        values = np.array(
            [
                r["balanced_accuracy"]
                for r in query(db, f"SELECT * FROM v_metrics WHERE defense = '{defense}' AND kind = 'benign'")
            ]
        )
        (row,) = query(db, f"SELECT * FROM v_configurations WHERE defense = '{defense}' AND kind = 'benign'")
        assert row["n_models"] == n == values.size
        assert row["n_seeds"] == 0 and row["seeds"] == []  # imported models have no training seed
        assert row["balanced_accuracy_mean"] == pytest.approx(values.mean(), abs=1e-14)
        assert row["balanced_accuracy_sd"] == pytest.approx(values.std(ddof=1), abs=1e-14)
        low, high = stats.t.interval(0.95, n - 1, loc=values.mean(), scale=stats.sem(values))
        assert row["balanced_accuracy_ci_low"] == pytest.approx(low, abs=1e-6)
        assert row["balanced_accuracy_ci_high"] == pytest.approx(high, abs=1e-6)


def _fleet_vector(defense: str, index: int, shift: float, experiment: str = "fleet", name: str | None = None):
    """One fleet model's confidence scores: the fleet shares seed 0, each model index has its own half."""
    from robmia_db.analysis.compare import ScoreVector

    n = 300
    members = np.random.default_rng(100 + index).permutation(np.arange(n) < n // 2)
    rng = np.random.default_rng(zlib.crc32(f"{defense}/{index}/{experiment}".encode()))
    scores = np.round(rng.normal(shift * members, 1.0), 2)
    return ScoreVector(
        f"{experiment}-{defense}-{index}", name or f"{experiment}/{defense}-s0-m{index}", "digits", "mlp", 1.0,
        defense, 0.1 if defense != "natural" else None, 0, "pgd", "adversarial", 0.1, np.arange(n), members,
        scores, {}, index, experiment,
    )  # fmt: skip


def test_compare_pairs_every_model_of_a_fleet_not_one_per_seed():
    """A fleet's models share their seed: each model index is its own pair (same membership half), and the
    difference is the mean over those pairs (computed here with the metrics module on each pair)."""
    from robmia_db.analysis.compare import paired_rows

    vectors = [_fleet_vector("pgd_at", i, 1.0) for i in range(4)] + [
        _fleet_vector("natural", i, 0.4) for i in range(4)
    ]
    (row,) = paired_rows(vectors, "pgd_at", "natural", "auc", n_resamples=50, n_permutations=20)
    assert row["n_pairs"] == 4 and row["seeds"] == [0]
    expected = np.mean(
        [_metric(a.score, a.is_member, "auc") - _metric(b.score, b.is_member, "auc") for a, b in
         zip(vectors[:4], vectors[4:])]
    )  # fmt: skip
    assert row["difference"] == pytest.approx(expected, abs=1e-12)


def test_compare_pairs_within_an_experiment_and_refuses_an_ambiguous_match():
    from robmia_db.analysis.compare import paired_rows
    from robmia_db.errors import RobmiaError

    robust = _fleet_vector("pgd_at", 0, 1.0, experiment="sweep")
    natural_here = _fleet_vector("natural", 0, 0.4, experiment="sweep")
    natural_elsewhere = _fleet_vector("natural", 0, 0.0, experiment="quickstart")
    (row,) = paired_rows([robust, natural_elsewhere, natural_here], "pgd_at", "natural", "auc", 50, 20)
    assert row["n_pairs"] == 1
    here = _metric(robust.score, robust.is_member, "auc") - _metric(
        natural_here.score, robust.is_member, "auc"
    )
    assert row["difference"] == pytest.approx(here, abs=1e-12)

    twin = _fleet_vector("natural", 0, 0.2, experiment="sweep", name="sweep/natural-s0-m0-again")
    with pytest.raises(
        RobmiaError, match="sweep/natural-s0-m0 and sweep/natural-s0-m0-again are both natural"
    ):
        paired_rows([robust, natural_here, twin], "pgd_at", "natural", "auc", 50, 20)
    apart = _fleet_vector("natural", 0, 0.2, experiment="other")
    with pytest.raises(RobmiaError, match="no two of them share an experiment"):
        paired_rows([robust, natural_elsewhere, apart], "pgd_at", "natural", "auc", 50, 20)
    # the same at model index 1, after an unambiguous pair at model index 0
    later = [
        _fleet_vector("pgd_at", 1, 1.0, experiment="sweep"),
        _fleet_vector("natural", 1, 0.0, experiment="quickstart"),
        _fleet_vector("natural", 1, 0.2, experiment="other"),
    ]
    with pytest.raises(RobmiaError, match="no two of them share an experiment"):
        paired_rows([robust, natural_here, *later], "pgd_at", "natural", "auc", 50, 20)
