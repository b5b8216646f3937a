"""Tests of the attacks layer: built-in attacks against numpy, definition errors, the sandbox, caching, references.

Synthetic stores are imported from seeded npz files (no training). Reference-model attacks run on two
populations of three models on independent random halves: one imported under a shared `--dataset`, one
trained from a random_halves spec (seconds), which also serves the tests that add signals to stored models."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from attack_fixtures import (
    REFERENCE_ATTACKS,
    SIGNAL_ATTACKS,
    SQL_BUILTINS,
    SyntheticOutputs,
    all_metrics,
    all_scores,
    balanced_accuracy_at,
    best_threshold,
    class_threshold_scores,
    file_digest,
    import_synthetic,
    imported_population_outputs,
    metrics_row,
    paper_inference_loop,
    population_spec,
    query,
    reference_scores,
    reference_signals,
    row_counts,
    scores_of,
    signals_by_model,
    sql_attack,
    synthetic_outputs,
    write_attack,
)
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from robmia_db.attacks.metrics import METRIC_COLUMNS, reference_metrics
from robmia_db.attacks.nested_calibration import CHANCE_NOTE
from robmia_db.attacks.registry import BUILTIN_DIR, load_registry
from robmia_db.attacks.scoring import AttackOutcome, score_attacks
from robmia_db.cli import main
from robmia_db.errors import AttackDefinitionError

INTEGER_METRICS = ("n_members", "n_nonmembers", "tp_at_best", "fp_at_best", "auc_numerator2")
FLOAT_METRICS = tuple(c for c in METRIC_COLUMNS if c not in INTEGER_METRICS)
CONFIDENCE_BODY = "SELECT model_key, example_id, CAST(confidence AS DOUBLE) AS score FROM target"
POPULATION_EPOCHS = 25
SHOKRI_PARAMS = {"max_iter": 10}
SHOKRI = "attack_model[max_iter=10]"  # a parameter variant is its own attack


@dataclass
class SyntheticStore:
    db: Path
    outputs: dict[str, SyntheticOutputs]
    keys: dict[str, str]
    outcomes: dict[str, AttackOutcome]


def _synthetic_store(folder: Path, saturated: bool) -> SyntheticStore:
    """Two models: `wide` (400 rows; benign, pgd, and `worst` marked adversarial by kind__), `narrow` (300 rows)."""
    wide = synthetic_outputs(11, n=400, saturated=saturated, adversarial={"pgd": 1.5, "worst": 2.5})
    wide.kinds = {"worst": "adversarial"}
    wide.eps = {"worst": 0.03}
    narrow = synthetic_outputs(12, n=300, n_classes=7, saturated=saturated, adversarial={"pgd": 1.5})
    outputs = {"wide": wide, "narrow": narrow}
    db = folder / "store.duckdb"
    keys = import_synthetic(db, folder / "npz", outputs)
    outcomes = {o.attack.name: o for o in score_attacks(db, list(SQL_BUILTINS))}
    return SyntheticStore(db, outputs, keys, outcomes)


@pytest.fixture(scope="module")
def untied_store(tmp_path_factory: pytest.TempPathFactory) -> SyntheticStore:
    return _synthetic_store(tmp_path_factory.mktemp("untied"), saturated=False)


@pytest.fixture(scope="module")
def tied_store(tmp_path_factory: pytest.TempPathFactory) -> SyntheticStore:
    return _synthetic_store(tmp_path_factory.mktemp("tied"), saturated=True)


@pytest.fixture(params=["untied", "tied"])
def store(request: pytest.FixtureRequest) -> SyntheticStore:
    return request.getfixturevalue(f"{request.param}_store")


def _units(store: SyntheticStore):
    """(model name, attack, perturbation) for every built-in SQL attack's expected score unit."""
    for name, outputs in store.outputs.items():
        for attack in SQL_BUILTINS:
            for perturbation in outputs.logits:
                if attack == "adv_loss_gap" and perturbation == "benign":
                    continue
                yield name, attack, perturbation


# ---------------------------------------------------------------- built-in SQL attacks against numpy


def test_tied_store_really_ties(tied_store: SyntheticStore):
    """The tied store is only a test of tie handling if many float32 confidences are exactly 1.0f."""
    for outputs in tied_store.outputs.values():
        confidence = reference_signals(outputs.logits["benign"], outputs.labels)["confidence"]
        saturated = confidence == 1.0
        assert saturated[outputs.is_member].sum() > 50 and saturated[~outputs.is_member].sum() > 10
        assert np.unique(
            reference_signals(outputs.logits["benign"], outputs.labels)["loss"]
        ).size > 0.99 * len(confidence)


def test_sql_attack_scores_equal_numpy_formulas(store: SyntheticStore):
    stored = all_scores(store.db)
    assert len(stored) == len(list(_units(store)))
    for name, attack, perturbation in _units(store):
        outputs = store.outputs[name]
        ids, scores, members = stored[(attack, store.keys[name], perturbation)]
        expected = reference_scores(outputs, attack, perturbation)
        label = f"{name}/{attack}/{perturbation}"
        np.testing.assert_array_equal(ids, np.arange(len(outputs.labels)), err_msg=label)
        np.testing.assert_array_equal(members, outputs.is_member, err_msg=label)
        if attack == "confidence":
            # the paper's float32 softmax, bit for bit: saturated 1.0f must tie exactly as in the paper
            np.testing.assert_array_equal(scores, expected, err_msg=label)
        else:
            np.testing.assert_allclose(scores, expected, rtol=1e-12, atol=1e-14, err_msg=label)


