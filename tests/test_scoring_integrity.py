"""Scoring integrity (issues 9, 12, 14): the invariance contract for every built-in attack, refused silent
results (non-finite scores, foreign ids, name clashes, options that match nothing), decision rules, low-FPR
metrics per target and pooled over a fleet, one transaction per attack run, and time limits / Ctrl-C.

Fleets are imported through the real import path (`robmia_db.attacks.importers`) from seeded npz files:
models over the same examples, each on its own random half, under one shared dataset (reference models
for each other). Nothing trains here.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest
from attack_fixtures import (
    all_scores,
    balanced_accuracy_at,
    file_digest,
    import_synthetic,
    imported_population_outputs,
    query,
    reference_scores,
    row_counts,
    sql_attack,
    write_attack,
)
from click.testing import CliRunner
from threadpoolctl import threadpool_limits

from robmia_db.attacks.metrics import METRIC_COLUMNS, low_fpr_note, reference_metrics
from robmia_db.attacks.registry import load_registry
from robmia_db.attacks.results import BEFORE_CALIBRATION
from robmia_db.attacks.scoring import score_attacks
from robmia_db.cli import main
from robmia_db.errors import AttackDefinitionError

BUILTINS = sorted(load_registry(entry_points=False).attacks)
# oracle metrics re-tune on the target's own labels, so they may (must) change with them
LABEL_FREE = (
    "calibrated_threshold",
    "n_reference_models",
    "decision_threshold",
    "calibration_note",
    "n_nonfinite",
)
N_MODELS = 4
TARGET = "half1"


def _fleet(
    folder: Path, seed: int = 41, n_models: int = N_MODELS, verified: bool = False
) -> tuple[Path, dict]:
    db = folder / "fleet.duckdb"
    outputs = imported_population_outputs(seed, n_models=n_models)
    if verified:
        # a third perturbation, of kind verified, so attacks that need every kind have what they read
        for i, model in enumerate(outputs.values()):
            rng = np.random.default_rng(seed + 100 + i)
            worst = model.logits["pgd"].astype(np.float64) + rng.normal(0.0, 0.3, model.logits["pgd"].shape)
            worst[np.arange(len(model.labels)), model.labels] -= 1.0 + ~model.is_member
            model.logits["ibp"] = worst.astype(np.float32)
            model.kinds["ibp"] = "verified"
            model.eps["ibp"] = 0.1
    import_synthetic(db, folder / "npz", outputs, dataset="shared")
    return db, outputs


def _score_everything(db: Path, force: bool = False) -> None:
    # one OpenMP thread: the classifier attack's fit spins on shared cores otherwise. The invariance is
    # about which rows an attack reads, not how long its classifiers train, so the two trained attacks
    # (attack_model, shokri) run with fewer iterations; intervals are label-dependent by definition and
    # not compared here, so none are drawn. Nested calibration keeps its default.
    with threadpool_limits(1):
        score_attacks(db, None, force=force, params={"max_iter": 25}, resamples=0)


def _permute_labels(db: Path, model_key: str, seed: int) -> np.ndarray:
    """Shuffle one model's is_member over its examples, in `membership` and `signals` alike."""
    con = duckdb.connect(str(db))
    try:
        ids, labels = map(
            np.array,
            zip(
                *con.execute(
                    "SELECT example_id, is_member FROM membership WHERE model_key = ? ORDER BY example_id",
                    [model_key],
                ).fetchall()
            ),
        )
        shuffled = np.random.default_rng(seed).permutation(labels)
        assert (shuffled != labels).mean() > 0.3
        con.register("_new", {"example_id": ids.astype(np.int32), "is_member": shuffled.astype(bool)})
        for table in ("membership", "signals"):
            con.execute(
                f"UPDATE {table} SET is_member = n.is_member FROM _new n "
                f"WHERE {table}.model_key = ? AND {table}.example_id = n.example_id",
                [model_key],
            )
    finally:
        con.close()
    return shuffled


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory):
    """The fleet scored with every built-in, and a copy where the target's labels were shuffled, re-scored."""
    folder = tmp_path_factory.mktemp("fleet")
    db, outputs = _fleet(folder, verified=True)
    _score_everything(db)
    keys = {r["model_name"]: r["model_key"] for r in query(db, "SELECT model_name, model_key FROM v_models")}
    permuted = folder / "permuted.duckdb"
    shutil.copy2(db, permuted)
    labels = _permute_labels(permuted, keys[TARGET], seed=5)
    _score_everything(permuted, force=True)
    return db, permuted, keys, outputs, labels


