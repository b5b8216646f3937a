"""calibrated_accuracy of reference-model attacks by nested leave-one-out, against numpy.

A target T's threshold is the best one on the pooled scores of k of its references R, each R scored by the
same attack with the fleet minus R and minus T; T's labels reach neither those scores nor the choice of R
(the metamorphic test in test_scoring_integrity covers the latter for every built-in).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import reference_attacks_numpy as ref
from attack_fixtures import balanced_accuracy_at, best_threshold, metrics_row, query
from click.testing import CliRunner
from test_reference_attacks import PERTURBATIONS, make_fleet, phi_fleet, stored

from robmia_db.attacks.nested_calibration import CHANCE_NOTE, OFF_NOTE
from robmia_db.attacks.scoring import score_attacks
from robmia_db.cli import main

N_MODELS = 6
K = 3


def _chosen(keys: list[str], t: int, k: int) -> list[int]:
    """Independent of the implementation: the k references with the smallest sha256 of (target, reference)."""
    others = [i for i in range(len(keys)) if i != t]
    digest = {i: hashlib.sha256(f"{keys[t]}\0{keys[i]}".encode()).hexdigest() for i in others}
    return sorted(sorted(others, key=digest.get)[:k])


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory):
    fleet = make_fleet(tmp_path_factory.mktemp("nested"), seed=19, n_models=N_MODELS)
    outcomes = score_attacks(fleet.db, ["lira_online", "lira_offline"], resamples=0, calibration_models=K)
    assert all(o.scored == N_MODELS * len(PERTURBATIONS) for o in outcomes)
    return fleet


@pytest.mark.parametrize("mode", ["online", "offline"])
def test_lira_threshold_comes_from_references_rescored_without_the_target(fleet, mode: str):
    for perturbation in PERTURBATIONS:
        phi = phi_fleet(fleet, perturbation)
        for t, key in enumerate(fleet.keys):
            pooled, pooled_members = [], []
            for r in _chosen(fleet.keys, t, K):
                keep = np.flatnonzero(
                    np.arange(N_MODELS) != t
                )  # the fleet without T: R's references are keep - R
                position = int(np.flatnonzero(keep == r)[0])
                pooled.append(ref.lira(phi[keep], fleet.members[keep], position, mode))
                pooled_members.append(fleet.members[r])
            threshold = best_threshold(np.concatenate(pooled), np.concatenate(pooled_members))
            row = metrics_row(fleet.db, f"lira_{mode}", key, perturbation)
            assert row["n_reference_models"] == K, row
            if threshold is None:  # nothing beats chance on the references: NULL and the reason, not 0.5
                assert row["calibrated_threshold"] is None and row["calibrated_accuracy"] is None
                assert row["calibration_note"] == CHANCE_NOTE, row
                continue
            assert row["calibration_note"] is None, row
            assert row["calibrated_threshold"] == pytest.approx(threshold, rel=1e-9, abs=1e-9)
            target_scores = stored(fleet.db, f"lira_{mode}", key, perturbation)
            expected = balanced_accuracy_at(row["calibrated_threshold"], target_scores, fleet.members[t])
            assert row["calibrated_accuracy"] == pytest.approx(expected, abs=1e-12)
            assert row["calibrated_accuracy"] <= row["balanced_accuracy"] + 1e-12


def test_the_target_row_is_not_in_its_own_calibration(fleet):
    """Against the leaky version: the references' stored scores (computed with T among their references)
    give another threshold on at least one target, so the nested rescoring is what is stored."""
    differs = 0
    for t, key in enumerate(fleet.keys):
        chosen = _chosen(fleet.keys, t, K)
        leaky = np.concatenate([stored(fleet.db, "lira_online", fleet.keys[r], "benign") for r in chosen])
        leaky_threshold = best_threshold(leaky, np.concatenate([fleet.members[r] for r in chosen]))
        differs += (
            metrics_row(fleet.db, "lira_online", key, "benign")["calibrated_threshold"] != leaky_threshold
        )
    assert differs > 0


def test_calibration_models_zero_gives_null_with_reason_and_a_new_k_rescores(fleet, tmp_path: Path):
    db = tmp_path / "fleet.duckdb"
    db.write_bytes(Path(fleet.db).read_bytes())
    result = CliRunner().invoke(
        main,
        [
            "--db",
            str(db),
            "score",
            "--attack",
            "lira_online",
            "--calibration-models",
            "0",
            "--resamples",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    # a different k changes what calibrates the targets: nothing is served from the cache
    assert f"lira_online: {N_MODELS * len(PERTURBATIONS)} scored, 0 cached" in result.output
    rows = query(db, "SELECT * FROM v_metrics WHERE attack = 'lira_online'")
    assert len(rows) == N_MODELS * len(PERTURBATIONS)
    for row in rows:
        assert row["calibrated_accuracy"] is None and row["calibrated_threshold"] is None, row
        assert row["n_reference_models"] is None and row["calibration_note"] == OFF_NOTE
    # the scores themselves are the same
    for key in fleet.keys:
        np.testing.assert_array_equal(
            stored(db, "lira_online", key, "pgd"), stored(fleet.db, "lira_online", key, "pgd")
        )
    again = CliRunner().invoke(
        main, ["--db", str(db), "score", "--attack", "lira_online", "--calibration-models", "0"]
    )
    assert f"lira_online: 0 scored, {N_MODELS * len(PERTURBATIONS)} cached" in again.output, again.output


def test_more_calibration_models_than_references_uses_them_all(tmp_path: Path):
    fleet = make_fleet(tmp_path, seed=23, n_models=3)
    score_attacks(fleet.db, ["rmia_offline"], resamples=0, calibration_models=50)
    rows = query(
        fleet.db, "SELECT n_reference_models, calibration_note FROM v_metrics WHERE attack = 'rmia_offline'"
    )
    assert len(rows) == 3 * len(PERTURBATIONS)
    # each target has 2 references; each is rescored with the one model left (RMIA works with 1 reference)
    assert {r["n_reference_models"] for r in rows} == {2}
    assert {r["calibration_note"] for r in rows} <= {None, CHANCE_NOTE}
    assert sum(r["calibration_note"] is None for r in rows) >= 3