def test_stored_metrics_equal_numpy_sklearn_and_the_paper_loop(store: SyntheticStore):
    stored = all_metrics(store.db)
    assert len(stored) == len(list(_units(store)))
    for name, attack, perturbation in _units(store):
        outputs = store.outputs[name]
        expected_scores = reference_scores(outputs, attack, perturbation)
        expected = reference_metrics(expected_scores, outputs.is_member)
        row = stored[(attack, store.keys[name], perturbation)]
        label = f"{name}/{attack}/{perturbation}"
        for column in INTEGER_METRICS:
            assert row[column] == expected[column], f"{label}: {column}"
        for column in FLOAT_METRICS:
            if expected[column] is None:  # an FPR level too fine for these non-members
                assert row[column] is None, f"{label}: {column}"
                continue
            assert row[column] == pytest.approx(expected[column], abs=1e-12, rel=0), f"{label}: {column}"
        auc = roc_auc_score(outputs.is_member, expected_scores)
        assert row["auc"] == pytest.approx(auc, abs=1e-12, rel=0), label
        paper = paper_inference_loop(expected_scores[outputs.is_member], expected_scores[~outputs.is_member])
        assert row["balanced_accuracy"] == pytest.approx(paper, abs=1e-12, rel=0), label


def test_members_score_higher_for_every_attack(store: SyntheticStore):
    rows = query(store.db, "SELECT attack, model_name, perturbation, balanced_accuracy, auc FROM v_metrics")
    assert {r["attack"] for r in rows} == set(SQL_BUILTINS)
    for row in rows:
        assert row["balanced_accuracy"] > 0.6 and row["auc"] > 0.6, row


def test_scored_once_per_perturbation(untied_store: SyntheticStore):
    rows = query(
        untied_store.db,
        "SELECT attack, model_name, perturbation, kind, perturbation_eps, n_members + n_nonmembers AS n "
        "FROM v_metrics WHERE attack IN ('confidence', 'adv_loss_gap')",
    )
    units = {(r["attack"], r["model_name"], r["perturbation"]): r for r in rows}
    assert set(units) == {
        ("confidence", "wide", "benign"), ("confidence", "wide", "pgd"), ("confidence", "wide", "worst"),
        ("confidence", "narrow", "benign"), ("confidence", "narrow", "pgd"),
        ("adv_loss_gap", "wide", "pgd"), ("adv_loss_gap", "wide", "worst"), ("adv_loss_gap", "narrow", "pgd"),
    }  # fmt: skip
    assert units[("adv_loss_gap", "wide", "worst")]["kind"] == "adversarial"
    assert units[("adv_loss_gap", "wide", "worst")]["perturbation_eps"] == pytest.approx(0.03)
    assert units[("confidence", "narrow", "pgd")]["n"] == 300
    counts = query(
        untied_store.db,
        "SELECT attack, model_name, perturbation, count(*) AS n FROM v_scores GROUP BY ALL",
    )
    assert all(r["n"] == len(untied_store.outputs[r["model_name"]].labels) for r in counts)
    assert len(counts) == 5 * len(SIGNAL_ATTACKS) + 3
    assert (
        untied_store.outcomes["confidence"].scored == 5 and untied_store.outcomes["adv_loss_gap"].scored == 3
    )


def test_python_attack_reads_the_same_relations(untied_store: SyntheticStore, tmp_path: Path):
    path = write_attack(
        tmp_path,
        "py_gap.py",
        """
import numpy as np

ATTACK = {"title": "loss gap in Python", "needs": ["benign", "adversarial"], "params": {"weight": 1.0}}


def score(ctx, params):
    table = ctx.sql(
        "SELECT a.model_key, a.example_id, a.loss AS adv, b.loss AS ben FROM adversarial a "
        "JOIN benign b USING (model_key, example_id)"
    ).to_pandas()
    return {"model_key": table["model_key"], "example_id": table["example_id"],
            "score": params["weight"] * (table["ben"] - table["adv"]).to_numpy()}
""",
    )
    db = shutil.copy2(untied_store.db, tmp_path / "store.duckdb")
    before = row_counts(db)
    (outcome,) = score_attacks(db, [path], params={"weight": 2.0})
    assert outcome.scored == 3
    stored = all_scores(db)
    for name, perturbation in (("wide", "pgd"), ("wide", "worst"), ("narrow", "pgd")):
        _, scores, _ = stored[("py_gap[weight=2.0]", untied_store.keys[name], perturbation)]
        expected = 2.0 * reference_scores(untied_store.outputs[name], "adv_loss_gap", perturbation)
        np.testing.assert_allclose(scores, expected, rtol=1e-12, atol=1e-14)
    after = row_counts(db)
    assert after["metrics"] == before["metrics"] + 3


# ---------------------------------------------------------------- definition errors