def _metrics_by(db: Path, model_key: str) -> dict[tuple[str, str], dict]:
    rows = query(db, "SELECT * FROM v_metrics WHERE model_key = $k", k=model_key)
    return {(r["attack"], r["perturbation"]): r for r in rows}


# ---------------------------------------------------------------- item 1: the invariance contract


@pytest.mark.parametrize("attack", BUILTINS)
def test_target_scores_and_calibration_never_depend_on_its_labels(fleet, attack: str):
    """Metamorphic: shuffle T's is_member, re-score with force: T's scores and every label-free number are
    bit-identical; the label-dependent metrics are exactly those of the same scores under the new labels."""
    db, permuted, keys, _, labels = fleet
    key = keys[TARGET]
    before, after = all_scores(db), all_scores(permuted)
    original_metrics, new_metrics = _metrics_by(db, key), _metrics_by(permuted, key)
    units = [k for k in before if k[1] == key and k[0].split("[")[0] == attack]
    assert units, f"{attack} was not scored on {TARGET}"
    for name, _, perturbation in units:
        ids, scores, _ = before[(name, key, perturbation)]
        new_ids, new_scores, new_members = after[(name, key, perturbation)]
        np.testing.assert_array_equal(ids, new_ids)
        assert np.array_equal(scores, new_scores), f"{name}/{perturbation}: scores moved with T's labels"
        np.testing.assert_array_equal(new_members, labels)
        old_row, row = original_metrics[(name, perturbation)], new_metrics[(name, perturbation)]
        for column in LABEL_FREE:
            assert old_row[column] == row[column], f"{name}/{perturbation}: {column}"
        expected = reference_metrics(new_scores, new_members)
        for column in METRIC_COLUMNS:
            if expected[column] is None or isinstance(expected[column], int):
                assert row[column] == expected[column], column
            else:
                assert row[column] == pytest.approx(expected[column], abs=1e-12, rel=0), column
        if row["calibrated_threshold"] is not None:
            assert row["calibrated_accuracy"] == pytest.approx(
                balanced_accuracy_at(row["calibrated_threshold"], new_scores, new_members), abs=1e-12, rel=0
            )
        else:
            assert row["calibrated_accuracy"] is None and row["calibration_note"]


JOINING_ATTACKS = {
    "join_key.sql": "r.model_key = t.model_key AND r.example_id = t.example_id",
    "join_example.sql": "r.example_id = t.example_id",
    "join_name.sql": "r.model_name = t.model_name AND r.example_id = t.example_id",
}


def _joining_attack(folder: Path, filename: str, condition: str) -> Path:
    return write_attack(
        folder,
        filename,
        sql_attack(
            "SELECT t.model_key, t.example_id, coalesce(avg(CAST(r.is_member AS DOUBLE)), 0.5) AS score\n"
            f"FROM target t LEFT JOIN reference r ON {condition} GROUP BY t.model_key, t.example_id",
            needs='["signal", "reference_models"]',
        ),
    )


