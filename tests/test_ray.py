"""The Ray executor on a real local Ray cluster (2 CPUs): the store it builds equals a sequential run's,
a worker killed mid-model is retried and resumes from its partial checkpoint, a failing model is recorded
while the others land, and a killed driver's rerun resumes without duplicates while `sql` reads the store.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import ray_faults
from click.testing import CliRunner
from conftest import REPO, TINY_SPEC, clean_env, merged, toml_dumps, use_one_torch_thread

from robmia_db.cli import main
from robmia_db.store.query import run_query

FAULT_SPEC = merged(
    TINY_SPEC,
    {
        "experiment": {"name": "fleet"},
        "training": {"defenses": ["natural", "pgd_at", "killed_once", "exploding"], "epochs": 10},
    },
)
DRIVER_SPEC = merged(
    TINY_SPEC,
    {
        "experiment": {"name": "driver"},
        "training": {"defenses": ["natural"], "seeds": [0, 1, 2, 3], "epochs": 40},
        "signals": [{"kind": "benign", "name": "benign"}],
    },
)


def _ray_env(flags: Path) -> dict:
    return {
        "worker_process_setup_hook": "ray_faults.setup_worker",
        "env_vars": {
            "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
            "ROBMIA_TEST_FLAGS": str(flags),
        },
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One local Ray cluster for the module, its workers with the fault defenses installed."""
    use_one_torch_thread()
    flags = tmp_path_factory.mktemp("flags")
    os.environ["ROBMIA_TEST_FLAGS"] = str(flags)
    added = ray_faults.register()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=_ray_env(flags))
    try:
        yield flags
    finally:
        ray.shutdown()
        ray_faults.unregister(added)
        os.environ.pop("ROBMIA_TEST_FLAGS", None)