DEFINITION_ERRORS = [
    ("unknown_param.sql", sql_attack("SELECT model_key, example_id, confidence * $scale AS score FROM target"),
     r"uses \$scale but declares no such param"),
    ("unused_param.sql", sql_attack(CONFIDENCE_BODY, params="{ scale = 2.0 }"),
     r"declares param 'scale' but never uses \$scale"),
    ("two_columns.sql", sql_attack("SELECT model_key, example_id FROM target"),
     r"must return exactly \(model_key, example_id, score\); got \(model_key, example_id\)"),
    ("member_score.sql", sql_attack("SELECT model_key, example_id, confidence AS member_score FROM target"),
     r"must return exactly \(model_key, example_id, score\); got \(model_key, example_id, member_score\)"),
    ("duplicate_rows.sql",
     sql_attack("SELECT model_key, CAST(example_id // 2 * 2 AS INTEGER) AS example_id, loss AS score FROM target"),
     r"returned the same \(model_key, example_id\) twice"),
    ("missing_rows.sql", sql_attack(CONFIDENCE_BODY + " WHERE example_id % 2 = 0"),
     r"returned \d+ scores for model \w+, which has \d+ examples"),
    ("no_needs.sql", '-- title = "t"\n' + CONFIDENCE_BODY, r"header has no `needs`"),
    ("unknown_needs.sql", sql_attack(CONFIDENCE_BODY, needs='["signals"]'), r"`needs` has unknown entry 'signals'"),
    ("mixed_needs.sql", sql_attack(CONFIDENCE_BODY, needs='["signal", "benign"]'), r"mixes \"signal\" with specific kinds"),
    ("invalid_toml.sql", '-- title = "unterminated\n-- needs = ["signal"]\n' + CONFIDENCE_BODY,
     r"header is not valid TOML"),
    ("no_title.sql", '-- needs = ["signal"]\n' + CONFIDENCE_BODY, r"header has no `title`"),
    ("no_body.sql", sql_attack(""), r"has no SQL after its header"),
    ("two_statements.sql", sql_attack(CONFIDENCE_BODY + ";\n" + CONFIDENCE_BODY),
     r"must be exactly one SELECT statement \(found 2\)"),
    ("no_attack_dict.py", "def score(ctx, params):\n    return None\n", r"defines no ATTACK = \{\.\.\.\} header dict"),
    ("no_score_function.py", "ATTACK = {'title': 't', 'needs': ['signal']}\n", r"defines no score\(ctx, params\) function"),
    ("raises.py", "ATTACK = {'title': 't', 'needs': ['signal']}\n\ndef score(ctx, params):\n    raise ValueError('boom')\n",
     r"score\(\) raised ValueError: boom"),
]  # fmt: skip


@pytest.mark.parametrize("filename, text, message", DEFINITION_ERRORS, ids=[c[0] for c in DEFINITION_ERRORS])
def test_definition_error(
    untied_store: SyntheticStore, tmp_path: Path, filename: str, text: str, message: str
):
    path = write_attack(tmp_path, filename, text)
    digest = file_digest(untied_store.db)
    with pytest.raises(AttackDefinitionError) as raised:
        score_attacks(untied_store.db, [path])
    text_of_error = str(raised.value)
    assert "\n" not in text_of_error
    assert text_of_error.startswith(f"{path}: "), text_of_error
    assert re.search(message, text_of_error), text_of_error
    assert file_digest(untied_store.db) == digest

    result = CliRunner().invoke(main, ["score", "--attack", str(path), "--db", str(untied_store.db)])
    assert result.exit_code == 1, result.output
    assert result.stderr == f"Error: {text_of_error}\n"
    assert file_digest(untied_store.db) == digest


# ---------------------------------------------------------------- the sandbox: attacks cannot write or read files

WRITING_ATTACKS = [
    ("delete.sql", "DELETE FROM signals", r"a DELETE statement is refused"),
    ("drop.sql", "DROP TABLE models", r"a DROP statement is refused"),
    ("create_as.sql", "CREATE TABLE x AS " + CONFIDENCE_BODY, r"a CREATE statement is refused"),
    ("attach.sql", "ATTACH '{tmp}/x.db'", r"a ATTACH statement is refused"),
    ("copy.sql", "COPY signals TO '{tmp}/x.csv'", r"a COPY statement is refused"),
    ("copy_query.sql", "COPY (" + CONFIDENCE_BODY + ") TO '{tmp}/x.csv'", r"a COPY statement is refused"),
    ("set.sql", "SET enable_external_access = true", r"a SET statement is refused"),
    ("read_csv.sql", CONFIDENCE_BODY + " WHERE (SELECT count(*) FROM read_csv('/etc/passwd')) >= 0",
     r"SQL failed: .*(disabled|Permission)"),
    ("read_text.sql", CONFIDENCE_BODY + " WHERE (SELECT count(*) FROM read_text('{tmp}/secret.txt')) >= 0",
     r"SQL failed: .*(disabled|Permission)"),
]  # fmt: skip


@pytest.mark.parametrize("filename, body, message", WRITING_ATTACKS, ids=[c[0] for c in WRITING_ATTACKS])
def test_writing_attack_is_refused(
    untied_store: SyntheticStore, tmp_path: Path, filename: str, body: str, message: str
):
    (tmp_path / "secret.txt").write_text("model_key,example_id,score\n")
    path = write_attack(tmp_path / "attacks", filename, sql_attack(body.replace("{tmp}", str(tmp_path))))
    digest, counts = file_digest(untied_store.db), row_counts(untied_store.db)
    with pytest.raises(AttackDefinitionError, match=message) as raised:
        score_attacks(untied_store.db, [path])
    assert str(raised.value).startswith(f"{path}: ") and "\n" not in str(raised.value)
    assert file_digest(untied_store.db) == digest
    assert row_counts(untied_store.db) == counts
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "x.db").exists()