@pytest.mark.parametrize("filename", sorted(JOINING_ATTACKS))
def test_joining_reference_to_target_scores_at_chance(tmp_path: Path, filename: str):
    """Issue 9: joining `reference` back to `target` read the target's labels (AUC 1.0) when targets were
    scored in one batch. Now every model of the batch is at chance, and its scores are those it gets alone."""
    db, outputs = _fleet(tmp_path, seed=43)
    path = _joining_attack(tmp_path / "attacks", filename, JOINING_ATTACKS[filename])
    (outcome,) = score_attacks(db, [path], resamples=0)  # no intervals: AUC and accuracy are asserted
    assert outcome.scored == 2 * N_MODELS  # benign and pgd, every model in one call
    rows = query(db, "SELECT model_name, perturbation, auc, balanced_accuracy FROM v_metrics")
    assert len(rows) == 2 * N_MODELS
    for row in rows:
        # 120 members / 120 non-members: AUC's standard deviation at chance is 0.037
        assert abs(row["auc"] - 0.5) < 0.15 and row["balanced_accuracy"] < 0.65, row
    batch = all_scores(db)
    for name in outputs:
        alone = tmp_path / f"alone-{name}.duckdb"
        shutil.copy2(db, alone)
        score_attacks(alone, [path], force=True, models=[name], resamples=0)
        for key_tuple, (ids, scores, _) in all_scores(alone).items():
            if (
                query(alone, "SELECT model_name FROM v_models WHERE model_key = $k", k=key_tuple[1])[0][
                    "model_name"
                ]
                == name
            ):
                np.testing.assert_array_equal(ids, batch[key_tuple][0])
                assert np.array_equal(scores, batch[key_tuple][1]), (name, key_tuple)


# ---------------------------------------------------------------- item 2: non-finite scores and foreign ids


