"""Bounded memory (issue 14 item 15) and a full disk during `score` (item 12), through the real CLI.

Scoring streams: each part of a run is read, scored and staged (in memory up to STAGE_ROWS_IN_MEMORY rows,
past that to Parquet files beside the store; ROBMIA_TEST_STAGE_ROWS=0 makes a small store use the files),
and the store is written in one transaction at the end. These tests check that the parts give exactly the
numbers of one pass (independent references: scikit-learn and numpy on the stored rows), that a full
disk or a kill while staging or writing leaves the store as it was, and that the rerun completes it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from attack_fixtures import import_synthetic, synthetic_outputs
from conftest import clean_env, one_line_error
from sklearn.metrics import roc_auc_score

from robmia_db.attacks import results, scoring, staging
from robmia_db.attacks.intervals import bootstrap_intervals
from robmia_db.attacks.results import BEFORE_CALIBRATION, STAGING_SCORES
from robmia_db.attacks.scoring import score_attacks

RESULT_TABLES = ("scores", "metrics", "metric_intervals", "fleet_metrics", "attacks", "attack_skips")


def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "robmia_db", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(**env),
    )


def query(db: Path, sql: str) -> list[tuple]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def counts(db: Path) -> dict[str, int]:
    return {t: query(db, f"SELECT count(*) FROM {t}")[0][0] for t in RESULT_TABLES}


def metrics(db: Path) -> list[tuple]:
    return query(
        db,
        """SELECT model_name, attack, perturbation, balanced_accuracy, auc, tpr_at_fpr_1e2, n_members,
                  calibrated_accuracy, n_reference_models, balanced_accuracy_ci_low, auc_ci_high
           FROM v_metrics ORDER BY ALL""",
    )


def scratch_folders(db: Path) -> list[Path]:
    return sorted(db.parent.glob(f".{db.name}.score-tmp*"))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Path:
    """Four imported models of one dataset (reference models for each other), two perturbations each."""
    folder = tmp_path_factory.mktemp("fleet")
    db = folder / "store.duckdb"
    ids = np.arange(600)
    outputs = {
        f"m{i}": synthetic_outputs(10 + i, n=600, n_classes=10, example_id=ids, labels=np.arange(600) % 10)
        for i in range(4)
    }
    import_synthetic(db, folder / "npz", outputs, dataset="shared")
    return db


def test_scoring_in_parts_gives_the_numbers_of_one_pass(fleet, tmp_path, monkeypatch):
    """Parts of one model each (ROWS_PER_PART below one model) vs one part for all: the same rows."""
    whole = shutil.copy2(fleet, tmp_path / "whole.duckdb")
    parts = shutil.copy2(fleet, tmp_path / "parts.duckdb")
    in_memory = shutil.copy2(fleet, tmp_path / "in_memory.duckdb")
    score_attacks(whole, ["confidence", "loss"], resamples=50)  # staged in memory, one part
    monkeypatch.setattr(scoring, "ROWS_PER_PART", 1)
    monkeypatch.setattr(results, "METRICS_ROWS_PER_PART", 1)  # and metrics one staged batch at a time
    score_attacks(in_memory, ["confidence", "loss"], resamples=50)
    monkeypatch.setattr(staging, "STAGE_ROWS_IN_MEMORY", 0)  # and every batch staged to a file
    outcomes = score_attacks(parts, ["confidence", "loss"], resamples=50)
    assert [o.scored for o in outcomes] == [8, 8]
    assert metrics(parts) == metrics(whole) == metrics(in_memory)
    got = metrics(parts)
    assert all(row[8] == 3 and row[7] is not None for row in got)  # calibrated on the 3 other models
    # independent references on the stored rows: scikit-learn's AUC and numpy's bootstrap
    for model, attack, perturbation, _, auc, *_ in got:
        scores = query(
            parts,
            f"SELECT score, is_member FROM v_scores WHERE model_name = '{model}' AND attack = '{attack}' "
            f"AND perturbation = '{perturbation}' ORDER BY example_id",
        )
        score = np.array([s for s, _ in scores])
        member = np.array([m for _, m in scores])
        assert len(score) == 600
        assert auc == pytest.approx(roc_auc_score(member, score), abs=1e-12)
    model, attack, perturbation = got[0][:3]
    rows = query(
        parts,
        f"SELECT score, is_member FROM v_scores WHERE model_name = '{model}' AND attack = '{attack}' "
        f"AND perturbation = '{perturbation}' ORDER BY example_id",
    )
    expected = bootstrap_intervals([r[0] for r in rows], [r[1] for r in rows], 50)
    assert got[0][9] == pytest.approx(expected["balanced_accuracy_ci_low"], abs=1e-12)
    assert got[0][10] == pytest.approx(expected["auc_ci_high"], abs=1e-12)
    assert scratch_folders(parts) == []  # the staged scores are removed after the write


@pytest.mark.parametrize("point", [STAGING_SCORES, BEFORE_CALIBRATION])
def test_a_full_disk_during_score_is_one_line_and_keeps_the_store(fleet, tmp_path, point):
    """ENOSPC injected while scores are staged and inside the write transaction: one line, exit 1, the
    store as it was, no scratch files left, and the rerun stores what an uninterrupted run does."""
    db = shutil.copy2(fleet, tmp_path / "s.duckdb")
    clean = shutil.copy2(fleet, tmp_path / "clean.duckdb")
    assert cli("score", "--attack", "confidence", "--resamples", "20", "--db", str(clean)).returncode == 0
    before = counts(db)
    result = cli(
        "score", "--attack", "confidence", "--resamples", "20", "--db", str(db),
        ROBMIA_TEST_FAIL_AT=point, ROBMIA_TEST_STAGE_ROWS="0",
    )  # fmt: skip
    one_line_error(result, "No space left on device")
    assert counts(db) == before
    assert scratch_folders(db) == []
    assert cli("sql", "SELECT count(*) FROM v_metrics", "--db", str(db)).returncode == 0
    assert cli("score", "--attack", "confidence", "--resamples", "20", "--db", str(db)).returncode == 0
    assert metrics(db) == metrics(clean)


def test_a_kill_while_staging_leaves_the_store_and_the_next_score_cleans_up(fleet, tmp_path):
    db = shutil.copy2(fleet, tmp_path / "s.duckdb")
    before = counts(db)
    killed = subprocess.run(
        [sys.executable, "-m", "robmia_db", "score", "--attack", "loss", "--db", str(db)],
        capture_output=True, text=True, timeout=300,
        env=clean_env(ROBMIA_TEST_KILL_AT=STAGING_SCORES, ROBMIA_TEST_STAGE_ROWS="0"),
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert counts(db) == before
    assert len(scratch_folders(db)) == 1  # what kill -9 leaves ...
    assert cli("score", "--attack", "loss", "--resamples", "0", "--db", str(db)).returncode == 0
    assert scratch_folders(db) == []  # ... the next score removes
    assert counts(db)["metrics"] == 8


def test_gc_removes_the_staged_scores_a_killed_score_left_and_keeps_a_live_runs(fleet, tmp_path):
    """kill -9 inside the write transaction (every score staged): the store is unchanged and the staged
    Parquet files stay behind; `gc --dry-run` lists them, `gc` removes them, a live run's folder is kept."""
    db = shutil.copy2(fleet, tmp_path / "s.duckdb")
    before = counts(db)
    killed = subprocess.run(
        [sys.executable, "-m", "robmia_db", "score", "--attack", "loss", "--db", str(db)],
        capture_output=True, text=True, timeout=300,
        env=clean_env(ROBMIA_TEST_KILL_AT=BEFORE_CALIBRATION, ROBMIA_TEST_STAGE_ROWS="0"),
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert counts(db) == before
    [left] = scratch_folders(db)
    staged = list(left.glob("*.parquet"))
    assert staged and sum(pq.read_metadata(f).num_rows for f in staged) == 8 * 600
    live = db.parent / f".{db.name}.score-tmp{os.getpid()}-live"  # this process: alive, so not garbage
    live.mkdir()
    dry = cli("gc", "--dry-run", "--db", str(db))
    assert dry.returncode == 0, dry.stderr
    assert left.name in dry.stdout and "staged scores of a killed score run" in dry.stdout
    assert live.name not in dry.stdout
    assert scratch_folders(db) == sorted([left, live])
    done = cli("gc", "--db", str(db))
    assert done.returncode == 0, done.stderr
    assert "removed 1 file" in done.stdout, done.stdout
    assert scratch_folders(db) == [live]
    assert counts(db) == before
    live.rmdir()
    assert cli("score", "--attack", "loss", "--resamples", "0", "--db", str(db)).returncode == 0
    assert counts(db)["metrics"] == 8


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "tiny"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_score_on_a_really_full_disk_is_one_line_and_the_rerun_completes(fleet, tmp_path, tiny_disk):
    """A real full file system (tmpfs filled up to a few KB): whatever write fails first, staging or the
    store's transaction, the error is one line, the store is unchanged, and after space is freed the rerun
    stores the same numbers as a run on a roomy disk."""
    db = shutil.copy2(fleet, tiny_disk / "s.duckdb")
    clean = shutil.copy2(fleet, tmp_path / "clean.duckdb")
    assert cli("score", "--attack", "loss", "--resamples", "20", "--db", str(clean)).returncode == 0
    before = counts(db)
    filler = tiny_disk / "filler"
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass
    result = cli("score", "--attack", "loss", "--resamples", "20", "--db", str(db))
    one_line_error(result, "No space left on device")
    filler.unlink()
    assert counts(db) == before
    assert scratch_folders(db) == []
    assert cli("score", "--attack", "loss", "--resamples", "20", "--db", str(db)).returncode == 0
    assert metrics(db) == metrics(clean)
    assert os.path.getsize(db) > 0