def test_python_attack_cannot_write(untied_store: SyntheticStore, tmp_path: Path):
    """Through ctx.sql (refused as not a SELECT) or the raw connection (read-only): the store is unchanged."""
    header = "ATTACK = {'title': 't', 'needs': ['signal']}\n\ndef score(ctx, params):\n"
    digest, counts = file_digest(untied_store.db), row_counts(untied_store.db)
    for name, line in (
        ("via_sql.py", "ctx.sql('DELETE FROM signals')"),
        ("raw.py", "ctx._con.execute('DELETE FROM signals')"),
    ):
        path = write_attack(tmp_path, name, header + f"    {line}\n")
        # refused as a statement, or (raw connection) the sandbox holds no `signals` table to delete from
        with pytest.raises(
            AttackDefinitionError, match=r"DELETE statement is refused|signals does not exist"
        ):
            score_attacks(untied_store.db, [path])
    assert file_digest(untied_store.db) == digest
    assert row_counts(untied_store.db) == counts


def test_python_attack_write_error_names_the_file(untied_store: SyntheticStore, tmp_path: Path):
    path = write_attack(
        tmp_path, "via_sql.py", "ATTACK = {'title': 't', 'needs': ['signal']}\n\ndef score(ctx, params):\n"
        "    ctx.sql('DELETE FROM signals')\n",
    )  # fmt: skip
    with pytest.raises(AttackDefinitionError) as raised:
        score_attacks(untied_store.db, [path])
    assert str(raised.value).startswith(f"{path}: ")


@pytest.mark.parametrize(
    "body",
    [
        "SELECT t.model_key, t.example_id, CAST(m.is_member AS DOUBLE) AS score FROM target t "
        "JOIN membership m USING (model_key, example_id)",
        "SELECT model_key, example_id, CAST(is_member AS DOUBLE) AS score FROM v_signals WHERE perturbation = 'benign'",
        "SELECT model_key, example_id, CAST(is_member AS DOUBLE) AS score FROM target",
    ],
    ids=["membership", "v_signals", "target"],
)
def test_attack_cannot_read_target_membership(untied_store: SyntheticStore, tmp_path: Path, body: str):
    path = write_attack(tmp_path, "cheat.sql", sql_attack(body))
    digest = file_digest(untied_store.db)
    with pytest.raises(AttackDefinitionError, match=r"SQL failed: .*(membership|v_signals|is_member)"):
        score_attacks(untied_store.db, [path])
    assert file_digest(untied_store.db) == digest


# ---------------------------------------------------------------- caching


@pytest.fixture
def cache_store(tmp_path: Path) -> SyntheticStore:
    outputs = {"solo": synthetic_outputs(21, n=200, adversarial={"pgd": 1.5})}
    db = tmp_path / "cache.duckdb"
    return SyntheticStore(db, outputs, import_synthetic(db, tmp_path / "npz", outputs), {})


def _outcomes(db: Path, attacks: list, **kwargs) -> dict[str, tuple[int, int]]:
    return {o.attack.name: (o.scored, o.cached) for o in score_attacks(db, attacks, **kwargs)}


def _metrics_state(db: Path) -> list[dict]:
    return query(
        db, "SELECT attack, perturbation, attack_key, inputs_key, created_at FROM v_metrics ORDER BY ALL"
    )


def test_cache_second_run_scores_nothing(cache_store: SyntheticStore):
    db = cache_store.db
    assert _outcomes(db, ["confidence", "adv_loss_gap"]) == {"confidence": (2, 0), "adv_loss_gap": (1, 0)}
    state, counts = _metrics_state(db), row_counts(db)
    assert _outcomes(db, ["confidence", "adv_loss_gap"]) == {"confidence": (0, 2), "adv_loss_gap": (0, 1)}
    assert _metrics_state(db) == state and row_counts(db) == counts
    assert _outcomes(db, ["confidence"], force=True) == {"confidence": (2, 0)}
    assert row_counts(db) == counts
    assert [r["created_at"] for r in _metrics_state(db) if r["attack"] == "confidence"] != [
        r["created_at"] for r in state if r["attack"] == "confidence"
    ]


def test_cache_edited_attack_rescored_and_replaced(cache_store: SyntheticStore, tmp_path: Path):
    db, outputs, key = cache_store.db, cache_store.outputs["solo"], cache_store.keys["solo"]
    folder = tmp_path / "mine"
    path = write_attack(folder, "mine.sql", sql_attack(CONFIDENCE_BODY, title="mine"))
    attacks = ["confidence", "adv_loss_gap", "mine"]
    first = _outcomes(db, attacks, attack_paths=[folder])
    assert first == {"confidence": (2, 0), "adv_loss_gap": (1, 0), "mine": (2, 0)}
    cached = {name: (0, scored) for name, (scored, _) in first.items()}
    old_key = query(db, "SELECT DISTINCT attack_key FROM v_metrics WHERE attack = 'mine'")[0]["attack_key"]

    # whitespace-only edits keep the content key: nothing re-runs
    path.write_text(path.read_text() + "   \n\n")
    assert _outcomes(db, attacks, attack_paths=[folder]) == cached

    path.write_text(
        sql_attack("SELECT model_key, example_id, -loss AS score FROM target", title="mine, edited")
    )
    assert _outcomes(db, attacks, attack_paths=[folder]) == {**cached, "mine": (2, 0)}
    rows = query(db, "SELECT perturbation, attack_key, attack_title FROM v_metrics WHERE attack = 'mine'")
    assert sorted(r["perturbation"] for r in rows) == ["benign", "pgd"]
    assert {r["attack_title"] for r in rows} == {"mine, edited"} and old_key not in {
        r["attack_key"] for r in rows
    }
    assert query(db, "SELECT count(*) AS n FROM scores WHERE attack_key = $k", k=old_key)[0]["n"] == 0
    assert query(db, "SELECT count(*) AS n FROM metrics WHERE attack_key = $k", k=old_key)[0]["n"] == 0
    duplicates = query(
        db, "SELECT attack, model_key, perturbation FROM v_metrics GROUP BY ALL HAVING count(*) > 1"
    )
    assert duplicates == []
    assert query(db, "SELECT count(*) AS n FROM v_scores WHERE attack = 'mine'")[0]["n"] == 2 * 200
    for perturbation in ("benign", "pgd"):
        _, scores, _ = scores_of(db, "mine", key, perturbation)
        np.testing.assert_allclose(
            scores, reference_scores(outputs, "loss", perturbation), rtol=1e-12, atol=1e-14
        )