@pytest.fixture(scope="module")
def small_fleet(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("small_fleet")
    db, outputs = _fleet(folder, seed=47, n_models=3)
    keys = {r["model_name"]: r["model_key"] for r in query(db, "SELECT model_name, model_key FROM v_models")}
    return db, outputs, keys


BAD_SCORES = {
    "nulls.sql": ("CASE WHEN example_id % 7 = 0 THEN NULL ELSE CAST(confidence AS DOUBLE) END", 7),
    "nans.sql": ("CASE WHEN example_id % 5 = 0 THEN 'nan'::DOUBLE ELSE CAST(confidence AS DOUBLE) END", 5),
    "infs.sql": ("CASE WHEN example_id % 3 = 0 THEN '-inf'::DOUBLE ELSE CAST(confidence AS DOUBLE) END", 3),
}


@pytest.mark.parametrize("filename", sorted(BAD_SCORES))
def test_nonfinite_scores_are_refused_naming_attack_model_and_count(small_fleet, tmp_path: Path, filename):
    db, outputs, keys = small_fleet
    expression, modulus = BAD_SCORES[filename]
    path = write_attack(
        tmp_path, filename, sql_attack(f"SELECT model_key, example_id, {expression} AS score FROM target")
    )
    digest = file_digest(db)
    with pytest.raises(AttackDefinitionError) as raised:
        score_attacks(db, [path])
    message = str(raised.value)
    ids = np.arange(1000, 1240)
    count = int((ids % modulus == 0).sum())
    assert message.startswith(f"{path}: {count} of 240 scores for model half") and "\n" not in message, (
        message
    )
    assert 'nonfinite = "lowest"' in message
    assert file_digest(db) == digest


def test_nonfinite_lowest_ranks_them_last_and_counts_them(small_fleet, tmp_path: Path):
    db, outputs, keys = small_fleet
    db = shutil.copy2(db, tmp_path / "store.duckdb")
    body = "SELECT model_key, example_id, CASE WHEN example_id % 7 = 0 THEN NULL ELSE CAST(confidence AS DOUBLE) END AS score FROM target"
    text = sql_attack(body).replace('-- needs = ["signal"]', '-- needs = ["signal"]\n-- nonfinite = "lowest"')
    path = write_attack(tmp_path, "lowest.sql", text)
    (outcome,) = score_attacks(db, [path])
    assert outcome.scored == 6
    stored = all_scores(db)
    for name, model in outputs.items():
        ids, scores, members = stored[("lowest", keys[name], "benign")]
        expected = reference_scores(model, "confidence", "benign")
        expected[ids % 7 == 0] = -np.inf
        np.testing.assert_allclose(scores, expected, rtol=1e-6)
        row = query(
            db,
            "SELECT * FROM v_metrics WHERE attack = 'lowest' AND model_key = $k AND perturbation = 'benign'",
            k=keys[name],
        )[0]
        assert row["n_nonfinite"] == int((ids % 7 == 0).sum())
        assert (row["n_members"], row["n_nonmembers"]) == (
            int(model.is_member.sum()),
            int((~model.is_member).sum()),
        )
        ref = reference_metrics(scores, members)
        assert row["auc"] == pytest.approx(ref["auc"], abs=1e-12, rel=0)
        assert row["balanced_accuracy"] == pytest.approx(ref["balanced_accuracy"], abs=1e-12, rel=0)


@pytest.mark.parametrize(
    "expression",
    ["example_id + 100000", "CASE WHEN example_id % 10 <> 0 THEN example_id + 100000 ELSE example_id END"],
)
def test_foreign_example_ids_are_refused_and_nothing_is_stored(small_fleet, tmp_path: Path, expression):
    db, _, _ = small_fleet
    db = shutil.copy2(db, tmp_path / "store.duckdb")
    score_attacks(db, ["confidence"])
    before = row_counts(db)
    path = write_attack(
        tmp_path,
        "moved.sql",
        sql_attack(
            f"SELECT model_key, CAST({expression} AS INTEGER) AS example_id, CAST(confidence AS DOUBLE) AS score FROM target"
        ),
    )
    result = CliRunner().invoke(main, ["score", "--attack", str(path), "--db", str(db)])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "for example ids that model half" in result.stderr, (
        result.stderr
    )
    assert "does not have (e.g. " in result.stderr and "Traceback" not in result.stderr
    assert row_counts(db) == before
    orphans = query(
        db,
        "SELECT count(*) AS n FROM scores s ANTI JOIN membership b ON b.model_key = s.model_key AND b.example_id = s.example_id",
    )[0]["n"]
    assert orphans == 0


# ---------------------------------------------------------------- item 3: name clashes


def test_user_attack_named_like_a_builtin_is_refused_unless_replace(small_fleet, tmp_path: Path):
    db, _, _ = small_fleet
    db = shutil.copy2(db, tmp_path / "store.duckdb")
    score_attacks(db, ["confidence"])
    path = write_attack(
        tmp_path / "mine",
        "confidence.sql",
        sql_attack("SELECT model_key, example_id, -loss AS score FROM target"),
    )
    digest = file_digest(db)
    for args in (
        ["score", "--attack", str(path)],
        ["score", "--attacks", str(path.parent)],
        ["attacks", "--attacks", str(path.parent)],
    ):
        result = CliRunner().invoke(main, [*args, "--db", str(db)] if args[0] == "score" else args)
        assert result.exit_code == 1, (args, result.output)
        assert result.stderr == (
            f"Error: {path}: is named 'confidence' like the built-in attack; rename it, or pass --replace to "
            "score it under that name instead\n"
        )
    assert file_digest(db) == digest
    result = CliRunner().invoke(main, ["score", "--attack", str(path), "--replace", "--db", str(db)])
    assert result.exit_code == 0, result.output
    sources = query(db, "SELECT DISTINCT source_path FROM v_attacks WHERE attack = 'confidence' ORDER BY ALL")
    assert str(path) in [r["source_path"] for r in sources]


def test_user_attack_named_like_a_stored_one_from_another_file_is_refused(small_fleet, tmp_path: Path):
    db, _, _ = small_fleet
    db = shutil.copy2(db, tmp_path / "store.duckdb")
    first = write_attack(
        tmp_path / "a", "mine.sql", sql_attack("SELECT model_key, example_id, -loss AS score FROM target")
    )
    second = write_attack(
        tmp_path / "b", "mine.sql", sql_attack("SELECT model_key, example_id, margin AS score FROM target")
    )
    score_attacks(db, [first])
    # editing the same file is a new version of the same attack: allowed
    first.write_text(sql_attack("SELECT model_key, example_id, -2 * loss AS score FROM target"))
    assert score_attacks(db, [first])[0].scored == 6
    with pytest.raises(
        AttackDefinitionError,
        match=r"is named 'mine' like the stored attack from .*a/mine\.sql; rename it, or pass --replace",
    ):
        score_attacks(db, [second])
    assert score_attacks(db, [second], replace=True)[0].scored == 6


# ---------------------------------------------------------------- item 4: options that match nothing


def test_options_that_match_nothing_are_one_line_errors(small_fleet, tmp_path: Path):
    db, _, _ = small_fleet
    db = shutil.copy2(db, tmp_path / "store.duckdb")
    digest = file_digest(db)
    cases = {
        (
            "score",
            "--attack",
            "confidence",
            "--param",
            "nope=1",
        ): "Error: --param nope: no selected attack declares it (declared: none)\n",
        (
            "score",
            "--model",
            "nosuchmodel",
        ): f"Error: --model nosuchmodel: no such completed model in {db} (see robmia-db models)\n",
        (
            "models",
            "--experiment",
            "nope",
        ): f"Error: --experiment nope: no such experiment in {db} (experiments: imported)\n",
        (
            "report",
            "--experiment",
            "nope",
        ): f"Error: --experiment nope: no such experiment in {db} (experiments: imported)\n",
    }
    for args, expected in cases.items():
        result = CliRunner().invoke(main, [*args, "--db", str(db)])
        assert result.exit_code == 1, (args, result.output)
        assert result.stderr == expected, args
    assert file_digest(db) == digest
    result = CliRunner().invoke(
        main, ["score", "--attack", "class_thresholds", "--param", "nope=1", "--db", str(db)]
    )
    assert (
        result.stderr
        == "Error: --param nope: no selected attack declares it (declared: class_thresholds: signal)\n"
    )


# ---------------------------------------------------------------- items 6, 7: decision rules, low FPR, fleets


def test_decision_rule_metrics_against_numpy(small_fleet, tmp_path: Path):
    db, outputs, keys = small_fleet
    db = shutil.copy2(db, tmp_path / "store.duckdb")
    text = sql_attack(
        "SELECT model_key, example_id, CAST(confidence AS DOUBLE) AS score FROM target"
    ).replace('-- needs = ["signal"]', '-- needs = ["signal"]\n-- decision_threshold = 0.9')
    path = write_attack(tmp_path, "ruled.sql", text)
    score_attacks(db, [path, "confidence"])
    stored = all_scores(db)
    checked = partial = 0
    for name in outputs:
        for perturbation in ("benign", "pgd"):
            _, scores, members = stored[("ruled", keys[name], perturbation)]
            predicted = scores >= 0.9
            tpr, fpr = predicted[members].mean(), predicted[~members].mean()
            row = query(
                db,
                "SELECT * FROM v_metrics WHERE attack = 'ruled' AND model_key = $k AND perturbation = $p",
                k=keys[name],
                p=perturbation,
            )[0]
            assert row["decision_threshold"] == 0.9
            assert row["decision_tpr"] == pytest.approx(tpr, abs=1e-15, rel=0)
            assert row["decision_fpr"] == pytest.approx(fpr, abs=1e-15, rel=0)
            assert row["decision_accuracy"] == pytest.approx(0.5 * (tpr + 1 - fpr), abs=1e-15, rel=0)
            checked += 1
            partial += 0 < tpr < 1 and 0 < fpr < 1
    assert checked == 6 and partial >= 3
    plain = query(
        db,
        "SELECT decision_threshold, decision_accuracy, decision_tpr, decision_fpr FROM v_metrics WHERE attack = 'confidence'",
    )
    assert plain and all(set(r.values()) == {None} for r in plain)


def test_fleet_metrics_pool_the_targets_of_a_recipe(fleet):
    """One ROC over the concatenated scores of the fleet's targets (as LiRA reports), with its count."""
    db, _, keys, outputs, _ = fleet
    stored = all_scores(db)
    rows = query(db, "SELECT * FROM v_fleet_metrics")
    assert {(r["attack"], r["perturbation"]) for r in rows} == {(a, p) for a, _, p in stored}
    for row in rows:
        pooled = [
            stored[(row["attack"], k, row["perturbation"])]
            for k in keys.values()
            if (row["attack"], k, row["perturbation"]) in stored
        ]
        scores = np.concatenate([p[1] for p in pooled])
        members = np.concatenate([p[2] for p in pooled])
        assert row["n_targets"] == len(pooled)
        expected = reference_metrics(scores, members)
        for column in ("balanced_accuracy", "auc", "tpr_at_fpr_0", "tpr_at_fpr_1e2", "advantage"):
            assert row[column] == pytest.approx(expected[column], abs=1e-12, rel=0), (row["attack"], column)
        assert row["tpr_at_fpr_1e3"] is None and row["tpr_at_fpr_1e4"] is None
        assert (row["n_members"], row["n_nonmembers"]) == (int(members.sum()), int((~members).sum()))
        assert row["low_fpr_note"] == low_fpr_note(row["n_nonmembers"])
        assert (
            row["low_fpr_note"]
            == "480 non-members cannot resolve FPR 0.01% (needs 10,000), 0.1% (needs 1,000)"
        )
    confidence = [r for r in rows if r["attack"] == "confidence"]
    assert confidence and all(r["n_targets"] == N_MODELS for r in confidence)


def test_per_target_low_fpr_note(fleet):
    db = fleet[0]
    rows = query(db, "SELECT n_nonmembers, tpr_at_fpr_1e2, tpr_at_fpr_1e3, low_fpr_note FROM v_metrics")
    assert rows
    for row in rows:
        assert (
            row["n_nonmembers"] == 120 and row["tpr_at_fpr_1e3"] is None and row["tpr_at_fpr_1e2"] is not None
        )
        assert (
            row["low_fpr_note"]
            == "120 non-members cannot resolve FPR 0.01% (needs 10,000), 0.1% (needs 1,000)"
        )


# ---------------------------------------------------------------- item 8: one transaction per attack run


def test_failure_between_metrics_and_calibration_leaves_nothing_and_rerun_completes(
    small_fleet, tmp_path: Path, monkeypatch
):
    """Issue 14 item 2: a kill -9 (and a failing disk) between the metrics and the calibration, inside the
    attack's one transaction: nothing is stored, and the rerun stores exactly what an uninterrupted run does."""
    db, _, _ = small_fleet
    db = shutil.copy2(db, tmp_path / "store.duckdb")
    clean = shutil.copy2(db, tmp_path / "clean.duckdb")
    score_attacks(clean, ["confidence"], resamples=0)
    before = row_counts(db)
    killed = subprocess.run(
        _cli("score", "--attack", "confidence", "--resamples", "0", "--db", str(db)),
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "ROBMIA_TEST_KILL_AT": BEFORE_CALIBRATION},
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert row_counts(db) == before
    monkeypatch.setenv("ROBMIA_TEST_FAIL_AT", BEFORE_CALIBRATION)
    with pytest.raises(OSError):
        score_attacks(db, ["confidence"], resamples=0)
    assert row_counts(db) == before
    monkeypatch.delenv("ROBMIA_TEST_FAIL_AT")
    (outcome,) = score_attacks(db, ["confidence"], resamples=0)
    assert outcome.scored == 6
    columns = "model_key, perturbation, balanced_accuracy, calibrated_accuracy, calibrated_threshold, n_reference_models"
    got = query(db, f"SELECT {columns} FROM v_metrics ORDER BY ALL")
    assert got == query(clean, f"SELECT {columns} FROM v_metrics ORDER BY ALL")
    assert all(r["calibrated_accuracy"] is not None and r["n_reference_models"] == 2 for r in got)


# ---------------------------------------------------------------- item 9: time limit and Ctrl-C

RUNAWAY = sql_attack(
    "SELECT a.model_key, a.example_id, CAST(count(*) AS DOUBLE) AS score\n"
    "FROM target a, target b, target c, target d GROUP BY a.model_key, a.example_id"
)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "robmia_db", *args]


