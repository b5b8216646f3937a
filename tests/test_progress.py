"""Progress: the ETA from measured epoch rates, `--dry-run` estimates from stored timings of similar models,
"resuming from epoch N" with train_seconds that keep the time before the interruption, the Python
callback hook, and the executor/device options' errors.
"""

from __future__ import annotations

import json
import re
import statistics

import pytest
from click.testing import CliRunner
from conftest import DELETE, TINY_SPEC, TrainedStore, merged, toml_dumps, use_one_torch_thread

from robmia_db.cli import main
from robmia_db.runner.progress import RunProgress, estimate_from_store
from robmia_db.spec import load_specs
from robmia_db.store.query import run_query


def _jobs(tmp_path, overrides):
    spec = tmp_path / "spec.toml"
    spec.write_text(toml_dumps(merged(TINY_SPEC, overrides)))
    return spec, load_specs([spec])[0].jobs


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_eta_from_measured_epoch_rates_over_parallel_slots(tmp_path):
    _, jobs = _jobs(tmp_path, {"training": {"seeds": [0, 1], "epochs": 10}})
    natural = [j for j in jobs if j.defense == "natural"]
    pgd = [j for j in jobs if j.defense == "pgd_at"]
    clock = Clock()
    progress = RunProgress(parallel=2, clock=clock)
    progress.plan(jobs, dict.fromkeys((j.model_key for j in jobs), "train"))
    assert progress.counts() == {"done": 0, "failed": 0, "running": 0, "queued": 4}
    assert progress.eta_seconds() is None  # nothing measured, nothing stored
    progress.started(natural[0])
    progress.started(pgd[0])
    for epoch in range(1, 5):
        progress.epoch_done(natural[0], epoch, {"loss": 1.0, "seconds": 1.0})
    for epoch in range(1, 3):
        progress.epoch_done(pgd[0], epoch, {"loss": 1.0, "seconds": 2.0})
    # running: 6 epochs x 1 s and 8 x 2 s; queued: 10 x 1 s (natural's rate) and 10 x 2 s (PGD-AT's);
    # no signals measured yet (counted 0); 52 s of work over 2 slots, never less than the longest (20 s)
    assert progress.eta_seconds() == pytest.approx((6 + 16 + 10 + 20) / 2)
    assert progress.counts() == {"done": 0, "failed": 0, "running": 2, "queued": 2}
    # signals: 2 perturbations in 6 s -> 3 s each, now counted for every model's remaining perturbations
    for epoch in range(5, 11):
        progress.epoch_done(natural[0], epoch, {"loss": 1.0, "seconds": 1.0})
    clock.now = 100.0
    progress.perturbation_started(natural[0], 0, 2)
    clock.now = 103.0
    progress.perturbation_started(natural[0], 1, 2)
    clock.now = 106.0
    progress.finished(natural[0].model_key, failed=False)
    expected = [0.0, 8 * 2 + 2 * 3, 10 * 1 + 2 * 3, 10 * 2 + 2 * 3]
    assert progress.eta_seconds() == pytest.approx(max(sum(expected) / 2, max(expected)))
    snapshot = progress.snapshot()
    assert (snapshot["done"], snapshot["running"], snapshot["queued"], snapshot["total"]) == (1, 1, 2, 4)
    first = next(m for m in snapshot["models"] if m["model_key"] == natural[0].model_key)
    assert (first["phase"], first["epoch"], first["signals_done"], first["signals_total"]) == (
        "done",
        10,
        2,
        2,
    )


def test_dry_run_estimates_from_stored_timings_of_similar_models(trained_store: TrainedStore, tmp_path):
    db = trained_store.copy_to(tmp_path / "store")
    spec, jobs = _jobs(tmp_path, {"training": {"seeds": [0, 1]}})
    result = CliRunner().invoke(main, ["run", str(spec), "--db", str(db), "--dry-run"])
    assert result.exit_code == 0, result.output
    # independent reference: seconds per epoch of the stored model of the same defense, times the epochs,
    # plus the stored seconds of its perturbations of the same kinds
    stored = run_query(
        db,
        """SELECT m.defense, m.train_seconds, p.kind, p.seconds
           FROM models m JOIN perturbations p USING (model_key)""",
    ).to_pylist()
    epochs = TINY_SPEC["training"]["epochs"]
    expected = {}
    for defense in ("natural", "pgd_at"):
        rows = [r for r in stored if r["defense"] == defense]
        signals = sum(
            statistics.median(r["seconds"] for r in rows if r["kind"] == k) for k in ("benign", "adversarial")
        )
        expected[defense] = rows[0]["train_seconds"] / epochs * epochs + signals
    actions = {j.model_key: ("skip" if j.seed == 0 else "train") for j in jobs}
    estimates = estimate_from_store(db, jobs, actions)
    for job in jobs:
        if job.seed == 1:
            assert estimates[job.model_key] == pytest.approx(expected[job.defense], rel=1e-9)
            assert re.search(rf"{re.escape(job.model_name)}\s.*~{expected[job.defense]:.0f}\b", result.output)
    total = sum(expected.values())
    assert f"estimate from stored timings of similar models: {round(total)}s" in result.output, result.output
    # nothing similar stored: no estimate, said plainly
    other, _ = _jobs(tmp_path, {"model": {"arch": "cnn", "options": DELETE}})
    unknown = CliRunner().invoke(main, ["run", str(other), "--db", str(db), "--dry-run"])
    assert unknown.exit_code == 0 and "estimate" not in unknown.output