def test_param_variants_side_by_side_and_stored_attacks_rescored_on_new_models(
    cache_store: SyntheticStore, tmp_path: Path
):
    """Issue 12 item 5: a --param value is its own attack `name[k=v]`; a plain `score` re-scores every stored
    attack (user files passed once, variants) on a model added later, from the source kept in the store."""
    db = cache_store.db
    folder = tmp_path / "gone"
    path = write_attack(
        folder, "scaled.sql",
        sql_attack("SELECT model_key, example_id, confidence * $scale AS score FROM target", params="{ scale = 2.0 }"),
    )  # fmt: skip
    assert _outcomes(db, [path]) == {"scaled": (2, 0)}
    assert _outcomes(db, [path], params={"scale": 3.0}) == {"scaled[scale=3.0]": (2, 0)}
    result = CliRunner().invoke(
        main, ["score", "--attack", str(path), "--param", "scale=3.0", "--db", str(db)]
    )
    assert result.exit_code == 0, result.output
    assert "scaled[scale=3.0]: 0 scored, 2 cached" in result.stdout
    expected = reference_scores(cache_store.outputs["solo"], "confidence", "benign")
    for attack, factor in (("scaled", 2.0), ("scaled[scale=3.0]", 3.0)):
        _, scores, _ = scores_of(db, attack, cache_store.keys["solo"], "benign")
        np.testing.assert_allclose(scores, factor * expected, rtol=1e-6)
        assert query(db, "SELECT count(*) AS n FROM v_metrics WHERE attack = $a", a=attack)[0]["n"] == 2
    assert query(db, "SELECT base_attack FROM v_attacks WHERE attack = 'scaled[scale=3.0]'") == [
        {"base_attack": "scaled"}
    ]
    with pytest.raises(AttackDefinitionError, match=r"unknown parameter 'scale'"):
        load_registry().get("confidence").with_params({"scale": 1.0})
    # the file is gone; a model added later still gets both, from the stored source
    shutil.rmtree(folder)
    later = synthetic_outputs(23, n=120, adversarial={})
    import_synthetic(db, tmp_path / "later", {"later": later})
    outcomes = _outcomes(db, None)
    assert outcomes["scaled"] == (1, 2) and outcomes["scaled[scale=3.0]"] == (1, 2), outcomes
    key = query(db, "SELECT model_key FROM v_models WHERE model_name = 'later'")[0]["model_key"]
    later_confidence = reference_scores(later, "confidence", "benign")
    for attack, factor in (("scaled", 2.0), ("scaled[scale=3.0]", 3.0)):
        _, scores, _ = scores_of(db, attack, key, "benign")
        np.testing.assert_allclose(scores, factor * later_confidence, rtol=1e-6)


def test_cache_new_model_scores_only_its_pairs(cache_store: SyntheticStore, tmp_path: Path):
    db = cache_store.db
    assert _outcomes(db, ["confidence", "adv_loss_gap"]) == {"confidence": (2, 0), "adv_loss_gap": (1, 0)}
    import_synthetic(
        db, tmp_path / "more", {"second": synthetic_outputs(22, n=150, adversarial={"pgd": 1.5})}
    )
    assert _outcomes(db, ["confidence", "adv_loss_gap"]) == {"confidence": (2, 2), "adv_loss_gap": (1, 1)}
    result = CliRunner().invoke(main, ["score", "--attack", "confidence", "--force", "--db", str(db)])
    assert result.exit_code == 0, result.output
    assert (
        "confidence: 4 scored, 0 cached" in result.stdout
        and "4 (attack, model, perturbation) scored" in result.stdout
    )


# ---------------------------------------------------------------- reference models: skips and a trained population


def test_reference_attacks_skipped_without_references(untied_store: SyntheticStore, tmp_path: Path):
    db = shutil.copy2(untied_store.db, tmp_path / "store.duckdb")
    outcomes = {o.attack.name: o for o in score_attacks(db, list(REFERENCE_ATTACKS))}
    for name in REFERENCE_ATTACKS:
        assert outcomes[name].scored == 0 and len(outcomes[name].skipped) == 5
    skips = query(db, "SELECT attack, model_name, perturbation, reason FROM v_attack_skips")
    assert {(r["attack"], r["model_name"], r["perturbation"]) for r in skips} == {
        (a, m, p) for a in REFERENCE_ATTACKS for m, o in untied_store.outputs.items() for p in o.logits
    }
    assert all("needs reference models" in r["reason"] for r in skips)
    assert (
        query(
            db,
            "SELECT count(*) AS n FROM v_metrics WHERE attack IN ('class_thresholds', 'attack_model')",
        )[0]["n"]
        == 0
    )
    result = CliRunner().invoke(main, ["score", "--attack", "class_thresholds", "--db", str(db)])
    assert result.exit_code == 0, result.output
    assert "class_thresholds: 0 scored, 0 cached, 5 skipped" in result.stdout
    assert "  skipped: needs reference models" in result.stdout


