"""Reference-attack fleets scored model by model from disk (`attacks/fleet_disk.py`, `score --fleet-memory`).

A real store of a small fleet is scored twice, in memory and with a budget between the two paths' estimates
(so the disk path runs, as it would for a fleet larger than memory): every score and every metric must be
bit-identical, for every built-in reference attack and for a SQL attack that reads the `reference`
relation. The memmaps' scratch folder must be gone after success, an attack's failure and Ctrl-C, and a
budget that even one target's working set exceeds is a one-line error.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from attack_fixtures import all_metrics, all_scores, file_digest, sql_attack, write_attack
from conftest import clean_env, one_line_error
from test_reference_attacks import JOINT, SINGLE, make_fleet

from robmia_db.attacks import fleet_disk, relations
from robmia_db.attacks.planning import plan_units, read_state, reference_models
from robmia_db.attacks.registry import load_registry
from robmia_db.attacks.scoring import score_attacks
from robmia_db.errors import RobmiaError
from robmia_db.store.connection import reading

BUILTIN = [*SINGLE, *JOINT, "attack_model", "shokri"]
# columns of v_metrics that are timestamps or durations of the run, not numbers of the attack
RUN_COLUMNS = {"created_at", "seconds"}

REFERENCE_SQL = sql_attack(
    """SELECT t.model_key, t.example_id, t.confidence - avg(r.confidence) AS score
FROM target t JOIN reference r ON r.example_id = t.example_id AND r.target_model_key = t.model_key
GROUP BY t.model_key, t.example_id, t.confidence""",
    title="target confidence minus the references' mean",
    needs='["signal", "reference_models"]',
)

SLOW_PY = """import time
from pathlib import Path

ATTACK = {"title": "reads references, then waits", "needs": ["signal", "reference_models"]}


def score(ctx, params):
    for key, target in ctx.targets("phi").items():
        ctx.references(key, "phi", None, target["example_id"])
    Path(params["marker"]).write_text("matrices built")
    if params["fail"]:
        raise ValueError("failing on purpose after the fleet was written")
    while True:
        time.sleep(0.05)
"""


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return make_fleet(tmp_path_factory.mktemp("disk"), seed=5, n_models=4, n=80).db


def scratch(db: Path) -> list[Path]:
    return sorted(db.parent.glob(f".{db.name}.score-tmp*"))


def estimates(db: Path, attack_name: str, paths: list[Path] | None = None) -> list[fleet_disk.FleetEstimate]:
    """The planner's groups of `attack_name` on `db` and their estimates, as `score` computes them."""
    registry = load_registry(list(paths or []))
    attack = registry.get(attack_name)
    with reading(db) as con:
        state = read_state(con)
        units, _ = plan_units(attack, state, reference_models(state), None)
        groups: dict[tuple, list] = {}
        for unit in units:
            groups.setdefault(tuple(sorted(unit.inputs.items())), []).append(unit)
        return [fleet_disk.estimate(con, group) for group in groups.values()]


def budget_between(db: Path, attack_name: str, paths: list[Path] | None = None) -> int:
    """A budget that every group's in-memory estimate exceeds and every bounded estimate fits."""
    found = estimates(db, attack_name, paths)
    low, high = max(e.bounded for e in found), min(e.in_memory for e in found)
    assert low < high, (attack_name, low, high)
    return (low + high) // 2


class Counting(fleet_disk.DiskFleet):
    """The real DiskFleet, counted, with its scratch folder remembered (to see that it existed)."""

    made: list[Path] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        Counting.made.append(self.folder)