def test_runaway_query_stopped_by_timeout(small_fleet, tmp_path: Path):
    db, _, _ = small_fleet
    db = shutil.copy2(db, tmp_path / "store.duckdb")
    digest = file_digest(db)
    path = write_attack(tmp_path, "runaway.sql", RUNAWAY)
    started = time.monotonic()
    result = subprocess.run(
        _cli("score", "--attack", str(path), "--time-limit", "1.5", "--db", str(db)),
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert time.monotonic() - started < 30
    assert (
        result.stderr.count("\n") == 1
        and "ran past the time limit of 1.5 s (score --time-limit)" in result.stderr
    )
    assert "nothing of this attack was stored" in result.stderr and "Traceback" not in result.stderr
    assert file_digest(db) == digest


def _as_from_a_terminal() -> None:
    """SIGINT as a terminal's Ctrl-C finds it. A suite started in the background by a shell without job
    control (`cmd &` in a script, as CI runners do) inherits SIGINT ignored; Python then installs no
    KeyboardInterrupt handler, and a child that ignores SIGINT rightly ignores our Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_a_running_attack_query_within_a_second(small_fleet, tmp_path: Path):
    db, _, _ = small_fleet
    db = shutil.copy2(db, tmp_path / "store.duckdb")
    digest = file_digest(db)
    path = write_attack(tmp_path, "runaway.sql", RUNAWAY)
    process = subprocess.Popen(
        _cli("score", "--attack", str(path), "--db", str(db)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_as_from_a_terminal,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )  # fmt: skip
    try:
        time.sleep(6)  # start-up and planning take about 2 s on a loaded 2-core machine
        assert process.poll() is None, process.communicate()
        sent = time.monotonic()
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
        stopped = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1, stderr
    assert stopped < 3.0, stopped  # within ~1 s; slack for a loaded machine
    assert stderr.count("\n") == 1 and "interrupted (Ctrl-C)" in stderr and "Traceback" not in stderr, stderr
    assert file_digest(db) == digest


# ---------------------------------------------------------------- item 10: trust boundary


def test_python_attacks_listed_without_running_and_marked_trusted(small_fleet, tmp_path: Path):
    db, _, _ = small_fleet
    db = shutil.copy2(db, tmp_path / "store.duckdb")
    marker = tmp_path / "ran.txt"
    folder = tmp_path / "py"
    write_attack(
        folder,
        "side_effect.py",
        f"""from pathlib import Path
Path({str(marker)!r}).write_text("imported")
ATTACK = {{"title": "writes a file when imported", "needs": ["signal"]}}


def score(ctx, params):
    return ctx.sql("SELECT model_key, example_id, -loss AS score FROM target")
""",
    )
    result = CliRunner().invoke(main, ["attacks", "--attacks", str(folder)])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.stdout.splitlines() if x.startswith("side_effect"))
    assert "[python: trusted code]" in line
    assert not marker.exists(), "listing attacks executed a Python attack"
    assert "trusted code" in CliRunner().invoke(main, ["attacks", "--help"]).stdout
    assert score_attacks(db, [folder / "side_effect.py"])[0].scored == 6
    assert marker.exists()
    rows = query(
        db,
        "SELECT attack, language, trust FROM v_attacks WHERE attack IN ('side_effect', 'confidence') ORDER BY ALL",
    )
    assert rows == [
        {
            "attack": "side_effect",
            "language": "python",
            "trust": "trusted code (Python, runs with your rights)",
        }
    ]
    from robmia_db.report import build_report

    score_attacks(db, ["confidence"])
    page = build_report(db, output=tmp_path / "report.html").read_text()
    rows_html = {
        line.split('"')[1]: line
        for line in page.splitlines()
        if line.startswith("<tr data-attack=") and "data-perturbation" not in line  # the attacks table
    }
    assert "Python: trusted code" in rows_html["side_effect"]
    assert "trusted code" not in rows_html["confidence"]