def test_kind_attack_skipped_without_that_kind(tmp_path: Path):
    benign_only = synthetic_outputs(31, n=100, adversarial={})
    db = tmp_path / "benign.duckdb"
    import_synthetic(db, tmp_path / "npz", {"benign_only": benign_only})
    (outcome,) = score_attacks(db, ["adv_loss_gap"])
    assert outcome.scored == 0 and outcome.skipped == [
        ("benign_only", None, "needs adversarial signals; the model has none")
    ]
    assert query(db, "SELECT attack, perturbation, reason FROM v_attack_skips") == [
        {
            "attack": "adv_loss_gap",
            "perturbation": None,
            "reason": "needs adversarial signals; the model has none",
        }
    ]


def test_model_filter_keeps_other_models_skips(tmp_path: Path):
    db = tmp_path / "store.duckdb"
    import_synthetic(
        db,
        tmp_path / "npz",
        {"adv": synthetic_outputs(61, n=60), "plain": synthetic_outputs(62, n=60, adversarial={})},
    )
    score_attacks(db, ["adv_loss_gap"])
    expected = [{"model_name": "plain", "reason": "needs adversarial signals; the model has none"}]
    assert query(db, "SELECT model_name, reason FROM v_attack_skips") == expected
    score_attacks(db, ["adv_loss_gap"], models=["adv"], force=True)
    assert query(db, "SELECT model_name, reason FROM v_attack_skips") == expected


@dataclass
class Population:
    db: Path
    keys: dict[str, str]  # model name -> key
    outcomes: dict[str, AttackOutcome]
    perturbations: tuple[str, ...]
    shokri_target: str  # attack_model is scored on this model only: its fit costs seconds


@pytest.fixture(scope="module")
def population(tmp_path_factory: pytest.TempPathFactory) -> Population:
    """Three MLPs trained on independent random halves of 300 digits, scored with global and reference attacks."""
    import torch

    from robmia_db.runner.executor import run_specs

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("population")
    db = folder / "population.duckdb"
    summary = run_specs([population_spec(folder / "population.toml", epochs=POPULATION_EPOCHS)], db)
    assert not summary.failed and [o.action for o in summary.outcomes] == ["train"] * 3
    return _score_population(
        db, ("benign",), "population/natural-s0-m0", ["confidence", "loss", "class_thresholds"]
    )


@pytest.fixture(scope="module")
def imported_population(tmp_path_factory: pytest.TempPathFactory) -> Population:
    """Three imported models over the same 240 examples, each on its own random half, under one --dataset."""
    folder = tmp_path_factory.mktemp("imported_population")
    db = folder / "imported.duckdb"
    import_synthetic(db, folder / "npz", imported_population_outputs(41), dataset="shared")
    return _score_population(db, ("benign", "pgd"), "half0", ["confidence", "class_thresholds"])


def _score_population(
    db: Path, perturbations: tuple[str, ...], shokri_target: str, attacks: list[str]
) -> Population:
    from threadpoolctl import threadpool_limits

    outcomes = score_attacks(db, attacks)
    with threadpool_limits(1):
        outcomes += score_attacks(db, ["attack_model"], params=SHOKRI_PARAMS, models=[shokri_target])
    keys = {r["model_name"]: r["model_key"] for r in query(db, "SELECT model_name, model_key FROM v_models")}
    return Population(db, keys, {o.attack.base_name: o for o in outcomes}, perturbations, shokri_target)


@pytest.fixture(params=["population", "imported_population"])
def any_population(request: pytest.FixtureRequest) -> Population:
    return request.getfixturevalue(request.param)


def test_configurations_count_a_fleets_models_and_its_one_seed(population: Population):
    # A fleet's models share seed 0 and differ in their member set: n_models of them, one seed.
    (row,) = query(
        population.db,
        "SELECT * FROM v_configurations WHERE attack = 'confidence' AND perturbation = 'benign'",
    )
    values = [
        r["balanced_accuracy"]
        for r in query(
            population.db,
            "SELECT balanced_accuracy FROM v_metrics WHERE attack = 'confidence' AND kind = 'benign'",
        )
    ]
    assert (row["n_models"], row["n_seeds"], row["seeds"]) == (3, 1, [0]) and len(values) == 3
    assert row["balanced_accuracy_mean"] == pytest.approx(np.mean(values), abs=1e-14)
    assert row["balanced_accuracy_sd"] == pytest.approx(np.std(values, ddof=1), abs=1e-14)


def test_population_runs_reference_attacks(any_population: Population):
    population = any_population
    n_units = 3 * len(population.perturbations)
    for name, outcome in population.outcomes.items():
        expected = len(population.perturbations) if name == "attack_model" else n_units
        assert outcome.scored == expected and outcome.skipped == [], name
    rows = query(
        population.db,
        "SELECT attack, model_name, n_reference_models, n_members, n_nonmembers, calibration_note FROM v_metrics",
    )
    assert len(rows) == (len(population.outcomes) - 1) * n_units + len(population.perturbations)
    half = query(population.db, "SELECT n_members, n_nonmembers FROM v_models LIMIT 1")[0]
    assert all(r["n_members"] == half["n_members"] == r["n_nonmembers"] == half["n_nonmembers"] for r in rows)
    # calibration pools the two references' scores; an attack that reads reference models pools their
    # nested leave-one-out scores (each rescored without the target), the one-target shokri run included
    assert {(r["attack"], r["n_reference_models"]) for r in rows} == {
        *((name, 2) for name in population.outcomes if name != "attack_model"),
        (SHOKRI, 2),
    }
    for row in rows:
        assert row["calibration_note"] in (None, CHANCE_NOTE), row
    assert query(population.db, "SELECT count(*) AS n FROM v_attack_skips")[0]["n"] == 0