def same_metrics(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        left = {k: v for k, v in a[key].items() if k not in RUN_COLUMNS}
        right = {k: v for k, v in b[key].items() if k not in RUN_COLUMNS}
        differing = [
            k for k in left if left[k] != right[k] and not (left[k] != left[k] and right[k] != right[k])
        ]
        assert not differing, (key, {k: (left[k], right[k]) for k in differing})


@pytest.mark.parametrize("attack", BUILTIN)
def test_disk_path_scores_and_metrics_equal_the_in_memory_path(small, tmp_path, monkeypatch, attack):
    memory = shutil.copy2(small, tmp_path / "memory.duckdb")
    disk = shutil.copy2(small, tmp_path / "disk.duckdb")
    score_attacks(memory, [attack], resamples=20, calibration_models=2)
    Counting.made = []
    monkeypatch.setattr(relations, "DiskFleet", Counting)
    (outcome,) = score_attacks(
        disk, [attack], resamples=20, calibration_models=2, fleet_memory=budget_between(disk, attack)
    )
    groups = len(estimates(disk, attack))
    assert outcome.scored > 0 and len(Counting.made) == groups  # one fleet on disk per group of inputs
    assert all(not folder.exists() for folder in Counting.made) and scratch(disk) == []
    got, want = all_scores(disk), all_scores(memory)
    assert got.keys() == want.keys() and len(got) == outcome.scored
    for key in want:
        for g, w in zip(got[key], want[key], strict=True):
            np.testing.assert_array_equal(g, w, err_msg=str(key))  # bit-identical, NaN where NaN
    same_metrics(all_metrics(disk), all_metrics(memory))


def test_a_sql_attack_reading_the_reference_relation_gets_the_same_rows(small, tmp_path, monkeypatch):
    path = write_attack(tmp_path, "ref_mean.sql", REFERENCE_SQL)
    memory = shutil.copy2(small, tmp_path / "memory.duckdb")
    disk = shutil.copy2(small, tmp_path / "disk.duckdb")
    score_attacks(memory, [path], resamples=0, calibration_models=2)
    Counting.made = []
    monkeypatch.setattr(relations, "DiskFleet", Counting)
    budget = budget_between(disk, "ref_mean", [path])
    score_attacks(disk, [path], resamples=0, calibration_models=2, fleet_memory=budget)
    assert Counting.made and scratch(disk) == []
    got, want = all_scores(disk), all_scores(memory)
    assert got.keys() == want.keys() and got
    for key in want:
        np.testing.assert_array_equal(got[key][1], want[key][1])
    same_metrics(all_metrics(disk), all_metrics(memory))


def test_fleet_matrix_on_disk_equals_the_dense_one(small, tmp_path):
    """The memmaps hold what `build_fleet_matrix` builds from the in-memory relation, array for array."""
    from robmia_db.attacks.fleet import build_fleet_matrix

    registry = load_registry([])
    attack = registry.get("lira_online")
    with reading(small) as con:
        state = read_state(con)
        units, _ = plan_units(attack, state, reference_models(state), None)
        group = [u for u in units if u.perturbation == "pgd"]
        in_memory = relations.read_relations(con, attack, group)
    for column, kind in [("phi", None), ("p_true", None), ("mentropy", None)]:
        dense = build_fleet_matrix(in_memory["reference"], column)
        with fleet_disk.DiskFleet(small, group) as fleet:
            on_disk = fleet.matrix(column, kind)
            assert on_disk.model_keys == dense.model_keys
            for name in ("example_id", "values", "is_member", "present", "label", "order"):
                np.testing.assert_array_equal(getattr(on_disk, name), getattr(dense, name), err_msg=name)
            folder = fleet.folder
            assert folder is not None and sorted(p.suffix for p in folder.iterdir()) == [".npy"] * 5
        assert not folder.exists()


def test_sizes_and_budget_parse():
    assert fleet_disk.parse_size("2GB") == 2 * 10**9
    assert fleet_disk.parse_size("1.5 GiB") == 3 * 2**29
    assert fleet_disk.parse_size("500mb") == 5 * 10**8
    assert fleet_disk.parse_size(123) == 123
    for bad in ("lots", "-1GB", "0", "3XB"):
        with pytest.raises(RobmiaError, match="give a size"):
            fleet_disk.parse_size(bad)
    assert fleet_disk.fleet_budget("1GB") == 10**9
    available = fleet_disk.available_memory()
    assert 0 < fleet_disk.fleet_budget(None) <= available or os.environ.get(fleet_disk.FLEET_MEMORY_ENV)


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "robmia_db", *args], capture_output=True, text=True, timeout=300,
        env=clean_env(**env),
    )  # fmt: skip


