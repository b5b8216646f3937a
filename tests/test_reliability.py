"""Reliability through the real CLI on real stores (issue 14): crash windows, foreign files, locks.

Kill points are injected with the test-only `ROBMIA_TEST_KILL_AT` hook (robmia_db/testhooks.py) where a
timer-based kill would land in a 50 ms window only by luck.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest
from attack_fixtures import synthetic_outputs
from conftest import clean_env

from robmia_db.store.schema import SCHEMA_VERSION


def cli(*args: str, timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "robmia_db", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env(**env),
    )


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 1 with exactly one `Error:` line and no traceback; returns the line."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


@pytest.fixture
def outputs_npz(tmp_path: Path) -> Path:
    return synthetic_outputs(3, n=80, n_classes=4).save(tmp_path / "outputs.npz")


def tables(db: Path) -> set[str]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    finally:
        con.close()


# ---- item 1: store creation is atomic; a half-created store is finished by a write command


def test_a_kill_while_the_store_is_created_leaves_a_store_the_next_write_finishes(tmp_path, outputs_npz):
    db = tmp_path / "s.duckdb"
    killed = cli(
        "import", str(outputs_npz), "--format", "npz", "--db", str(db), ROBMIA_TEST_KILL_AT="store-migrating"
    )
    assert killed.returncode == -signal.SIGKILL
    assert db.exists() and tables(db) == set()  # the migration rolled back as a whole
    one_line_error(cli("sql", "SELECT 1", "--db", str(db)), "not a robmia-db store yet", "robmia-db import")
    done = cli("import", str(outputs_npz), "--format", "npz", "--db", str(db))
    assert done.returncode == 0, done.stderr
    rows = cli(
        "sql", "SELECT count(DISTINCT example_id) AS n FROM v_signals", "--db", str(db), "--format", "csv"
    )
    assert rows.stdout.splitlines() == ["n", "80"]


def test_a_store_left_with_an_empty_schema_version_is_finished_not_refused(tmp_path, outputs_npz):
    """The state the old per-migration transactions left after a kill: only an empty schema_version."""
    db = tmp_path / "old-half.duckdb"
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at TIMESTAMPTZ)")
    con.close()
    one_line_error(cli("sql", "SELECT 1", "--db", str(db)), "robmia-db run SPEC")
    assert cli("import", str(outputs_npz), "--format", "npz", "--db", str(db)).returncode == 0
    version = cli("sql", "SELECT max(version) AS v FROM schema_version", "--db", str(db), "--format", "csv")
    assert version.stdout.splitlines() == ["v", str(SCHEMA_VERSION)]


def test_import_refuses_a_foreign_duckdb_file_and_leaves_it_untouched(tmp_path, outputs_npz):
    db = tmp_path / "foreign.duckdb"
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE accounts AS SELECT 42 AS balance")
    con.close()
    one_line_error(
        cli("import", str(outputs_npz), "--format", "npz", "--db", str(db)), "is not a robmia-db store"
    )
    assert tables(db) == {"accounts"}


def test_dropped_views_are_an_error_on_read_and_recreated_by_a_write(tmp_path, outputs_npz):
    db = tmp_path / "s.duckdb"
    assert cli("import", str(outputs_npz), "--format", "npz", "--db", str(db)).returncode == 0
    con = duckdb.connect(str(db))
    con.execute("DROP VIEW v_models")
    con.close()
    one_line_error(cli("models", "--db", str(db)), "v_models", "recreates the views")
    assert (
        cli("import", str(outputs_npz), "--format", "npz", "--db", str(db), "--name", "again").returncode == 0
    )
    assert cli("models", "--db", str(db)).returncode == 0


# ---- item 9: a symlink and its target share one run lock


def test_a_symlinked_store_shares_the_run_lock_of_its_target(tmp_path, write_spec):
    from robmia_db.store.connection import run_lock

    db = tmp_path / "s.duckdb"
    link = tmp_path / "link.duckdb"
    link.symlink_to(db)
    spec = write_spec({"training": {"defenses": ["natural"], "epochs": 1}})
    with run_lock(db, command="the test's own run"):
        result = cli("run", str(spec), "--db", str(link))
    one_line_error(result, "is being written by", f"process {os.getpid()}", "the test's own run")
    assert not db.exists()


# ---- items 3, 4, 5, 6: leftovers, checkpoint integrity, lost checkpoints, diverged training

EXTRA_SIGNALS = {
    "signals": [
        {"kind": "benign", "name": "benign"},
        {"kind": "adversarial", "name": "pgd", "eps": "auto", "steps": 20},
        {"kind": "adversarial", "name": "pgd5", "eps": "auto", "steps": 5},
    ]
}


def rows(db: Path, sql: str) -> list[tuple]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def model_keys(db: Path) -> dict[str, str]:
    return dict(rows(db, "SELECT model_name, model_key FROM models"))


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_leftover_tmp_files_of_dead_processes_are_cleaned_by_the_next_run(trained_store, tmp_path):
    db = trained_store.copy_to(tmp_path / "s")
    folder = db.with_name("store.checkpoints")
    key = model_keys(db)["tiny/natural-s0"]
    dead = folder / f"{key}.pt.tmp{dead_pid()}"
    dead.touch()
    alive = folder / f"{key}.pt.tmp{os.getpid()}"  # a live process may still be writing it
    alive.touch()
    result = cli("run", str(trained_store.spec_path), "--db", str(db))
    assert result.returncode == 0, result.stderr
    assert not dead.exists() and alive.exists()


def test_swapped_checkpoints_fail_their_models_instead_of_storing_the_other_models_signals(
    trained_store, tmp_path, write_spec
):
    db = trained_store.copy_to(tmp_path / "s")
    keys = model_keys(db)
    folder = db.with_name("store.checkpoints")
    a, b = folder / f"{keys['tiny/natural-s0']}.pt", folder / f"{keys['tiny/pgd_at-eps0.1-s0']}.pt"
    a.rename(tmp_path / "swap")
    b.rename(a)
    (tmp_path / "swap").rename(b)
    spec = write_spec(EXTRA_SIGNALS)
    result = cli("run", str(spec), "--db", str(db))
    assert result.returncode == 1
    assert "sha256 differs" in result.stderr and "--retrain" in result.stderr
    stored = rows(db, "SELECT model_name, status, error FROM v_models ORDER BY model_name")
    assert [(name, status) for name, status, _ in stored] == [
        ("tiny/natural-s0", "completed"),
        ("tiny/pgd_at-eps0.1-s0", "completed"),
    ]
    assert all("sha256 differs" in error for _, _, error in stored)
    assert rows(db, "SELECT count(*) FROM perturbations WHERE name = 'pgd5'") == [(0,)]

    # without a recorded hash (a store from before it was recorded) the file's own model key refuses it
    con = duckdb.connect(str(db))
    con.execute("UPDATE models SET checkpoint_sha256 = NULL")
    con.close()
    result = cli("run", str(spec), "--db", str(db))
    assert result.returncode == 1
    natural_error = rows(db, "SELECT error FROM v_models WHERE model_name = 'tiny/natural-s0'")[0][0]
    assert f"holds model {keys['tiny/pgd_at-eps0.1-s0']}" in natural_error
    assert rows(db, "SELECT count(*) FROM perturbations WHERE name = 'pgd5'") == [(0,)]


def test_a_cnn_checkpoint_under_an_mlp_key_is_refused(trained_store, tmp_path, write_spec):
    from robmia_db.runner.models import build_model, save_checkpoint

    db = trained_store.copy_to(tmp_path / "s")
    key = model_keys(db)["tiny/natural-s0"]
    target = db.with_name("store.checkpoints") / f"{key}.pt"
    cnn = build_model("cnn", (1, 8, 8), 10, 1.0)
    meta = {"arch": "cnn", "input_shape": [1, 8, 8], "n_classes": 10, "width": 1.0, "options": {}}
    save_checkpoint(target, cnn, {**meta, "model_key": key})
    con = duckdb.connect(str(db))
    con.execute("UPDATE models SET checkpoint_sha256 = NULL")  # only the file's own record can tell
    con.close()
    result = cli("run", str(write_spec(EXTRA_SIGNALS)), "--db", str(db))
    assert result.returncode == 1
    error = rows(db, f"SELECT error FROM v_models WHERE model_key = '{key}'")[0][0]
    assert "(cnn, arch 'cnn')" in error and "(mlp, arch 'mlp')" in error


def test_a_lost_checkpoint_is_recorded_and_retrain_brings_the_model_back(trained_store, tmp_path, write_spec):
    db = trained_store.copy_to(tmp_path / "s")
    key = model_keys(db)["tiny/natural-s0"]
    checkpoint = db.with_name("store.checkpoints") / f"{key}.pt"
    checkpoint.unlink()
    benign_before = rows(db, f"SELECT example_id, loss FROM v_signals WHERE model_key = '{key}' "
                         "AND perturbation = 'benign' ORDER BY example_id")  # fmt: skip
    spec = write_spec(EXTRA_SIGNALS)
    result = cli("run", str(spec), "--db", str(db))
    assert result.returncode == 1 and "v_models.error" in result.stdout + result.stderr
    status, error = rows(db, f"SELECT status, error FROM v_models WHERE model_key = '{key}'")[0]
    assert status == "completed" and "is missing" in error and f"--retrain {key}" in error

    result = cli("run", str(spec), "--db", str(db), "--retrain", "tiny/natural-s0")
    assert result.returncode == 0, result.stderr
    assert checkpoint.exists()
    assert rows(db, f"SELECT status, error FROM v_models WHERE model_key = '{key}'") == [("completed", None)]
    assert rows(db, f"SELECT count(*) FROM perturbations WHERE model_key = '{key}'") == [(3,)]
    benign_after = rows(db, f"SELECT example_id, loss FROM v_signals WHERE model_key = '{key}' "
                        "AND perturbation = 'benign' ORDER BY example_id")  # fmt: skip
    assert benign_after == benign_before  # same seed, one thread: the retrained model is the same model
    one_line_error(cli("run", str(spec), "--db", str(db), "--retrain", "nope"), "--retrain nope")


def test_checkpoints_are_found_after_the_store_is_renamed(trained_store, tmp_path, write_spec):
    db = trained_store.copy_to(tmp_path / "s")
    renamed = db.with_name("renamed.duckdb")
    db.rename(renamed)
    assert not renamed.with_name("renamed.checkpoints").exists()
    result = cli("run", str(write_spec(EXTRA_SIGNALS)), "--db", str(renamed))
    assert result.returncode == 0, result.stderr
    assert rows(renamed, "SELECT count(*) FROM perturbations WHERE name = 'pgd5'") == [(2,)]
    stored = rows(renamed, "SELECT DISTINCT checkpoint FROM models")
    assert all(not Path(path).is_absolute() for (path,) in stored)


def test_a_diverging_model_is_recorded_failed_with_its_epoch(tmp_path, write_spec):
    db = tmp_path / "s.duckdb"
    spec = write_spec(
        {"training": {"defenses": ["natural"], "epochs": 3, "optimizer": {"name": "sgd", "lr": 1e30}}}
    )
    result = cli("run", str(spec), "--db", str(db))
    assert result.returncode == 1
    status, error = rows(db, "SELECT status, error FROM v_models")[0]
    assert status == "failed" and error.startswith("training diverged at epoch ")
    assert "training diverged at epoch" in result.stderr


# ---- item 8: readers never cost a finished model; lock messages name real holders; --timeout everywhere

HOLD = "import duckdb, sys, time; con = duckdb.connect(sys.argv[1], read_only={ro}); print('open', flush=True); time.sleep(float(sys.argv[2]))"


def hold_store(db: Path, seconds: float, read_only: bool = True) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD.format(ro=read_only), str(db), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "open"
    return holder


def test_a_long_lived_reader_delays_a_finished_model_but_never_loses_it(trained_store, tmp_path, write_spec):
    db = trained_store.copy_to(tmp_path / "s")
    gate = tmp_path / "go"
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "robmia_db",
            "run",
            str(write_spec(EXTRA_SIGNALS)),
            "--db",
            str(db),
            "--timeout",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(ROBMIA_TEST_WAIT_AT=f"model-ready:{gate}"),
    )
    try:
        deadline = time.monotonic() + 120
        while not gate.with_name("go.reached").exists():
            assert run.poll() is None and time.monotonic() < deadline, run.stderr.read() if run.poll() else ""
            time.sleep(0.05)
        reader = hold_store(db, 4.0)  # a notebook's read-only connection, held past the 1 s timeout
        gate.touch()
        out, err = run.communicate(timeout=180)
        reader.wait(timeout=30)
    finally:
        run.kill()
    assert run.returncode == 0, err
    assert f"waiting for process {reader.pid} (python" in err
    assert "a run by process" not in err  # the run's own lock is no holder to wait for
    assert rows(db, "SELECT count(*) FROM perturbations WHERE name = 'pgd5'") == [(2,)]


def test_every_store_command_takes_timeout_and_names_the_holder(trained_store, tmp_path):
    db = trained_store.copy_to(tmp_path / "s")
    writer = hold_store(db, 120.0, read_only=False)
    try:
        for args in (
            ("--timeout", "0.5", "models", "--db", str(db)),
            ("models", "--db", str(db), "--timeout", "0.5"),
            ("sql", "SELECT 1", "--db", str(db), "--timeout", "0.5"),
            ("report", "--db", str(db), "--timeout", "0.5", "-o", str(tmp_path / "r.html")),
            ("score", "--db", str(db), "--timeout", "0.5"),
        ):
            started = time.monotonic()
            result = cli(*args)
            one_line_error(result, f"locked by process {writer.pid} (python", "waited 0.5 s")
            assert time.monotonic() - started < 20
    finally:
        writer.kill()


# ---- items 6 and 11: strict, finite spec values within the store's column ranges

STRICT_CASES = [
    ({"training": {"optimizer": {"lr": float("inf")}}}, "training.optimizer.lr: must be a finite number"),
    (
        {"training": {"optimizer": {"weight_decay": float("inf")}}},
        "training.optimizer.weight_decay: must be a finite",
    ),
    (
        {"training": {"defenses": ["trades"]}, "defense": {"trades": {"beta": float("inf")}}},
        "defense.trades.beta",
    ),
    ({"model": {"width": float("inf")}}, "model.width: must be a finite number"),
    ({"training": {"eps": float("nan")}}, "training.eps: must be a finite number"),
    ({"training": {"eps": True}}, "training.eps: must be a number (got True)"),
    ({"training": {"epochs": "1"}}, "training.epochs: must be an integer (got '1')"),
    ({"training": {"seeds": [True, False]}}, "training.seeds[0]: must be an integer (got True)"),
    ({"model": {"width": ["1", "2"]}}, "model.width[0]: must be a number (got '1')"),
    ({"model": {"width": []}}, "model.width: must not be empty"),
    (
        {"model": {"options": {"hidden": [-5]}}},
        "model.options.hidden[0]: must be an integer in [1, 1000000] (got -5)",
    ),
    ({"attacks": {"names": ["no_such_attack"]}}, "attacks.names[0]: unknown attack 'no_such_attack'"),
    ({"training": {"seeds": [2**31]}}, "training.seeds[0]: must be <= 2147483647"),
    ({"data": {"split_seed": 2**40}}, "data.split_seed: must be <= 2147483647"),
    ({"membership": {"n_members": 2**31}}, "membership.n_members: must be <= 2147483647"),
]


@pytest.mark.parametrize(
    ("overrides", "message"), STRICT_CASES, ids=[m.split(":")[0] for _, m in STRICT_CASES]
)
def test_lax_or_non_finite_spec_values_are_refused_by_check(write_spec, overrides, message):
    spec = write_spec(overrides)
    result = cli("check", str(spec))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"{spec}: {message}" in result.stderr, result.stderr


def test_user_attack_names_are_known_by_file_stem_without_running_them(write_spec, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    marker = tmp_path / "executed"
    (folder / "mine_attack.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    spec = write_spec({"attacks": {"names": ["mine_attack", "loss"], "paths": ["mine"]}})
    result = cli("check", str(spec))
    assert result.returncode == 0, result.stderr
    assert not marker.exists()


# ---- item 12: one-line errors instead of tracebacks (the dataset and import cases)


def test_unreadable_inputs_are_one_line_errors(tmp_path):
    import io
    import struct
    import zipfile

    import numpy as np

    fifo = tmp_path / "spec.toml"
    os.mkfifo(fifo)
    one_line_error(cli("check", str(fifo), timeout=30), "is not a regular file")
    one_line_error(cli("check", "/dev/zero", timeout=30), "/dev/zero: is not a regular file")

    idx = tmp_path / "idx"
    idx.mkdir()
    huge = bytes([0, 0, 8, 3]) + struct.pack(">3I", 2**32 - 1, 2**32 - 1, 2**32 - 1)
    for name in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
        (idx / name).write_bytes(huge + bytes(16))
    for name in ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
        (idx / name).write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 2) + b"\0\1")
    line = one_line_error(cli("data", "describe", "mnist", "--root", str(idx)), "IDX file truncated")
    assert str((2**32 - 1) ** 3 + 16) in line  # the header's byte count, not an int64 overflow of it

    np.savez(tmp_path / "strings.npz", x=np.array(["a", "b"]), y=np.array([0, 1]))
    one_line_error(cli("data", "describe", "npz", "--root", str(tmp_path / "strings.npz")), "has dtype <U1")
    np.savez(tmp_path / "label.npz", x=np.zeros((4, 8, 8), np.uint8), y=np.array([0, 1, 10**9, 1]))
    one_line_error(cli("data", "describe", "npz", "--root", str(tmp_path / "label.npz")), "label 1000000000")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (10**12, 8, 8)}
    )
    labels = io.BytesIO()
    np.save(labels, np.array([0, 1]))
    with zipfile.ZipFile(tmp_path / "claims.npz", "w") as archive:
        archive.writestr("x.npy", header.getvalue() + bytes(64))
        archive.writestr("y.npy", labels.getvalue())
    one_line_error(
        cli("data", "describe", "npz", "--root", str(tmp_path / "claims.npz")), "claims more than memory"
    )

    bad_eps = synthetic_outputs(3, n=40, n_classes=4).arrays()
    bad_eps["eps__benign"] = np.array("x")
    np.savez(tmp_path / "eps.npz", **bad_eps)
    db = tmp_path / "s.duckdb"
    one_line_error(
        cli("import", str(tmp_path / "eps.npz"), "--format", "npz", "--db", str(db)), "eps__benign"
    )
    assert not db.exists()


def test_store_paths_that_cannot_work_are_one_line_errors(tmp_path, write_spec):
    spec = write_spec({"training": {"defenses": ["natural"], "epochs": 1}})
    (tmp_path / "s.duckdb.lock").mkdir()
    one_line_error(cli("run", str(spec), "--db", str(tmp_path / "s.duckdb")), "s.duckdb.lock is not a file")
    one_line_error(cli("run", str(spec), "--db", "/proc/no/such/s.duckdb"), "cannot lock")
    one_line_error(cli("sql", "SELECT 1", "--db", str(tmp_path)), "is not a store file (a folder)")


def test_a_full_disk_is_a_recorded_failure_not_a_traceback(tmp_path, write_spec):
    """ENOSPC injected where the finished model is written (a real tmpfs needs root; see the next test)."""
    db = tmp_path / "s.duckdb"
    spec = write_spec({"training": {"defenses": ["natural"], "epochs": 1}})
    result = cli("run", str(spec), "--db", str(db), ROBMIA_TEST_FAIL_AT="model-write")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "No space left on device" in result.stderr
    ((status, error),) = rows(db, "SELECT status, error FROM v_models")
    assert status == "failed" and "No space left on device" in error
    assert cli("run", str(spec), "--db", str(db)).returncode == 0  # nothing lost: the rerun completes it


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "tiny"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip("mounting a tiny tmpfs needs root")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_import_into_a_really_full_disk_is_one_line_and_keeps_nothing_half(tmp_path, tiny_disk):
    big = synthetic_outputs(3, n=20000, n_classes=10).save(tmp_path / "big.npz")
    db = tiny_disk / "s.duckdb"
    line = one_line_error(
        cli("import", str(big), "--format", "npz", "--db", str(db)), "No space left on device"
    )
    assert "nothing of this write was kept" in line


# ---- item 13: sweep explosions


def test_a_large_sweep_shows_its_size_and_needs_yes(write_spec, tmp_path):
    spec = write_spec({"training": {"defenses": ["natural"], "seeds": list(range(600)), "epochs": 2}})
    expanded = cli("check", str(spec), "--expand")
    assert "planned: 600 models, 1,200 training epochs, 1200 perturbations" in expanded.stdout
    db = tmp_path / "s.duckdb"
    result = cli("run", str(spec), "--db", str(db))
    one_line_error(result, "600 models to train (1,200 training epochs), more than 500", "--yes")
    assert "600 model(s): 600 to train (1,200 training epochs in all)" in result.stderr
    assert not db.with_name("s.checkpoints").exists() or not any(db.with_name("s.checkpoints").iterdir())
    huge = write_spec({"training": {"seeds": list(range(30000))}}, name="huge.toml")
    assert "more than 20,000 per spec" in cli("check", str(huge)).stderr


# ---- item 7: imports with an unambiguous example identity; names printed safely


def test_import_refuses_arrays_that_claim_a_stored_dataset_but_carry_other_labels(trained_store, tmp_path):
    db = trained_store.copy_to(tmp_path / "s")
    stored = dict(rows(db, "SELECT example_id, label FROM examples WHERE dataset = 'digits'"))
    ids = np.array(sorted(stored)[:200])
    labels = (np.array([stored[i] for i in ids]) + 1) % 10  # the same ids, other examples
    outputs = synthetic_outputs(5, n=200, n_classes=10, labels=labels, example_id=ids)
    path = outputs.save(tmp_path / "other.npz")
    result = cli("import", str(path), "--format", "npz", "--dataset", "digits", "--db", str(db))
    one_line_error(result, "200 of 200 examples have other labels", "not the same examples")
    assert rows(db, "SELECT count(*) FROM models WHERE origin = 'imported'") == [(0,)]
    same = synthetic_outputs(
        5, n=200, n_classes=10, labels=labels - labels + np.array([stored[i] for i in ids]), example_id=ids
    )
    result = cli(
        "import",
        str(same.save(tmp_path / "same.npz")),
        "--format",
        "npz",
        "--dataset",
        "digits",
        "--db",
        str(db),
    )
    assert result.returncode == 0, result.stderr


def test_names_with_terminal_escapes_are_refused_or_shown_inert(tmp_path, outputs_npz):
    db = tmp_path / "s.duckdb"
    evil = "x\x1b]0;owned\x07\x1b[31m"
    one_line_error(
        cli("import", str(outputs_npz), "--format", "npz", "--name", evil, "--db", str(db)),
        "control characters",
    )
    result = cli("import", str(outputs_npz), "--format", "npz", "--db", str(db), "--experiment", "e\x1b[2J")
    assert result.returncode == 0
    shown = cli("sql", "SELECT experiment FROM v_models", "--db", str(db))
    assert "\x1b" not in shown.stdout and "e\\x1b[2J" in shown.stdout