def test_class_thresholds_scores_equal_numpy(any_population: Population):
    """score = confidence minus its class's best threshold on the two reference models (brute force here)."""
    stored = all_scores(any_population.db)
    for perturbation in any_population.perturbations:
        signals = signals_by_model(any_population.db, perturbation)
        assert len(signals) == 3
        for key, target in signals.items():
            expected = class_threshold_scores(target, [signals[other] for other in signals if other != key])
            ids, scores, _ = stored[("class_thresholds", key, perturbation)]
            np.testing.assert_array_equal(ids, target["example_id"])
            np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-15)


def test_class_thresholds_at_least_matches_a_global_threshold(any_population: Population):
    rows = query(
        any_population.db,
        "SELECT c.model_name, c.balanced_accuracy AS per_class, g.balanced_accuracy AS global_ FROM v_metrics c "
        "JOIN v_metrics g USING (model_key, perturbation) WHERE c.attack = 'class_thresholds' AND g.attack = 'confidence'",
    )
    assert len(rows) == 3 * len(any_population.perturbations)
    assert any(r["per_class"] >= r["global_"] for r in rows), rows


def test_calibrated_accuracy_from_reference_thresholds(any_population: Population):
    """The threshold best on the pooled reference models (brute force here), applied to the target."""
    stored = all_scores(any_population.db)
    rows = query(
        any_population.db,
        "SELECT attack, model_key, perturbation, balanced_accuracy, calibrated_accuracy, calibrated_threshold "
        "FROM v_metrics WHERE attack NOT LIKE 'attack_model%' AND attack <> 'class_thresholds'",
    )
    assert len(rows) == (len(any_population.outcomes) - 2) * 3 * len(any_population.perturbations)
    for row in rows:
        assert row["calibrated_accuracy"] is not None, row
        assert row["calibrated_accuracy"] <= row["balanced_accuracy"] + 1e-12, row
        others = [
            stored[(row["attack"], k, row["perturbation"])]
            for k in any_population.keys.values()
            if k != row["model_key"]
        ]
        threshold = best_threshold(
            np.concatenate([o[1] for o in others]), np.concatenate([o[2] for o in others])
        )
        assert row["calibrated_threshold"] == threshold, row
        _, scores, members = stored[(row["attack"], row["model_key"], row["perturbation"])]
        calibrated = balanced_accuracy_at(threshold, scores, members)
        assert row["calibrated_accuracy"] == pytest.approx(calibrated, abs=1e-12, rel=0), row


def test_attack_model_scores_and_metrics(any_population: Population):
    key = any_population.keys[any_population.shokri_target]
    stored = all_scores(any_population.db)
    for perturbation in any_population.perturbations:
        _, scores, members = stored[(SHOKRI, key, perturbation)]
        assert (
            len(scores) == len(members)
            and np.all((scores >= 0) & (scores <= 1))
            and np.unique(scores).size > 20
        )
        expected = reference_metrics(scores, members)
        row = metrics_row(any_population.db, SHOKRI, key, perturbation)
        for column in INTEGER_METRICS:
            assert row[column] == expected[column], column
        assert row["auc"] == pytest.approx(roc_auc_score(members, scores), abs=1e-12, rel=0)
        assert row["balanced_accuracy"] == pytest.approx(
            paper_inference_loop(scores[members], scores[~members]), abs=1e-12, rel=0
        )


def test_imported_models_over_other_examples_are_not_references(tmp_path: Path):
    db = tmp_path / "mixed.duckdb"
    # the importer refuses the same example ids with other labels under one dataset: "seven" has its own ids
    outputs = {
        "ten": synthetic_outputs(71, n=100),
        "seven": synthetic_outputs(72, n=80, n_classes=7, example_id=np.arange(1000, 1080)),
    }
    import_synthetic(db, tmp_path / "npz", outputs, dataset="shared")
    (outcome,) = score_attacks(db, ["class_thresholds"])
    assert outcome.scored == 0 and len(outcome.skipped) == 4


def test_new_perturbation_scores_only_new_pairs(population: Population, tmp_path: Path):
    """Re-running the spec with an added PGD signal adds a perturbation to each model; only those get scored."""
    import torch
    from threadpoolctl import threadpool_limits

    from robmia_db.runner.executor import run_specs
    from robmia_db.store.connection import checkpoint_dir

    torch.set_num_threads(1)
    db = tmp_path / population.db.name
    shutil.copy2(population.db, db)
    shutil.copytree(checkpoint_dir(population.db), checkpoint_dir(db))
    summary = run_specs(
        [population_spec(tmp_path / "population.toml", signals=("benign", "pgd"), epochs=POPULATION_EPOCHS)],
        db,
    )
    assert [o.action for o in summary.outcomes] == ["signals"] * 3
    with threadpool_limits(1):
        outcomes = _outcomes(db, ["confidence", "class_thresholds"])
    assert outcomes == {"confidence": (3, 3), "class_thresholds": (3, 3)}
    rows = query(db, "SELECT attack, perturbation, count(*) AS n FROM v_metrics GROUP BY ALL ORDER BY ALL")
    assert {(r["attack"], r["perturbation"]): r["n"] for r in rows if r["attack"] in ("confidence", "class_thresholds")} == {
        ("class_thresholds", "benign"): 3, ("class_thresholds", "pgd"): 3,
        ("confidence", "benign"): 3, ("confidence", "pgd"): 3,
    }  # fmt: skip