def test_a_budget_too_small_even_model_by_model_is_one_line_and_changes_nothing(small, tmp_path):
    db = shutil.copy2(small, tmp_path / "s.duckdb")
    digest = file_digest(db)
    result = _cli("score", "--attack", "lira_online", "--fleet-memory", "1KB", "--db", str(db))
    one_line_error(result, "lira_online", "even scored model by model", "--fleet-memory")
    result = _cli("score", "--attack", "lira_online", "--db", str(db), ROBMIA_FLEET_MEMORY="1KB")
    one_line_error(result, "ROBMIA_FLEET_MEMORY")
    one_line_error(_cli("score", "--fleet-memory", "plenty", "--db", str(db)), "--fleet-memory", "plenty")
    assert file_digest(db) == digest and scratch(db) == []


def test_the_scratch_folder_is_removed_when_the_attack_fails(small, tmp_path):
    db = shutil.copy2(small, tmp_path / "s.duckdb")
    path = write_attack(
        tmp_path, "slow.py", SLOW_PY.replace('"needs"', '"params": {"marker": "", "fail": 0}, "needs"')
    )
    marker = tmp_path / "marker"
    budget = budget_between(db, "slow", [path])
    result = _cli(
        "score", "--attack", str(path), "--param", f"marker={marker}", "--param", "fail=1",
        "--fleet-memory", str(budget), "--db", str(db),
    )  # fmt: skip
    one_line_error(result, "failing on purpose")
    assert marker.exists() and scratch(db) == []


def _as_from_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # see test_scoring_integrity: a background suite ignores it


def test_ctrl_c_removes_the_scratch_folder(small, tmp_path):
    db = shutil.copy2(small, tmp_path / "s.duckdb")
    digest = file_digest(db)
    path = write_attack(
        tmp_path, "slow.py", SLOW_PY.replace('"needs"', '"params": {"marker": "", "fail": 0}, "needs"')
    )
    marker = tmp_path / "marker"
    budget = budget_between(db, "slow", [path])
    process = subprocess.Popen(
        [sys.executable, "-m", "robmia_db", "score", "--attack", str(path), "--param", f"marker={marker}",
         "--fleet-memory", str(budget), "--db", str(db)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_as_from_a_terminal,
        env=clean_env(),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.1)
        assert marker.exists(), process.communicate()
        assert len(scratch(db)) == 1 and list(scratch(db)[0].glob("*.npy"))  # the memmaps, while it runs
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1, stderr
    assert "interrupted (Ctrl-C)" in stderr and "Traceback" not in stderr, stderr
    assert scratch(db) == [] and file_digest(db) == digest


def test_the_python_api_passes_fleet_memory(small, tmp_path, monkeypatch):
    from robmia_db.api import Store

    memory = shutil.copy2(small, tmp_path / "memory.duckdb")
    disk = shutil.copy2(small, tmp_path / "disk.duckdb")
    Store(memory).score(["rmia_online"], calibration_models=0)
    Counting.made = []
    monkeypatch.setattr(relations, "DiskFleet", Counting)
    Store(disk).score(["rmia_online"], calibration_models=0, fleet_memory=budget_between(disk, "rmia_online"))
    assert len(Counting.made) == 3 and scratch(disk) == []  # one group per perturbation
    got, want = all_scores(disk), all_scores(memory)
    assert got.keys() == want.keys() and all(np.array_equal(got[k][1], want[k][1]) for k in want)