class Recorder:
    """A reporter that keeps every call (the Ray driver relays workers' events to it)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, *args))


def _stores_differences(a: Path, b: Path) -> dict[str, int]:
    """Rows of each table in one store and not the other (both ways, with multiplicity)."""
    import duckdb

    con = duckdb.connect()
    con.execute(f"ATTACH '{a}' AS a (READ_ONLY); ATTACH '{b}' AS b (READ_ONLY)")
    columns = {
        "signals": "*",
        "membership": "*",
        "examples": "*",
        "perturbations": "signal_key, model_key, name, kind, eps, settings, n_rows, member_acc, nonmember_acc",
        "models": "model_key, model_name, experiment, status, defense, n_members, n_nonmembers, config",
    }
    found = {}
    for table, cols in columns.items():
        query = f"SELECT count(*) FROM (SELECT {cols} FROM {{}}.{table} EXCEPT ALL SELECT {cols} FROM {{}}.{table})"
        found[table] = (
            con.execute(query.format("a", "b")).fetchone()[0]
            + con.execute(query.format("b", "a")).fetchone()[0]
        )
        found[f"{table}_rows"] = con.execute(f"SELECT count(*) FROM a.{table}").fetchone()[0]
    con.close()
    return found


@pytest.fixture(scope="module")
def fleet(cluster, tmp_path_factory):
    """The fault spec run under Ray, then the same spec run locally into a second store."""
    from robmia_db.runner.executor import RayOptions, run_specs

    folder = tmp_path_factory.mktemp("fleet")
    spec = folder / "fleet.toml"
    spec.write_text(toml_dumps(FAULT_SPEC))
    recorder = Recorder()
    started = time.perf_counter()
    summary = run_specs(
        [spec], folder / "ray.duckdb", reporter=recorder, executor="ray", ray_options=RayOptions()
    )
    seconds = time.perf_counter() - started
    assert ray_faults.kill_flag().exists(), "the killed_once worker was never killed"
    local = run_specs([spec], folder / "local.duckdb", executor="local")
    return {"folder": folder, "ray": summary, "local": local, "recorder": recorder, "seconds": seconds}


def test_ray_store_equals_a_sequential_run(fleet):
    folder = fleet["folder"]
    differences = _stores_differences(folder / "ray.duckdb", folder / "local.duckdb")
    assert {k: v for k, v in differences.items() if not k.endswith("_rows")} == dict.fromkeys(
        ("signals", "membership", "examples", "perturbations", "models"), 0
    )
    # 3 completed models x 2 perturbations x 400 examples, bit for bit (probs included)
    assert differences["signals_rows"] == 3 * 2 * 400
    assert differences["models_rows"] == 4
    for outcome in fleet["ray"].outcomes:
        if outcome.action == "train":
            name = f"{outcome.job.model_key}.pt"
            ray_checkpoint = (folder / "ray.checkpoints" / name).read_bytes()
            assert ray_checkpoint == (folder / "local.checkpoints" / name).read_bytes()
    assert not list((folder / "ray.checkpoints").glob("*.partial.pt")), "partials left after the run"


def test_a_killed_worker_is_retried_and_resumes_from_its_partial_checkpoint(fleet):
    outcome = next(o for o in fleet["ray"].outcomes if o.job.defense == "killed_once")
    assert outcome.action == "train" and outcome.error is None
    resumed = [c for c in fleet["recorder"].calls if c[0] == "training_resumed"]
    assert [(c[1].defense, c[2], c[3]) for c in resumed] == [("killed_once", 2, 10)]
    row = run_query(
        fleet["folder"] / "ray.duckdb",
        "SELECT train_seconds, train_history FROM models WHERE model_key = $k",
        {"k": outcome.job.model_key},
    ).to_pylist()[0]
    history = json.loads(row["train_history"])
    assert [h["epoch"] for h in history] == list(range(1, 11))
    # the epochs trained before the kill count: the running training time never restarts at the resume,
    # and train_seconds covers it. (train_seconds also holds the retried worker's set-up, torch.load and
    # first-step warm-up, which can dwarf these tiny epochs on a loaded machine: no ratio between the two.)
    elapsed = [h["elapsed_seconds"] for h in history]
    assert elapsed == sorted(elapsed)
    for epoch, entry in enumerate(history, start=1):
        assert entry["elapsed_seconds"] >= sum(h["seconds"] for h in history[:epoch]) - 1e-9
    assert row["train_seconds"] >= history[-1]["elapsed_seconds"]
    assert row["train_seconds"] >= sum(h["seconds"] for h in history)


def test_a_failing_model_is_recorded_while_the_others_land(fleet):
    actions = {o.job.defense: (o.action, o.error) for o in fleet["ray"].outcomes}
    assert actions["exploding"] == ("failed", "RuntimeError: exploded at step 3")
    assert {d: a for d, (a, _) in actions.items() if d != "exploding"} == dict.fromkeys(
        ("natural", "pgd_at", "killed_once"), "train"
    )
    rows = run_query(
        fleet["folder"] / "ray.duckdb", "SELECT defense, status, error FROM v_models ORDER BY defense"
    ).to_pylist()
    assert [(r["defense"], r["status"]) for r in rows] == [
        ("exploding", "failed"), ("killed_once", "completed"), ("natural", "completed"), ("pgd_at", "completed")
    ]  # fmt: skip
    assert "exploded at step 3" in rows[0]["error"] and "Traceback" in rows[0]["error"]


def test_progress_relays_every_epoch_and_perturbation(fleet):
    calls = fleet["recorder"].calls
    by_defense: dict[str, list[int]] = {}
    for call in calls:
        if call[0] == "epoch_done":
            by_defense.setdefault(call[1].defense, []).append(call[2])
    assert by_defense["natural"] == list(range(1, 11)) and by_defense["pgd_at"] == list(range(1, 11))
    assert by_defense["killed_once"][-8:] == list(range(3, 11))  # resumed after epoch 2
    assert sum(1 for c in calls if c[0] == "perturbation_started") == 3 * 2
    assert [c[1] for c in calls if c[0] == "set_parallel"] == [2]
    finished = [c[1].job.defense for c in calls if c[0] == "model_finished"]
    assert sorted(finished) == ["exploding", "killed_once", "natural", "pgd_at"]


DRIVER_SCRIPT = """
import sys, ray
sys.path[:0] = {paths!r}
import ray_faults
ray_faults.register()
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={runtime_env!r})
from robmia_db.runner.executor import RayOptions, run_specs
run_specs([{spec!r}], {db!r}, executor="ray", ray_options=RayOptions())
"""


def _sql(db: Path, query: str):
    return CliRunner().invoke(main, ["sql", query, "--db", str(db), "--format", "csv", "--timeout", "30"])


@pytest.mark.slow  # a second Ray cluster in a subprocess: 173 s measured with 2 cores at load average 17
def test_killed_driver_rerun_resumes_without_duplicates_and_sql_reads_during_the_run(cluster, tmp_path):
    from robmia_db.runner.executor import RayOptions, run_specs
    from robmia_db.store.connection import checkpoint_dir

    spec = tmp_path / "driver.toml"
    spec.write_text(toml_dumps(DRIVER_SPEC))
    db = tmp_path / "store.duckdb"
    script = DRIVER_SCRIPT.format(
        paths=[str(REPO), str(REPO / "tests")], runtime_env=_ray_env(cluster), spec=str(spec), db=str(db)
    )
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=clean_env(),
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no model stored in 240 s"
            if db.exists():
                poll = _sql(db, "SELECT count(*) AS n FROM v_models WHERE status = 'completed'")
                if poll.exit_code == 0 and int(poll.stdout.splitlines()[1]) >= 1:
                    break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # the driver only; its Ray cluster goes with its session below
        proc.wait(timeout=30)
    finally:
        with_session = proc.pid
        try:
            os.killpg(with_session, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
    stored = {
        r["model_key"]: r["finished_at"]
        for r in run_query(
            db, "SELECT model_key, finished_at FROM models WHERE status = 'completed'"
        ).to_pylist()
    }
    assert 1 <= len(stored) < 4
    partials = {p.name.split(".")[0] for p in checkpoint_dir(db).glob("*.partial.pt")}

    recorder = Recorder()
    summary = run_specs([spec], db, reporter=recorder, executor="ray", ray_options=RayOptions())
    actions = {o.job.model_key: o.action for o in summary.outcomes}
    assert {k: a for k, a in actions.items() if k in stored} == dict.fromkeys(stored, "skip")
    assert {k: a for k, a in actions.items() if k not in stored} == dict.fromkeys(
        set(actions) - set(stored), "train"
    )
    resumed = {c[1].model_key: c[2] for c in recorder.calls if c[0] == "training_resumed"}
    assert set(resumed) == partials - set(stored) and all(epoch > 0 for epoch in resumed.values())
    assert partials - set(stored), "the driver was killed with no model mid-training"
    rows = run_query(
        db,
        """SELECT (SELECT count(*) FROM models) AS models, (SELECT count(*) FROM membership) AS membership,
                  (SELECT count(*) FROM signals) AS signals,
                  (SELECT count(*) FROM (SELECT DISTINCT signal_key, example_id FROM signals)) AS distinct_signals""",
    ).to_pylist()[0]
    assert rows == {"models": 4, "membership": 4 * 400, "signals": 4 * 400, "distinct_signals": 4 * 400}
    for key, finished_at in stored.items():
        again = run_query(db, "SELECT finished_at FROM models WHERE model_key = $k", {"k": key}).to_pylist()
        assert again == [{"finished_at": finished_at}]  # not retrained


def _malloc_probe(apply: bool) -> dict:
    """In a Ray worker: the runner's worker setup (or not), then the page faults of a 40 MiB tensor made and
    freed again and again (median of the last six of eight: the first ones grow the heap)."""
    import resource
    import statistics

    import torch

    from robmia_db.runner import ray_executor

    fresh = ray_executor._MALLOC_SET is None
    applied = ray_executor._prepare_worker(1) if apply else None
    faults = []
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        # Above the 32 MiB that glibc's default mmap threshold never exceeds: by default mapped afresh each time.
        block = torch.empty(10 * 2**20)
        block.fill_(1.0)
        del block
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {"fresh": fresh, "applied": applied, "faults": statistics.median(faults[2:]), "pid": os.getpid()}


@pytest.mark.skipif(
    not sys.platform.startswith("linux")
    or os.environ.get("ROBMIA_MALLOC") == "default"
    or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""),
    reason="glibc's malloc, untuned by the environment",
)
def test_workers_take_the_runners_malloc_setting(cluster):
    """Each Ray worker process applies `run`'s malloc setting at its first model task (ray_executor._prepare_worker),
    so freed memory stays in the worker: a 40 MiB tensor made again faults (almost) no pages in, against all
    10,240 of them with glibc's defaults (seen: 0 against 10,241)."""
    # Own environment variables: workers of their own, never one that ran the fleet; one call per process.
    runtime_env = {"env_vars": {**_ray_env(cluster)["env_vars"], "ROBMIA_TEST_PROBE": "malloc"}}
    probe = ray.remote(max_calls=1)(_malloc_probe).options(runtime_env=runtime_env)
    default, kept = ray.get([probe.remote(False), probe.remote(True)])
    assert default["fresh"] and kept["fresh"] and default["pid"] != kept["pid"]
    assert default["faults"] > 0.9 * 10 * 2**20 * 4 / 4096
    assert kept["applied"] is True
    assert kept["faults"] < default["faults"] / 4


def test_only_the_ray_executor_imports_ray():
    """Ray is optional: no other module of the package imports it (parsed, not grepped), and `run --help`
    in a fresh process imports neither ray nor torch."""
    import ast

    importers = set()
    for path in (REPO / "robmia_db").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            if any(name == "ray" or name.startswith("ray.") for name in names):
                importers.add(path.relative_to(REPO).as_posix())
    assert importers == {"robmia_db/runner/ray_executor.py"}
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "robmia_db", "run", "--help"],
        capture_output=True, text=True, timeout=120, env=clean_env(),
    )  # fmt: skip
    assert result.returncode == 0 and "--executor [local|ray]" in result.stdout
    imported = {
        line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")
    }
    assert "click" in imported
    assert not {m for m in imported if m.split(".")[0] in ("ray", "torch")}
