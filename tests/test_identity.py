"""Content keys: what retrains, what only recomputes signals, and what never triggers work.

Spec-level checks go through `load_specs` on real TOML files; the end-to-end ones rerun edited specs on a
copy of the session's trained store and check that nothing retrains (checkpoint untouched, actions skip).
"""

from __future__ import annotations

import json
import os

import pytest
from conftest import DELETE, TrainedStore, merged, toml_dumps, use_one_torch_thread

from robmia_db.spec import load_specs
from robmia_db.spec.identity import canonical_json, content_key
from robmia_db.store.query import run_query


def jobs_of(path):
    (loaded,) = load_specs([path])
    return loaded.jobs


def keys_of(path) -> dict[str, str]:
    """defense -> model_key for a spec with one model per defense."""
    jobs = jobs_of(path)
    assert len({j.defense for j in jobs}) == len(jobs)
    return {j.defense: j.model_key for j in jobs}


def signal_keys_of(path) -> dict[tuple[str, str], str]:
    return {(j.defense, p.name): p.signal_key for j in jobs_of(path) for p in j.perturbations}


METADATA_EDITS = {
    "experiment-name": {"experiment": {"name": "renamed"}},
    "description": {"experiment": {"description": "edited text"}},
    "attack-list": {"attacks": {"names": ["confidence", "mentropy"], "paths": ["extra/attacks"]}},
    "attacks-removed": {"attacks": DELETE},
    "runtime-threads": {"runtime": {"threads": 7}},
    "runtime-device": {"runtime": {"device": "auto"}},
    "eval-batch-size": {"runtime": {"eval_batch_size": 17}},
}


@pytest.mark.parametrize("edit", METADATA_EDITS.values(), ids=METADATA_EDITS.keys())
def test_metadata_edits_keep_every_key(write_spec, edit):
    base = write_spec(name="a.toml")
    base_models, base_signals = keys_of(base), signal_keys_of(base)
    edited = write_spec(edit, name="b.toml")
    assert keys_of(edited) == base_models
    assert signal_keys_of(edited) == base_signals


TRAINING_EDITS = {
    "epochs": ({"training": {"epochs": 31}}, {"natural", "pgd_at"}),
    "seed": ({"training": {"seeds": [1]}}, {"natural", "pgd_at"}),
    "batch-size": ({"training": {"batch_size": 16}}, {"natural", "pgd_at"}),
    "lr": ({"training": {"optimizer": {"lr": 0.02}}}, {"natural", "pgd_at"}),
    "eps": ({"training": {"eps": 0.05}}, {"pgd_at"}),
    "pgd-at-steps": ({"defense": {"pgd_at": {"steps": 6}}}, {"pgd_at"}),
    "pgd-at-random-start": ({"defense": {"pgd_at": {"random_start": False}}}, {"pgd_at"}),
    "width": ({"model": {"width": 2.0}}, {"natural", "pgd_at"}),
    "hidden-layers": ({"model": {"options": {"hidden": [32]}}}, {"natural", "pgd_at"}),
    "n-members": ({"membership": {"n_members": 150}}, {"natural", "pgd_at"}),
    "n-nonmembers": ({"membership": {"n_nonmembers": 150}}, {"natural", "pgd_at"}),
    "split-seed": ({"data": {"split_seed": 3}}, {"natural", "pgd_at"}),
    "dataset-subset": ({"data": {"n_train": 1000}}, {"natural", "pgd_at"}),
}


@pytest.mark.parametrize(("edit", "changed"), TRAINING_EDITS.values(), ids=TRAINING_EDITS.keys())
def test_training_edits_change_exactly_the_affected_model_keys(write_spec, edit, changed):
    base = keys_of(write_spec(name="a.toml"))
    edited = keys_of(write_spec(edit, name="b.toml"))
    assert {d for d in base if edited[d] != base[d]} == changed
    # every signal of a retrained model gets a new key too (the model key is part of it)
    base_signals = signal_keys_of(write_spec(name="a.toml"))
    edited_signals = signal_keys_of(write_spec(edit, name="b.toml"))
    for (defense, name), key in base_signals.items():
        # ... and so does the natural model's "auto"-eps PGD when the swept eps changes
        follows_eps = "eps" in edit.get("training", {}) and name == "pgd"
        assert (edited_signals[(defense, name)] != key) == (defense in changed or follows_eps)


def test_explicit_auto_step_size_equals_default(write_spec):
    """`step_size = "auto"` resolves to 2.5 * eps / steps before hashing: writing the number gives the same key."""
    auto = keys_of(write_spec({"defense": {"pgd_at": {"step_size": "auto"}}}, name="a.toml"))
    number = keys_of(write_spec({"defense": {"pgd_at": {"step_size": 2.5 * 0.1 / 5}}}, name="b.toml"))
    assert auto == number
    (pgd_at,) = [j for j in jobs_of(write_spec(name="c.toml")) if j.defense == "pgd_at"]
    assert pgd_at.identity["training"]["params"]["step_size"] == pytest.approx(0.05, abs=1e-15)


