"""The paper's six findings decided on synthetic score tables built to be HELD, NOT HELD or INCONCLUSIVE."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from scipy import stats

from robmia_db.analysis.compare import ScoreVector
from robmia_db.analysis.findings import (
    HELD,
    INCONCLUSIVE,
    NOT_HELD,
    NOT_MEASURED,
    combine,
    decide,
    decide_findings,
    spearman,
)


def vec(defense, seed, kind, strength, eps=0.1, width=1.0, n=400, gap=None, dataset="d", arch="cnn"):
    """Members score `strength` higher than non-members on average (unit-variance noise)."""
    tag = f"{dataset}/{defense}/{seed}/{kind}/{eps}/{width}"
    rng = np.random.default_rng(zlib.crc32(tag.encode()))
    members = np.arange(n) % 2 == 0
    scores = np.round(rng.normal(strength * members, 1.0), 3)
    extra = {"adv_train_acc": None, "adv_test_acc": None}
    if gap is not None:
        extra = {"adv_train_acc": 0.5 + gap, "adv_test_acc": 0.5}
    return ScoreVector(
        f"{defense}-{seed}-{eps}-{width}", tag, dataset, arch, width, defense, eps, seed, kind,
        kind, None if kind == "benign" else eps, np.arange(n), members, scores, extra,
    )  # fmt: skip


def decisions(vectors, finding, n_resamples=300):
    rows = [r for r in decide_findings(vectors, n_resamples=n_resamples) if r["finding"] == finding]
    return rows


def test_decide_and_combine():
    assert decide(0.01, 0.2) == HELD
    assert decide(-0.2, -0.01) == NOT_HELD
    assert decide(-0.01, 0.2) == INCONCLUSIVE
    assert decide(None, None) == NOT_MEASURED
    assert combine([HELD, HELD]) == HELD
    assert combine([HELD, INCONCLUSIVE]) == INCONCLUSIVE
    assert combine([HELD, NOT_HELD, INCONCLUSIVE]) == NOT_HELD


@pytest.mark.parametrize(
    ("robust", "natural", "n", "expected"),
    [(1.2, 0.3, 400, HELD), (0.3, 1.2, 400, NOT_HELD), (0.5, 0.5, 60, INCONCLUSIVE)],
)
def test_finding_1_robust_vs_natural(robust, natural, n, expected):
    vectors = [vec("pgd_at", s, "benign", robust, n=n) for s in range(3)]
    vectors += [vec("natural", s, "benign", natural, n=n) for s in range(3)]
    (row,) = decisions(vectors, 1)
    assert row["decision"] == expected, row
    assert row["n"] == 3


def test_finding_1_never_compares_different_kinds_or_networks():
    vectors = [vec("pgd_at", 0, "adversarial", 2.0), vec("natural", 0, "benign", 0.0)]
    vectors += [vec("ibp", 0, "benign", 2.0, arch="mlp"), vec("natural", 0, "benign", 0.0)]
    rows = decisions(vectors, 1)
    assert [r["decision"] for r in rows] == [NOT_MEASURED]


@pytest.mark.parametrize(("adv", "benign", "expected"), [(1.5, 0.5, HELD), (0.5, 1.5, NOT_HELD)])
def test_finding_2_adversarial_vs_benign(adv, benign, expected):
    vectors = [vec("pgd_at", s, "adversarial", adv) for s in range(2)]
    vectors += [vec("pgd_at", s, "benign", benign) for s in range(2)]
    (row,) = decisions(vectors, 2)
    assert row["decision"] == expected


@pytest.mark.parametrize(("ibp", "expected"), [(0.9, HELD), (0.0, NOT_HELD)])
def test_finding_3_verifiable_between_natural_and_empirical(ibp, expected):
    vectors = [vec("natural", s, "benign", 0.3) for s in range(2)]
    vectors += [vec("ibp", s, "benign", ibp) for s in range(2)]
    vectors += [vec("pgd_at", s, "benign", 1.8) for s in range(2)]
    rows = decisions(vectors, 3)
    summary = [r for r in rows if r["detail"].endswith("all parts")]
    assert len(rows) == 3 and len(summary) == 1
    assert summary[0]["decision"] == expected


def test_finding_3_half_measured_is_not_held_only_when_a_part_fails():
    vectors = [vec("natural", 0, "benign", 0.3), vec("ibp", 0, "benign", 1.2)]
    summary = [r for r in decisions(vectors, 3) if r["detail"].startswith("ibp: all parts")]
    assert summary[0]["decision"] == NOT_MEASURED


@pytest.mark.parametrize("axis", ["eps", "width"])
@pytest.mark.parametrize(
    ("strengths", "n", "expected"),
    [((0.4, 0.8, 1.2), 400, HELD), ((1.2, 0.8, 0.4), 400, NOT_HELD), ((0.6, 0.6, 0.6), 80, INCONCLUSIVE)],
)
def test_findings_4_and_5_trends(axis, strengths, n, expected):
    levels = (0.05, 0.1, 0.2) if axis == "eps" else (0.5, 1.0, 2.0)
    vectors = []
    for level, strength in zip(levels, strengths):
        for s in range(2):
            kwargs = {"eps": level} if axis == "eps" else {"width": level}
            vectors.append(vec("pgd_at", s, "benign", strength, n=n, **kwargs))
    finding = 4 if axis == "eps" else 5
    (row,) = decisions(vectors, finding)
    assert row["decision"] == expected, row
    x = np.repeat(levels, 2)
    from robmia_db.attacks.metrics import reference_metrics

    y = [reference_metrics(v.score, v.is_member)["balanced_accuracy"] for v in vectors]
    assert row["estimate"] == pytest.approx(stats.linregress(x, y).slope, abs=1e-12)


@pytest.mark.parametrize(
    ("sign", "n_models", "expected"), [(1, 10, HELD), (-1, 10, NOT_HELD), (0, 6, INCONCLUSIVE)]
)
def test_finding_6_gap_correlation(sign, n_models, expected):
    rng = np.random.default_rng(3)
    strengths = np.linspace(0.2, 1.6, n_models)
    gaps = strengths if sign > 0 else strengths[::-1] if sign < 0 else rng.permutation(strengths)
    vectors = [
        vec("pgd_at", k, "adversarial", strengths[k], eps=0.1, gap=float(gaps[k]), n=600)
        for k in range(n_models)
    ]
    (row,) = decisions(vectors, 6, n_resamples=500)
    assert row["decision"] == expected, row


def test_every_finding_is_reported_for_every_dataset():
    vectors = [vec("natural", 0, "benign", 0.2, dataset="x"), vec("pgd_at", 0, "benign", 0.9, dataset="y")]
    rows = decide_findings(vectors, n_resamples=50)
    for dataset in ("x", "y"):
        assert sorted({r["finding"] for r in rows if r["dataset"] == dataset}) == [1, 2, 3, 4, 5, 6]
    assert all(r["decision"] == NOT_MEASURED for r in rows)


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, size=(7, 12)).astype(float)
    y = rng.normal(size=(7, 12)) + x
    got = spearman(x, y)
    want = [stats.spearmanr(a, b).statistic for a, b in zip(x, y)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_width_trend_of_natural_models_keeps_each_attack_eps_apart():
    """Natural models have no training eps: a model attacked at two eps gives two series, never a mixture,
    and a model attacked at one eps only is not dropped (the Yale sweep store: width 1 holds PGD at 3 eps)."""
    vectors = []
    for width, strength in ((0.5, 0.4), (1.0, 0.8), (2.0, 1.2)):
        for attack_eps in (0.1, 0.2) if width == 1.0 else (0.1,):
            v = vec("natural", 0, "adversarial", strength, eps=attack_eps, width=width)
            v.eps = None  # natural: attacked at attack_eps, trained without one
            vectors.append(v)
    rows = decisions(vectors, 5)
    by_attack = {r["detail"].split("attack eps ")[1].split(";")[0]: r for r in rows}
    assert sorted(by_attack) == ["0.1"]  # eps 0.2 has one width level only: no slope
    assert by_attack["0.1"]["n"] == 3 and by_attack["0.1"]["decision"] == HELD


def test_finding_3_compares_defenses_at_the_same_training_eps_only():
    vectors = [vec("natural", s, "benign", 0.3) for s in range(2)]
    vectors += [vec("ibp", s, "benign", 0.9) for s in range(2)]
    vectors += [vec("pgd_at", s, "benign", 1.8) for s in range(2)]
    vectors += [vec("pgd_at", s, "benign", 0.0, eps=0.2) for s in range(2)]  # another eps: not a part
    rows = [r for r in decisions(vectors, 3) if r["detail"] != "ibp: all parts"]
    assert len(rows) == 2, [r["detail"] for r in rows]
    assert all("eps 0.1" in r["detail"] and "width 1.0" in r["detail"] for r in rows)
    summary = [r for r in decisions(vectors, 3) if r["detail"] == "ibp: all parts"]
    assert summary[0]["decision"] == HELD


def test_finding_1_names_the_width_of_each_comparison():
    vectors = []
    for width in (0.5, 2.0):
        vectors += [
            vec("pgd_at", 0, "benign", 1.2, width=width),
            vec("natural", 0, "benign", 0.3, width=width),
        ]
    details = sorted(r["detail"] for r in decisions(vectors, 1))
    assert details == [
        "pgd_at - natural, benign (cnn, width 0.5, eps 0.1)",
        "pgd_at - natural, benign (cnn, width 2.0, eps 0.1)",
    ]


def test_finding_2_pairs_each_fleet_model_with_itself():
    """Finding 2 compares one model's I_A with its own I_B: a fleet (one seed, several models) gives one pair
    per model, not one per seed."""
    vectors = []
    for index in range(3):
        for kind, strength in (("adversarial", 0.8), ("benign", 0.2)):
            v = vec("pgd_at", 0, kind, strength + 0.01 * index)
            v.model_key, v.model_name, v.model_index = f"pgd_at-m{index}", f"fleet/pgd_at-s0-m{index}", index
            vectors.append(v)
    (row,) = decisions(vectors, 2)
    assert row["n"] == 3
