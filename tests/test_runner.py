"""The runner end to end: kill -9 and resume, concurrent readers and a refused second run, failed models,
and the Python API used the way a notebook would.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY_SPEC, TrainedStore, clean_env, merged, toml_dumps, use_one_torch_thread

from robmia_db.cli import main
from robmia_db.store.query import run_query

# Four small PGD-AT models (about a second each on one idle core).
KILL_SPEC_OVERRIDES = {
    "experiment": {"name": "killed"},
    "training": {"defenses": ["pgd_at"], "seeds": [0, 1, 2, 3], "epochs": 20},
}


def store_problems(db: Path) -> list[str]:
    """Everything that would make the store inconsistent; empty when all is well."""
    problems = []
    rows = run_query(
        db,
        """SELECT m.model_name, m.status, count(DISTINCT p.signal_key) AS n_perturbations,
                  (SELECT count(*) FROM membership b WHERE b.model_key = m.model_key) AS n_membership
           FROM models m LEFT JOIN perturbations p USING (model_key) GROUP BY ALL""",
    ).to_pylist()
    for r in rows:
        if r["status"] != "completed" or r["n_perturbations"] != 2 or r["n_membership"] != 400:
            problems.append(f"model {r}")
    counts = run_query(
        db,
        """SELECT p.signal_key, p.n_rows, count(s.example_id) AS n, count(DISTINCT s.example_id) AS d,
                  count(*) FILTER (WHERE s.is_member) AS members
           FROM perturbations p LEFT JOIN signals s USING (signal_key) GROUP BY ALL""",
    ).to_pylist()
    for c in counts:
        if (c["n_rows"], c["n"], c["d"], c["members"]) != (400, 400, 400, 200):
            problems.append(f"perturbation {c}")
    orphans = run_query(
        db,
        """SELECT (SELECT count(*) FROM signals WHERE signal_key NOT IN (SELECT signal_key FROM perturbations))
                + (SELECT count(*) FROM perturbations WHERE model_key NOT IN (SELECT model_key FROM models))
                + (SELECT count(*) FROM membership WHERE model_key NOT IN (SELECT model_key FROM models)) AS n""",
    ).to_pylist()
    if orphans != [{"n": 0}]:
        problems.append(f"orphan rows {orphans}")
    return problems


def completed_models(db: Path) -> dict[str, dict]:
    rows = run_query(
        db,
        "SELECT model_key, model_name, train_seconds, finished_at FROM v_models WHERE status = 'completed'",
    ).to_pylist()
    return {r["model_name"]: r for r in rows}


def _sql(db: Path, query: str):
    """`robmia-db sql` in-process (a separate DuckDB reader from the run's process, at no startup cost)."""
    return CliRunner().invoke(main, ["sql", query, "--db", str(db), "--format", "csv", "--timeout", "30"])


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """Start `robmia-db run` in a subprocess, act while it trains, kill -9 it, then rerun in-process.

    Once the first model is stored the run is frozen with SIGSTOP (it keeps its run lock, as a busy run
    does), so the checks in between cannot race with the rest of the run however loaded the machine is.
    Returns what was observed at each step; the tests below assert on it.
    """
    use_one_torch_thread()
    from robmia_db.store.connection import checkpoint_dir

    folder = tmp_path_factory.mktemp("killed")
    spec = folder / "killed.toml"
    spec.write_text(toml_dumps(merged(TINY_SPEC, KILL_SPEC_OVERRIDES)))
    db = folder / "store.duckdb"
    seen: dict = {"spec": spec, "db": db}
    log = open(folder / "run.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "robmia_db", "run", str(spec), "--db", str(db)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=clean_env(),
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, "the run ended before its first model could be seen"
            assert time.monotonic() < deadline, "no model stored in 300 s"
            if db.exists():
                poll = _sql(db, "SELECT count(*) AS n FROM v_models WHERE status = 'completed'")
                if poll.exit_code == 0 and int(poll.stdout.splitlines()[1]) >= 1:
                    seen["sql_while_training"] = poll
                    seen["alive_after_first_model"] = proc.poll() is None
                    break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGSTOP)
        seen["sql_while_paused"] = _sql(db, "SELECT model_name, n_perturbations FROM v_models")
        seen["second_run"] = CliRunner().invoke(main, ["run", str(spec), "--db", str(db)])
        seen["pid"] = proc.pid
        seen["alive_after_second_run"] = proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
    seen["log"] = (folder / "run.log").read_text()
    seen["after_kill_models"] = completed_models(db)
    seen["after_kill_problems"] = store_problems(db)
    seen["after_kill_mtimes"] = {p.name: p.stat().st_mtime_ns for p in checkpoint_dir(db).glob("*.pt")}

    from robmia_db.runner.executor import run_specs

    seen["rerun"] = run_specs([spec], db)
    seen["after_rerun_models"] = completed_models(db)
    seen["after_rerun_problems"] = store_problems(db)
    seen["after_rerun_mtimes"] = {p.name: p.stat().st_mtime_ns for p in checkpoint_dir(db).glob("*.pt")}
    return seen


def test_sql_reads_the_store_while_a_run_trains(killed_run):
    poll = killed_run["sql_while_training"]
    assert poll.exit_code == 0 and poll.stderr == ""
    assert killed_run["alive_after_first_model"], "the run had finished: nothing concurrent was tested"
    paused = killed_run["sql_while_paused"]
    assert paused.exit_code == 0, paused.output
    assert paused.stdout.splitlines()[0] == "model_name,n_perturbations"
    assert "killed/pgd_at-eps0.1-s0,2" in paused.stdout.splitlines()


def test_a_second_run_on_the_same_store_is_refused_naming_the_holder(killed_run):
    result = killed_run["second_run"]
    assert killed_run["alive_after_second_run"]
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and result.stderr.splitlines()[-1] == errors[0]
    assert "Traceback" not in result.output
    match = re.fullmatch(
        rf"Error: {re.escape(str(killed_run['db']))} is being written by a run by process (\d+) on .+ since .+ "
        r"\(robmia-db run .+\); wait for it to finish or stop it",
        errors[0],
    )
    assert match, errors[0]
    assert int(match.group(1)) == killed_run["pid"]


def test_kill_9_leaves_a_consistent_store(killed_run):
    assert killed_run["after_kill_problems"] == []
    stored = killed_run["after_kill_models"]
    assert "killed/pgd_at-eps0.1-s0" in stored and len(stored) < 4, "the kill landed after the last model"


def test_rerun_finishes_the_rest_without_retraining_what_was_stored(killed_run):
    summary = killed_run["rerun"]
    assert not summary.failed
    before = killed_run["after_kill_models"]
    actions = {o.job.model_name: o.action for o in summary.outcomes}
    for name in before:
        assert actions[name] == "skip"
    assert all(action == "train" for name, action in actions.items() if name not in before)
    after = killed_run["after_rerun_models"]
    assert sorted(after) == [f"killed/pgd_at-eps0.1-s{seed}" for seed in range(4)]
    for name, row in before.items():
        assert after[name] == row  # same train_seconds and finished_at: not retrained
    for checkpoint, mtime in killed_run["after_kill_mtimes"].items():
        assert killed_run["after_rerun_mtimes"][checkpoint] == mtime
    assert len(killed_run["after_rerun_mtimes"]) == 4
    assert killed_run["after_rerun_problems"] == []


def test_training_is_reproducible_across_processes(killed_run, tmp_path):
    """Training is seeded: the model the killed subprocess stored equals the same model retrained here."""
    use_one_torch_thread()
    from robmia_db.runner.executor import run_specs

    spec = killed_run["spec"]
    first = "killed/pgd_at-eps0.1-s0"
    text = spec.read_text().replace("seeds = [0, 1, 2, 3]", "seeds = [0]")
    assert text != spec.read_text()
    single = tmp_path / "single.toml"
    single.write_text(text)
    db = tmp_path / "fresh.duckdb"
    run_specs([single], db)
    query = """SELECT example_id, probs FROM v_signals WHERE model_name = $m AND perturbation = 'pgd'
               ORDER BY example_id"""
    assert first in killed_run["after_kill_models"]
    fresh, stored = run_query(db, query, {"m": first}), run_query(killed_run["db"], query, {"m": first})
    assert fresh.num_rows == 400 and fresh.equals(stored)


# ------------------------------------------------------------------------------------------ failed models


@pytest.fixture
def exploding_defense(monkeypatch):
    """A defense registered through the public registries whose training step raises while `armed`."""
    from robmia_db.runner.defenses import DEFENSES, Defense
    from robmia_db.spec.defenses import DEFENSE_PARAMS, NaturalParams

    class ExplodingParams(NaturalParams):
        """No parameters, like natural training."""

    state = {"armed": True}

    class Exploding(Defense):
        name = "exploding"

        def loss(self, model, x, y, progress):
            import torch.nn.functional as F

            if state["armed"] and progress.step == 3:
                raise RuntimeError("exploded at step 3")
            return F.cross_entropy(model(x), y)

    monkeypatch.setitem(DEFENSE_PARAMS, "exploding", ExplodingParams)
    monkeypatch.setitem(DEFENSES, "exploding", Exploding)
    return state


def test_a_failed_model_is_recorded_and_the_run_goes_on(exploding_defense, write_spec, tmp_path):
    use_one_torch_thread()
    spec = write_spec(
        {"experiment": {"name": "boom"}, "training": {"defenses": ["exploding", "natural"], "epochs": 3}}
    )
    db = tmp_path / "store.duckdb"
    result = CliRunner().invoke(main, ["run", str(spec), "--db", str(db)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "failed boom/exploding-s0: RuntimeError: exploded at step 3" in result.stderr
    assert "1 model(s) failed" in result.stderr
    rows = {r["model_name"]: r for r in run_query(db, "SELECT * FROM v_models").to_pylist()}
    assert rows["boom/exploding-s0"]["status"] == "failed"
    assert "RuntimeError: exploded at step 3" in rows["boom/exploding-s0"]["error"]
    assert rows["boom/exploding-s0"]["n_perturbations"] == 0
    assert rows["boom/natural-s0"]["status"] == "completed"
    assert rows["boom/natural-s0"]["n_perturbations"] == 2

    exploding_defense["armed"] = False
    from robmia_db.runner.executor import run_specs

    summary = run_specs([spec], db)
    assert {o.job.model_name: o.action for o in summary.outcomes} == {
        "boom/exploding-s0": "train",  # a failed model is retried
        "boom/natural-s0": "skip",
    }
    statuses = run_query(db, "SELECT model_name, status, error FROM v_models ORDER BY 1").to_pylist()
    assert statuses == [
        {"model_name": "boom/exploding-s0", "status": "completed", "error": None},
        {"model_name": "boom/natural-s0", "status": "completed", "error": None},
    ]
    assert store_problems(db) == []


def test_dry_run_trains_nothing_and_creates_no_store(write_spec, tmp_path):
    spec = write_spec()
    db = tmp_path / "out" / "store.duckdb"
    result = CliRunner().invoke(main, ["run", str(spec), "--db", str(db), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "2 model(s): 2 to train (60 epochs), 0 to add signals to, 0 already stored" in " ".join(
        result.stderr.split()
    )
    assert "dry run: nothing trained" in result.stdout
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- Python API


def test_python_api_like_a_notebook(trained_store: TrainedStore, tmp_path):
    use_one_torch_thread()
    from robmia_db.runner.executor import run_specs

    db = trained_store.copy_to(tmp_path / "nb")
    plan = run_specs([trained_store.spec_path], db, dry_run=True)
    assert [o.action for o in plan.outcomes] == ["skip", "skip"]

    more = tmp_path / "more.toml"
    more.write_text(
        toml_dumps(
            merged(trained_store.spec, {"training": {"defenses": ["natural"], "seeds": [1], "epochs": 5}})
        )
    )
    summary = run_specs([more], db)
    assert [(o.job.model_name, o.action) for o in summary.outcomes] == [("tiny/natural-s1", "train")]
    assert summary.db_path == db and not summary.failed

    models = run_query(db, "SELECT model_name, seed, test_acc FROM v_models ORDER BY model_name").to_pandas()
    assert models["model_name"].tolist() == ["tiny/natural-s0", "tiny/natural-s1", "tiny/pgd_at-eps0.1-s0"]

    signals = run_query(
        db,
        "SELECT model_name, is_member, loss FROM v_signals WHERE perturbation = $p",
        params={"p": "benign"},
    )
    frame = signals.to_pandas()
    by_pandas = frame.groupby(["model_name", "is_member"])["loss"].mean()
    names = np.asarray(signals["model_name"].to_pylist())
    members = signals["is_member"].to_numpy(zero_copy_only=False)
    loss = signals["loss"].to_numpy()
    for (name, is_member), value in by_pandas.items():
        assert value == pytest.approx(loss[(names == name) & (members == is_member)].mean(), rel=1e-12)
    # members have lower loss than non-members for the trained-to-fit natural model: the MIA signal
    assert by_pandas[("tiny/natural-s0", True)] < by_pandas[("tiny/natural-s0", False)]


class _StopAfter:
    """A reporter that interrupts training after a given epoch, as a kill would."""

    def __init__(self, stop_after: int | None):
        self.stop_after = stop_after

    def epoch_done(self, job, epoch, epochs, stats):
        if self.stop_after is not None and epoch == self.stop_after:
            raise KeyboardInterrupt

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def test_training_resumes_mid_run_from_its_partial_checkpoint(write_spec, tmp_path, monkeypatch):
    """Interrupted at epoch 7 of 12 with partial saves on, the resumed model equals an uninterrupted one."""
    import torch

    from robmia_db.datasets import load_dataset
    from robmia_db.runner import training
    from robmia_db.runner.data import split_membership
    from robmia_db.spec import load_specs

    use_one_torch_thread()
    spec = write_spec({"training": {"defenses": ["pgd_at"], "epochs": 12}})
    (job,) = load_specs([spec])[0].jobs
    dataset = load_dataset("digits")
    split = split_membership(dataset, job.identity)
    device = torch.device("cpu")
    reference, _ = training.train_model(job, dataset, split, device, _StopAfter(None))

    monkeypatch.setattr(training, "PARTIAL_SAVE_INTERVAL_S", -1.0)  # save after every epoch
    partial = tmp_path / "fresh.checkpoints" / f"{job.model_key}.partial.pt"  # folder does not exist yet
    with pytest.raises(KeyboardInterrupt):
        training.train_model(job, dataset, split, device, _StopAfter(7), partial)
    assert partial.exists()
    resumed, history = training.train_model(job, dataset, split, device, _StopAfter(None), partial)
    assert [h["epoch"] for h in history] == list(range(1, 13))
    for name, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