def test_natural_model_ignores_eps_and_is_evaluated_at_every_swept_eps(write_spec):
    jobs = jobs_of(write_spec({"training": {"eps": [0.05, 0.1, 0.2]}}))
    natural = [j for j in jobs if j.defense == "natural"]
    robust = [j for j in jobs if j.defense == "pgd_at"]
    assert len(natural) == 1 and len(robust) == 3
    (model,) = natural
    assert model.eps is None and model.identity["training"]["eps"] is None
    assert model.model_name == "tiny/natural-s0"
    by_name = {p.name: p for p in model.perturbations}
    assert sorted(by_name) == ["benign", "pgd@0.05", "pgd@0.1", "pgd@0.2"]
    for eps in (0.05, 0.1, 0.2):
        settings = by_name[f"pgd@{eps:g}"].settings
        assert settings["eps"] == eps and settings["steps"] == 20
        assert settings["step_size"] == pytest.approx(2.5 * eps / 20, abs=1e-12)
    assert len({p.signal_key for p in model.perturbations}) == 4
    assert sorted(j.eps for j in robust) == [0.05, 0.1, 0.2]
    assert len({j.model_key for j in robust}) == 3
    for job in robust:
        assert [p.name for p in job.perturbations] == ["benign", "pgd"]
    # the natural model trained by a single-eps spec is the same model
    single = keys_of(write_spec({"training": {"eps": 0.2}}, name="single.toml"))
    assert single["natural"] == model.model_key


SIGNAL_EDITS = {
    "pgd-steps": {"steps": 10},
    "pgd-eps": {"eps": 0.05},
    "pgd-step-size": {"step_size": 0.01},
    "pgd-random-start": {"random_start": True},
}


@pytest.mark.parametrize("change", SIGNAL_EDITS.values(), ids=SIGNAL_EDITS.keys())
def test_pgd_signal_settings_change_only_that_signal_key(write_spec, change):
    base_spec = write_spec(name="a.toml")
    signals = [
        {"kind": "benign", "name": "benign"},
        {"kind": "adversarial", "name": "pgd", "steps": 20, **change},
    ]
    edited = write_spec({"signals": signals}, name="b.toml")
    assert keys_of(edited) == keys_of(base_spec)
    before, after = signal_keys_of(base_spec), signal_keys_of(edited)
    for (defense, name), key in before.items():
        assert (after[(defense, name)] != key) == (name == "pgd")


def test_random_start_seed_counts_only_with_random_start(write_spec):
    def pgd_keys(**settings):
        signals = [{"kind": "adversarial", "name": "pgd", **settings}]
        return signal_keys_of(write_spec({"signals": signals}, name="s.toml"))

    assert pgd_keys(seed=3) == pgd_keys(seed=0)
    assert pgd_keys(random_start=True, seed=3) != pgd_keys(random_start=True, seed=0)


def test_keys_are_independent_of_key_order_and_number_spelling():
    assert canonical_json({"b": 1.0, "a": [2, 0.5]}) == '{"a":[2,0.5],"b":1}'
    assert content_key({"x": 1, "y": 2.0}) == content_key({"y": 2, "x": 1.0})
    assert content_key({"x": 0.1}) != content_key({"x": 0.1000001})
    with pytest.raises(TypeError):
        canonical_json({"x": object()})


def test_check_expand_lists_keys(write_spec):
    from click.testing import CliRunner

    from robmia_db.cli import main

    path = write_spec()
    result = CliRunner().invoke(main, ["check", str(path), "--expand"])
    assert result.exit_code == 0, result.output
    jobs = jobs_of(path)
    for job in jobs:
        assert f"  {job.model_key}  {job.model_name}" in result.stdout
        for p in job.perturbations:
            assert p.signal_key in result.stdout
    assert "pgd (adversarial eps=0.1)" in result.stdout


# ---------------------------------------------------------------------------------- end to end, on a copy


def _state(db):
    models = run_query(
        db, "SELECT model_key, model_name, experiment, train_seconds, finished_at FROM v_models"
    )
    perturbations = run_query(
        db, "SELECT signal_key, model_key, model_name, perturbation, created_at FROM v_perturbations"
    )
    return {r["model_key"]: r for r in models.to_pylist()}, {
        r["signal_key"]: r for r in perturbations.to_pylist()
    }


def _checkpoint_mtimes(db) -> dict[str, int]:
    from robmia_db.store.connection import checkpoint_dir

    return {p.name: os.stat(p).st_mtime_ns for p in checkpoint_dir(db).glob("*.pt")}


