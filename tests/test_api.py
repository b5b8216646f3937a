"""The Python API: the README's code block runs as written on a tiny spec, and its results are checked
against the store's views (short reprs, `.to_df()`, progress callbacks, keyword arguments)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import TINY_SPEC, merged, toml_dumps

import robmia_db
from robmia_db.api import ImportedModel, ProgressEvent, RunResult, ScoreResult, Store

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def readme_api_block() -> str:
    section = README.split("## Python API", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return block


def write_ccs2019(path: Path, n_train: int, n_test: int, n_classes: int = 4) -> None:
    """An output file in the paper authors' layout: float32 softmax per split and perturbation, labels."""
    rng = np.random.default_rng(3)

    def softmax(n: int) -> np.ndarray:
        z = rng.normal(size=(n, n_classes)).astype(np.float32)
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    np.savez(
        path,
        output_train_benign=softmax(n_train), output_test_benign=softmax(n_test),
        output_train_adversarial=softmax(n_train), output_test_adversarial=softmax(n_test),
        train_label=rng.integers(0, n_classes, n_train), test_label=rng.integers(0, n_classes, n_test),
    )  # fmt: skip


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The README block executed in a folder holding a tiny `specs/quickstart.toml` and an output file."""
    from conftest import use_one_torch_thread

    use_one_torch_thread()
    folder = tmp_path_factory.mktemp("notebook")
    (folder / "specs").mkdir()
    spec = merged(TINY_SPEC, {"experiment": {"name": "quickstart"}, "training": {"epochs": 5}})
    (folder / "specs" / "quickstart.toml").write_text(toml_dumps(spec), encoding="utf-8")
    write_ccs2019(folder / "model_robust.npz", n_train=1900, n_test=514)
    namespace: dict = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        exec(compile(readme_api_block(), "README.md", "exec"), namespace)  # noqa: S102 - our own README
    return folder, namespace


def test_readme_block_runs_and_its_results_match_the_store(readme_run):
    folder, ns = readme_run
    store = ns["store"]
    assert isinstance(store, Store) and store.path == Path("notebook.duckdb")
    db = folder / "notebook.duckdb"
    views = Store(db)

    result = ns["result"]
    assert isinstance(result, RunResult) and not result.failed
    assert repr(result) == "RunResult(2 models: 2 trained; store notebook.duckdb)"
    runs = ns["runs"]
    stored = views.df(
        "SELECT model_key, model_name, train_acc, test_acc FROM v_models WHERE origin = 'trained'"
    )
    assert sorted(runs["model_key"]) == sorted(stored["model_key"])
    assert set(runs["action"]) == {"train"}
    for row in runs.itertuples():
        want = stored[stored.model_key == row.model_key].iloc[0]
        assert row.benign_train_acc == pytest.approx(want.train_acc, abs=1e-12)
        assert row.benign_test_acc == pytest.approx(want.test_acc, abs=1e-12)

    assert repr(ns["again"]) == "RunResult(2 models: 2 already stored; store notebook.duckdb)"
    events = ns["events"]
    assert all(isinstance(e, ProgressEvent) for e in events)
    # nothing to do: the plan alone, with no model left to run
    assert [(e.event, e.total, e.done) for e in events] == [("plan", 0, 0)]

    scores = ns["scores"]
    assert isinstance(scores, ScoreResult)
    # 2 attacks x 2 models x 2 perturbations (benign, pgd)
    assert repr(scores).startswith("ScoreResult(2 attacks: 8 scored, 0 cached, 0 skipped;")
    assert scores.to_df()[["attack", "scored"]].values.tolist() == [["confidence", 4], ["loss", 4]]

    metrics = ns["metrics"]
    assert len(metrics) == 8  # read before the import
    table = ns["table"]
    assert isinstance(table, pa.Table) and table.num_rows == 4
    confidence = metrics[metrics.attack == "confidence"]
    assert sorted(table.column("balanced_accuracy").to_pylist()) == sorted(confidence.balanced_accuracy)
    assert sorted(ns["models"].model_name) == ["quickstart/natural-s0", "quickstart/pgd_at-eps0.1-s0"]

    page = ns["page"]
    assert page == Path("reports/notebook.html") and (folder / page).exists()
    html = (folder / page).read_text(encoding="utf-8")
    assert 'data-attack="confidence"' in html and 'data-attack="loss"' not in html

    imported = ns["imported"]
    assert isinstance(imported, ImportedModel)
    assert re.fullmatch(
        r"ImportedModel\('yale_pgd_at', key \w+, 1,900 members / 514 non-members\)", repr(imported)
    )
    row = views.df("SELECT * FROM v_models WHERE model_name = 'yale_pgd_at'")
    assert (row.n_members.item(), row.n_nonmembers.item()) == (1900, 514)


def test_progress_callback_sees_every_epoch_and_perturbation(tmp_path: Path):
    from conftest import use_one_torch_thread

    use_one_torch_thread()
    spec = tmp_path / "one.toml"
    overrides = {"training": {"defenses": ["natural"], "epochs": 3}}
    spec.write_text(toml_dumps(merged(TINY_SPEC, overrides)), encoding="utf-8")
    events: list[ProgressEvent] = []
    result = Store(tmp_path / "s.duckdb").run(spec, progress=events.append)
    assert [e.event for e in events] == [
        "plan", "started", "epoch", "epoch", "epoch", "signals", "signals", "finished",
    ]  # fmt: skip
    assert [e.epoch for e in events if e.event == "epoch"] == [1, 2, 3]
    assert [e.models[0]["epoch"] for e in events if e.event == "epoch"] == [1, 2, 3]
    assert all(
        e.models[0]["epochs"] == 3 and np.isfinite(e.models[0]["loss"]) for e in events if e.event == "epoch"
    )
    assert [e.perturbation for e in events if e.event == "signals"] == ["benign", "pgd"]
    assert [(e.total, e.queued, e.running, e.done) for e in (events[0], events[1], events[-1])] == [
        (1, 1, 0, 0), (1, 0, 1, 0), (1, 0, 0, 1),
    ]  # fmt: skip
    # from the first epoch on, the ETA is measured
    etas = [e.eta_s for e in events if e.event == "epoch"]
    assert all(eta is not None and eta >= 0 for eta in etas)
    (outcome,) = result.outcomes
    finished = events[-1]
    assert (finished.action, finished.model_name, finished.error) == ("train", outcome.job.model_name, None)
    quiet = Store(tmp_path / "s.duckdb").run(spec, progress=False, dry_run=True)
    assert repr(quiet) == f"RunResult(1 model: 1 already stored; store {tmp_path / 's.duckdb'})"


def test_api_signatures_are_explicit_and_documented():
    for method in (Store.run, Store.score, Store.import_outputs, Store.report):
        signature = inspect.signature(method)
        assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()), method
        doc = inspect.getdoc(method) or ""
        for name in signature.parameters:
            if name != "self":
                assert f"{name.lstrip('*')}:" in doc, f"{method.__name__}: {name} is not documented"
    assert robmia_db.open_store("x.duckdb").path == Path("x.duckdb")


def test_readme_block_typed_rows_are_the_stored_rows(readme_run):
    from robmia_db.store.tables import Attack, Experiment, Model, Perturbation

    folder, ns = readme_run
    views = Store(folder / "notebook.duckdb")
    typed = ns["typed"]
    assert all(isinstance(m, Model) for m in typed)
    stored = views.df("SELECT model_key, model_name, n_members, spec_text FROM v_models ORDER BY model_key")
    assert sorted(m.model_key for m in typed) == list(stored["model_key"])
    for model in typed:
        row = stored[stored.model_key == model.model_key].iloc[0]
        assert (model.model_name, model.n_members) == (row.model_name, row.n_members)
        assert model.spec_text == (row.spec_text if isinstance(row.spec_text, str) else None)
    assert ns["epochs"] == 5 and "[training]" in ns["spec"]  # the model's own spec text, as trained
    experiments, perturbations, attacks = ns["runs_of"]
    assert [e.name for e in experiments] == sorted(
        views.df("SELECT experiment FROM v_experiments")["experiment"]
    )
    assert all(isinstance(e, Experiment) for e in experiments)
    trained = ns["trained"]
    assert trained.experiment == "quickstart" and trained.origin == "trained"
    assert perturbations and all(
        isinstance(p, Perturbation) and p.model_key == trained.model_key for p in perturbations
    )
    assert sorted(a.name for a in attacks) == sorted(views.df("SELECT attack FROM v_attacks")["attack"])
    assert all(isinstance(a, Attack) for a in attacks)


def test_run_refuses_unknown_executor_and_ray_options_before_any_work(tmp_path: Path):
    from robmia_db.errors import RobmiaError

    spec = tmp_path / "s.toml"
    spec.write_text(toml_dumps(TINY_SPEC), encoding="utf-8")
    store = Store(tmp_path / "s.duckdb")
    with pytest.raises(RobmiaError, match=r"^executor 'dask': expected local or ray$"):
        store.run(spec, executor="dask", progress=False)
    with pytest.raises(RobmiaError, match=r"^ray_options: unknown gpus \(known: address, "):
        store.run(spec, executor="ray", ray_options={"gpus": 1}, progress=False)
    assert not store.path.exists()