def test_changed_signal_settings_rescore_that_perturbation(population: Population, tmp_path: Path):
    import torch

    from robmia_db.runner.executor import run_specs
    from robmia_db.store.connection import checkpoint_dir

    torch.set_num_threads(1)
    db = tmp_path / population.db.name
    shutil.copy2(population.db, db)
    shutil.copytree(checkpoint_dir(population.db), checkpoint_dir(db))
    for steps in (10, 5):
        spec = population_spec(
            tmp_path / f"steps{steps}.toml", ("benign", "pgd"), POPULATION_EPOCHS, pgd_steps=steps
        )
        assert [o.action for o in run_specs([spec], db).outcomes] == ["signals"] * 3
        assert _outcomes(db, ["confidence"]) == {"confidence": (3, 3)}
    rows = query(db, "SELECT perturbation, count(*) AS n FROM v_perturbations GROUP BY ALL ORDER BY ALL")
    assert rows == [{"perturbation": "benign", "n": 3}, {"perturbation": "pgd", "n": 3}]


# ---------------------------------------------------------------- registry and CLI


def _builtin_titles() -> dict[str, str]:
    titles = {}
    for path in sorted(BUILTIN_DIR.iterdir()):
        text = path.read_text()
        pattern = r'^-- title = "(.*)"$' if path.suffix == ".sql" else r'^\s*"title": "(.*)",$'
        if path.suffix in (".sql", ".py"):
            titles[path.stem] = re.search(pattern, text, re.M).group(1)
    return titles


def test_attacks_command_lists_builtins_and_user_attacks(tmp_path: Path):
    titles = _builtin_titles()
    assert (
        set(titles) == set(load_registry(entry_points=False).attacks) >= {*SQL_BUILTINS, *REFERENCE_ATTACKS}
    )
    result = CliRunner().invoke(main, ["attacks"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == len(titles)
    python = {p.stem for p in BUILTIN_DIR.glob("*.py") if not p.name.startswith("_")}
    for name, title in titles.items():
        mark = r"  \[python: trusted code\]" if name in python else ""
        assert any(re.fullmatch(rf"{name}\s+{re.escape(title)}{mark}", line) for line in lines), (name, lines)

    folder = tmp_path / "mine"
    write_attack(folder, "gap.sql", sql_attack(CONFIDENCE_BODY, title="My gap attack"))
    write_attack(folder, "_helper.sql", "not an attack")
    result = CliRunner().invoke(main, ["attacks", "--attacks", str(folder)])
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == len(titles) + 1
    assert (
        result.stdout.splitlines()[-1]
        == f"{'gap'.ljust(max(map(len, titles)))}  My gap attack  [user: {folder / 'gap.sql'}]"
    )

    write_attack(
        folder,
        "loss.sql",
        sql_attack("SELECT model_key, example_id, -loss AS score FROM target", title="My loss"),
    )
    result = CliRunner().invoke(main, ["attacks", "--attacks", str(folder)])
    assert result.exit_code == 1 and "is named 'loss' like the built-in attack" in result.stderr
    result = CliRunner().invoke(main, ["attacks", "--attacks", str(folder), "--replace"])
    assert (
        result.exit_code == 0
        and "note: a user attack replaces the built-in 'loss' (--replace)" in result.stderr
    )
    assert len(result.stdout.splitlines()) == len(titles) + 1


def test_cli_commands_never_import_torch(
    untied_store: SyntheticStore, population: Population, tmp_path: Path
):
    population_db = tmp_path / "population.duckdb"
    shutil.copy2(population.db, population_db)
    new_model = synthetic_outputs(51, n=100).save(tmp_path / "new.npz")
    store = tmp_path / "store.duckdb"
    shutil.copy2(untied_store.db, store)
    commands = {
        "attacks": ["attacks", "-v"],
        "import": ["import", str(new_model), "--format", "npz", "--db", str(store)],
        "score": ["score", "--db", str(store)],
        "score_references": ["score", "--attack", "class_thresholds", "--force", "--db", str(population_db)],
        "sql": ["sql", "SELECT attack, count(*) FROM v_metrics GROUP BY ALL", "--db", str(store)],
    }
    script = """
import json, sys
from robmia_db.cli import main
seen = {}
for name, args in json.loads(sys.argv[1]).items():
    try:
        main(args, standalone_mode=False)
        code = 0
    except SystemExit as exc:
        code = exc.code
    seen[name] = {"code": code, "torch": "torch" in sys.modules}
# what attack_model imports when it runs (its fit takes seconds, so it is not run here)
import sklearn.ensemble  # noqa: E402
seen["sklearn_for_shokri"] = {"code": 0, "torch": "torch" in sys.modules}
print("RESULT " + json.dumps(seen))
"""
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(commands)], capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if k != "ROBMIA_DB"},
    )  # fmt: skip
    assert done.returncode == 0, f"exit {done.returncode}; stderr tail: {done.stderr[-3000:]}"
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert result == {name: {"code": 0, "torch": False} for name in [*commands, "sklearn_for_shokri"]}, (
        done.stdout
    )
    assert (
        query(store, "SELECT count(DISTINCT model_key) AS n FROM v_metrics WHERE attack = 'margin'")[0]["n"]
        == 3
    )