def test_resuming_from_epoch_n_keeps_the_time_before_the_interruption(write_spec, tmp_path, monkeypatch):
    import torch

    from robmia_db.datasets import load_dataset
    from robmia_db.runner import training
    from robmia_db.runner.data import split_membership
    from robmia_db.store.connection import checkpoint_dir

    use_one_torch_thread()
    spec = write_spec({"training": {"defenses": ["natural"], "epochs": 12}, "signals": [{"kind": "benign"}]})
    (job,) = load_specs([spec])[0].jobs
    db = tmp_path / "store.duckdb"
    partial = checkpoint_dir(db) / f"{job.model_key}.partial.pt"

    class StopAt7:
        def epoch_done(self, job, epoch, epochs, stats):
            if epoch == 7:
                raise KeyboardInterrupt

        def __getattr__(self, name):
            return lambda *args: None

    monkeypatch.setattr(training, "PARTIAL_SAVE_INTERVAL_S", -1.0)
    dataset = load_dataset("digits")
    with pytest.raises(KeyboardInterrupt):
        training.train_model(
            job, dataset, split_membership(dataset, job.identity), torch.device("cpu"), StopAt7(), partial
        )
    before = torch.load(partial, weights_only=True)
    assert before["epoch"] == 5 and before["elapsed_seconds"] > 0  # saved after epoch 6 (0-based 5)

    result = CliRunner().invoke(main, ["run", str(spec), "--db", str(db)])
    assert result.exit_code == 0, result.output
    assert f"{job.model_name}: resuming from epoch 6/12 (partial checkpoint)" in result.output
    row = run_query(db, "SELECT train_seconds, train_history FROM models").to_pylist()[0]
    history = json.loads(row["train_history"])
    assert [h["epoch"] for h in history] == list(range(1, 13))
    assert row["train_seconds"] >= before["elapsed_seconds"]
    assert row["train_seconds"] >= sum(h["seconds"] for h in history)
    assert not partial.exists()


def test_python_progress_callback_sees_every_step(write_spec, tmp_path):
    from robmia_db.runner.executor import run_specs

    use_one_torch_thread()
    spec = write_spec({"training": {"defenses": ["natural"], "epochs": 5}})
    events = []
    summary = run_specs(
        [spec], tmp_path / "s.duckdb", progress=lambda event, snap: events.append((event, snap))
    )
    assert not summary.failed
    names = [e for e, _ in events]
    assert names == ["plan", "started", *["epoch"] * 5, "signals", "signals", "finished"]
    assert [s["epoch"] for e, s in events if e == "epoch"] == [1, 2, 3, 4, 5]
    assert [s["perturbation"] for e, s in events if e == "signals"] == ["benign", "pgd"]
    plan, final = events[0][1], events[-1][1]
    assert (plan["queued"], plan["done"]) == (1, 0)
    assert (final["done"], final["running"], final["queued"], final["eta_s"]) == (1, 0, 0, 0.0)
    assert all(s["eta_s"] is not None and s["eta_s"] >= 0 for e, s in events if e == "epoch")


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--device", "cuda:999"], 1, "Error: device 'cuda:999': "),
        (["--device", "tpu"], 1, "Error: device 'tpu': expected auto, cpu, cuda or cuda:N"),
        (["--max-parallel", "2"], 2, "--max-parallel applies to --executor ray only"),
        (["--gpus-per-model", "0.5"], 2, "--gpus-per-model applies to --executor ray only"),
        (
            ["--executor", "ray", "--device", "cuda:0"],
            1,
            "under --executor ray each task gets its GPU from Ray",
        ),
    ],
)
def test_executor_and_device_options_refuse_what_they_cannot_honour(
    write_spec, tmp_path, args, code, message
):
    spec = write_spec()
    result = CliRunner().invoke(main, ["run", str(spec), "--db", str(tmp_path / "s.duckdb"), *args])
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "s.duckdb").exists()