def test_renaming_the_experiment_retrains_nothing(trained_store: TrainedStore, tmp_path):
    use_one_torch_thread()
    from robmia_db.runner.executor import run_specs

    db = trained_store.copy_to(tmp_path / "store")
    models_before, perturbations_before = _state(db)
    mtimes = _checkpoint_mtimes(db)
    spec = tmp_path / "renamed.toml"
    spec.write_text(
        toml_dumps(
            merged(trained_store.spec, {"experiment": {"name": "renamed", "description": "new words"}})
        )
    )
    summary = run_specs([spec], db)
    assert [o.action for o in summary.outcomes] == ["skip", "skip"]
    assert _checkpoint_mtimes(db) == mtimes
    models_after, perturbations_after = _state(db)
    assert models_after.keys() == models_before.keys()
    for key, row in models_after.items():
        assert row["experiment"] == "renamed"
        assert row["model_name"] == models_before[key]["model_name"].replace("tiny/", "renamed/")
        assert row["train_seconds"] == models_before[key]["train_seconds"]
        assert row["finished_at"] == models_before[key]["finished_at"]
    assert perturbations_after.keys() == perturbations_before.keys()
    for key, row in perturbations_after.items():
        assert row["created_at"] == perturbations_before[key]["created_at"]  # not recomputed
        assert row["model_name"].startswith("renamed/")
    experiments = run_query(
        db, "SELECT experiment, description, n_models FROM v_experiments ORDER BY 1"
    ).to_pylist()
    assert {"experiment": "renamed", "description": "new words", "n_models": 2} in experiments


def test_adding_a_perturbation_computes_only_it_from_the_checkpoint(trained_store: TrainedStore, tmp_path):
    use_one_torch_thread()
    from robmia_db.runner.executor import run_specs

    db = trained_store.copy_to(tmp_path / "store")
    models_before, perturbations_before = _state(db)
    mtimes = _checkpoint_mtimes(db)
    signals = [
        *trained_store.spec["signals"],
        {"kind": "adversarial", "name": "pgd_half", "eps": 0.05, "steps": 10},
    ]
    spec = tmp_path / "more.toml"
    spec.write_text(toml_dumps(merged(trained_store.spec, {"signals": signals})))
    summary = run_specs([spec], db)
    assert [o.action for o in summary.outcomes] == ["signals", "signals"]
    for outcome in summary.outcomes:
        # the outcome reports accuracies of what it computed: only the new perturbation
        assert sorted(outcome.accuracies) == ["pgd_half_test_acc", "pgd_half_train_acc"]
    assert _checkpoint_mtimes(db) == mtimes
    models_after, perturbations_after = _state(db)
    assert models_after == models_before
    new = {k: v for k, v in perturbations_after.items() if k not in perturbations_before}
    assert sorted((v["model_name"], v["perturbation"]) for v in new.values()) == [
        ("tiny/natural-s0", "pgd_half"),
        ("tiny/pgd_at-eps0.1-s0", "pgd_half"),
    ]
    for key, row in perturbations_before.items():
        assert perturbations_after[key] == row  # untouched: same created_at
    counts = run_query(
        db,
        "SELECT perturbation, count(*) AS n, count(DISTINCT (model_key, example_id)) AS d FROM v_signals GROUP BY 1",
    ).to_pylist()
    assert {r["perturbation"]: (r["n"], r["d"]) for r in counts} == {
        name: (800, 800) for name in ("benign", "pgd", "pgd_half")
    }
    settings = run_query(db, "SELECT settings FROM v_perturbations WHERE perturbation = 'pgd_half'").column(0)
    for text in settings.to_pylist():
        parsed = json.loads(text)
        assert (
            parsed["eps"] == 0.05 and parsed["steps"] == 10 and parsed["step_size"] == pytest.approx(0.0125)
        )
    # a second rerun has nothing left to do
    again = run_specs([spec], db)
    assert [o.action for o in again.outcomes] == ["skip", "skip"]


def test_renaming_a_signal_renames_it_in_the_store(trained_store: TrainedStore, tmp_path):
    """Signal names are metadata too: the rerun recomputes nothing but the store shows the new name."""
    use_one_torch_thread()
    from robmia_db.runner.executor import run_specs

    db = trained_store.copy_to(tmp_path / "store")
    _, perturbations_before = _state(db)
    signals = [dict(s, name="pgd20") if s["name"] == "pgd" else s for s in trained_store.spec["signals"]]
    spec = tmp_path / "renamed_signal.toml"
    spec.write_text(toml_dumps(merged(trained_store.spec, {"signals": signals})))
    summary = run_specs([spec], db)
    assert [o.action for o in summary.outcomes] == ["skip", "skip"]
    names = (
        run_query(db, "SELECT DISTINCT perturbation FROM v_perturbations ORDER BY 1").column(0).to_pylist()
    )
    assert names == ["benign", "pgd20"]
    _, perturbations_after = _state(db)
    assert perturbations_after.keys() == perturbations_before.keys()
    for key, row in perturbations_after.items():
        assert row["created_at"] == perturbations_before[key]["created_at"]
        assert row["perturbation"] == perturbations_before[key]["perturbation"].replace("pgd", "pgd20")
    in_signals = run_query(db, "SELECT DISTINCT perturbation FROM v_signals ORDER BY 1").column(0).to_pylist()
    assert in_signals == ["benign", "pgd20"]
