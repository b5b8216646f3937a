"""Tests of `robmia-db import`: validation (a bad file imports nothing) and the ccs2019 golden format.

The golden test builds npz files in the paper authors' layout (float32 softmax, many exactly 1.0f), imports
them through the CLI, scores `confidence`, and compares with a literal copy of the paper's threshold loop.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from attack_fixtures import (
    file_digest,
    import_synthetic,
    paper_inference_loop,
    paper_softmax,
    query,
    synthetic_outputs,
)
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from robmia_db.attacks.importers import import_outputs
from robmia_db.cli import main
from robmia_db.errors import ImportDataError

N, N_CLASSES = 60, 4


def generic_arrays() -> dict[str, np.ndarray]:
    """A valid generic npz: logits for `benign`, probabilities for `pgd`."""
    outputs = synthetic_outputs(7, n=N, n_classes=N_CLASSES, adversarial={"pgd": 1.5})
    arrays = outputs.arrays()
    arrays["probs__pgd"] = paper_softmax(arrays.pop("logits__pgd"))
    return arrays


def ccs2019_arrays(
    seed: int = 8, n_train: int = 40, n_test: int = 50, n_classes: int = 5
) -> dict[str, np.ndarray]:
    """The paper authors' layout: float32 softmax outputs per split and perturbation, train rows are members.

    True-label gaps reach 30 logits, so most members' and many non-members' confidences are exactly 1.0f.
    """
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n, low in (("train", n_train, 12.0), ("test", n_test, 6.0)):
        labels = rng.integers(0, n_classes, n)
        arrays[f"{split}_label"] = labels
        for name, drop in (("benign", 0.0), ("adversarial", 3.0)):
            logits = rng.normal(0.0, 1.0, (n, n_classes))
            logits[np.arange(n), labels] += (
                rng.uniform(low, 30.0, n) - drop - 2.0 * (split == "test") * (drop > 0)
            )
            arrays[f"output_{split}_{name}"] = paper_softmax(logits.astype(np.float32))
    return arrays


def _with(**changes: object) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """An edit of the valid arrays: key -> new array, or key -> None to drop it, or key -> callable(old)."""

    def edit(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = dict(arrays)
        for key, change in changes.items():
            if change is None:
                arrays.pop(key)
            elif callable(change):
                arrays[key] = change(arrays[key])
            else:
                arrays[key] = change
        return arrays

    return edit


def _nan_at(row: int):
    def put(values: np.ndarray) -> np.ndarray:
        values = values.copy()
        values[row, 1] = np.nan
        return values

    return put


def _negative(values: np.ndarray) -> np.ndarray:
    """Row 3 still sums to 1, but through a negative probability."""
    values = values.copy()
    values[3] = [1.25, -0.25, 0.0, 0.0]
    return values


def _labels_out_of_range(labels: np.ndarray) -> np.ndarray:
    labels = labels.copy()
    labels[5] = N_CLASSES
    return labels


def _negative_label(labels: np.ndarray) -> np.ndarray:
    labels = labels.copy()
    labels[0] = -1
    return labels


NPZ_CASES = [
    ("rows_differ", _with(logits__benign=lambda v: v[:-1]), r"logits__benign: expected shape \(60, C\), got \(59, 4\)"),
    ("one_dimensional", _with(logits__benign=lambda v: v[:, 0]), r"logits__benign: expected shape \(60, C\), got \(60,\)"),
    ("labels_length", _with(labels=lambda v: v[:-1]), r"labels has 59 rows, is_member has 60"),
    ("class_counts_differ", _with(probs__pgd=lambda v: np.full((N, 5), 0.2, np.float32)), r"probs__pgd: has 5 classes, others have 4"),
    ("nan_logits", _with(logits__benign=_nan_at(7)), r"logits__benign: contains NaN or infinite values \(first at row 7\)"),
    ("nan_probs", _with(probs__pgd=_nan_at(11)), r"probs__pgd: contains NaN or infinite values \(first at row 11\)"),
    ("probs_do_not_sum_to_1", _with(probs__pgd=lambda v: v * np.float32(0.9)), r"probs__pgd: rows must sum to 1 \(row \d+ sums to 0\.9\)"),
    ("negative_probs", _with(probs__pgd=_negative), r"probs__pgd: probabilities must be >= 0 \(min -0\.25\)"),
    ("label_too_large", _with(labels=_labels_out_of_range), r"labels: labels must be in \[0, 4\) \(got 0\.\.4\)"),
    ("negative_label", _with(labels=_negative_label), r"labels: labels must be in \[0, 4\) \(got -1\.\.3\)"),
    ("fractional_labels", _with(labels=lambda v: v + 0.5), r"labels: labels must be a 1-D integer array"),
    ("integer_logits", _with(logits__benign=lambda v: v.astype(np.int64)), r"logits__benign: must be a float array \(got int64\)"),
    ("missing_labels", _with(labels=None), r"missing array 'labels'"),
    ("missing_is_member", _with(is_member=None), r"missing array 'is_member'"),
    ("no_perturbations", _with(logits__benign=None, probs__pgd=None), r"no perturbation arrays"),
    ("probs_and_logits", _with(probs__benign=np.full((N, N_CLASSES), 0.25, np.float32)),
     r"perturbation 'benign' has both probs__ and logits__ arrays"),
    ("unknown_kind", _with(kind__pgd=np.array("poisoned")), r"kind__pgd: must be benign, adversarial or verified \(got 'poisoned'\)"),
    ("duplicate_example_ids", _with(example_id=np.arange(N) // 2), r"example_id must be 60 distinct integers"),
    ("membership_not_boolean", _with(is_member=np.arange(N) % 3), r"is_member: must be a 1-D boolean \(or 0/1\) array"),
    ("only_members", _with(is_member=np.ones(N, bool)), r"needs both members and non-members"),
    ("only_nonmembers", _with(is_member=np.zeros(N, bool)), r"needs both members and non-members"),
]  # fmt: skip

CCS_CASES = [
    ("ccs_missing_array", _with(output_test_adversarial=None), r"not a ccs2019 output file: missing array 'output_test_adversarial'"),
    ("ccs_rows_differ", _with(output_train_benign=lambda v: v[:-1]), r"output_train_benign: expected shape \(40, C\), got \(39, 5\)"),
    ("ccs_classes_differ", _with(output_test_adversarial=lambda v: np.full((len(v), 4), 0.25, np.float32)),
     r"output_\*_adversarial: class counts differ between arrays"),
    ("ccs_not_softmax", _with(output_test_benign=lambda v: v * np.float32(2.0)), r"output_test_benign: rows must sum to 1"),
    ("ccs_label_out_of_range", _with(test_label=lambda v: v + 5), r"test_label: labels must be in \[0, 5\)"),
    ("ccs_nan", _with(output_train_adversarial=_nan_at(2)), r"output_train_adversarial: contains NaN"),
    ("ccs_one_dimensional", _with(output_train_benign=lambda v: v[:, 0]), r"output_train_benign: expected shape"),
    ("ccs_only_members",
     _with(output_test_benign=lambda v: v[:0], output_test_adversarial=lambda v: v[:0], test_label=lambda v: v[:0]),
     r"needs both members and non-members"),
]  # fmt: skip


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def existing_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store that already holds one imported model: a rejected import must leave it byte for byte."""
    folder = tmp_path_factory.mktemp("existing")
    db = folder / "store.duckdb"
    import_synthetic(db, folder / "npz", {"kept": synthetic_outputs(3, n=50)})
    return db


def _assert_rejected(db: Path, path: Path, fmt: str, message: str) -> str:
    digest = file_digest(db)
    n_models = query(db, "SELECT count(*) AS n FROM v_models")[0]["n"]
    with pytest.raises(ImportDataError) as raised:
        import_outputs(db, path, fmt, name="rejected")
    text = str(raised.value)
    assert "\n" not in text and text.startswith(f"{path}: "), text
    assert re.search(message, text), text
    assert file_digest(db) == digest
    assert query(db, "SELECT count(*) AS n FROM v_models")[0]["n"] == n_models
    return text


def _run_case(
    tmp_path: Path, existing_store: Path, fmt: str, arrays: dict[str, np.ndarray], message: str
) -> None:
    path = _write_npz(tmp_path / "bad.npz", arrays)
    fresh = tmp_path / "fresh.duckdb"
    with pytest.raises(ImportDataError):
        import_outputs(fresh, path, fmt)
    assert not fresh.exists() and not fresh.with_suffix(".duckdb.wal").exists()
    text = _assert_rejected(existing_store, path, fmt, message)
    result = CliRunner().invoke(main, ["import", str(path), "--format", fmt, "--db", str(existing_store)])
    assert result.exit_code == 1 and result.stderr == f"Error: {text}\n", result.output


@pytest.mark.parametrize("name, edit, message", NPZ_CASES, ids=[c[0] for c in NPZ_CASES])
def test_npz_import_rejected(tmp_path: Path, existing_store: Path, name: str, edit, message: str):
    _run_case(tmp_path, existing_store, "npz", edit(generic_arrays()), message)


@pytest.mark.parametrize("name, edit, message", CCS_CASES, ids=[c[0] for c in CCS_CASES])
def test_ccs2019_import_rejected(tmp_path: Path, existing_store: Path, name: str, edit, message: str):
    _run_case(tmp_path, existing_store, "ccs2019", edit(ccs2019_arrays()), message)


@pytest.mark.parametrize(
    "name, fmt, message",
    [
        ("missing.npz", "npz", r"file not found"),
        ("text.npz", "npz", r"not a readable npz file"),
        ("truncated.npz", "ccs2019", r"not a readable npz file"),
        ("generic_as_ccs.npz", "ccs2019", r"not a ccs2019 output file: missing array 'output_train_benign'"),
        ("ccs_as_generic.npz", "npz", r"missing array 'labels'"),
        ("array.npy", "npz", r"is a single \.npy array, not an npz archive"),
    ],
)  # fmt: skip
def test_unreadable_file_rejected(tmp_path: Path, existing_store: Path, name: str, fmt: str, message: str):
    path = tmp_path / name
    if name == "text.npz":
        path.write_text("labels,is_member\n1,true\n")
    elif name == "truncated.npz":
        whole = _write_npz(tmp_path / "whole.npz", ccs2019_arrays())
        path.write_bytes(whole.read_bytes()[:200])
        with pytest.raises((zipfile.BadZipFile, ValueError, OSError)):
            np.load(path)["train_label"]
    elif name == "generic_as_ccs.npz":
        _write_npz(path, generic_arrays())
    elif name == "ccs_as_generic.npz":
        _write_npz(path, ccs2019_arrays())
    elif name == "array.npy":
        np.save(path, np.zeros((3, 2), np.float32))
    fresh = tmp_path / "fresh.duckdb"
    with pytest.raises(ImportDataError):
        import_outputs(fresh, path, fmt)
    assert not fresh.exists()
    _assert_rejected(existing_store, path, fmt, message)


def test_unknown_format_rejected(tmp_path: Path):
    path = _write_npz(tmp_path / "ok.npz", generic_arrays())
    with pytest.raises(ImportDataError, match=r"unknown import format 'csv'"):
        import_outputs(tmp_path / "x.duckdb", path, "csv")
    assert not (tmp_path / "x.duckdb").exists()


def test_valid_generic_import_and_reimport_is_idempotent(tmp_path: Path):
    """The valid arrays the rejection table edits do import; re-importing the same file replaces, never adds."""
    arrays = generic_arrays()
    path = _write_npz(tmp_path / "valid.npz", arrays)
    db = tmp_path / "store.duckdb"
    record = import_outputs(db, path, "npz", name="valid", dataset="synthetic")
    again = import_outputs(db, path, "npz", name="valid", dataset="synthetic")
    assert again.model_key == record.model_key
    rows = query(db, "SELECT perturbation, kind, n_rows FROM v_perturbations ORDER BY perturbation")
    assert rows == [
        {"perturbation": "benign", "kind": "benign", "n_rows": N},
        {"perturbation": "pgd", "kind": "adversarial", "n_rows": N},
    ]
    assert query(db, "SELECT count(*) AS n FROM v_models")[0]["n"] == 1
    assert query(db, "SELECT count(*) AS n FROM v_signals")[0]["n"] == 2 * N
    stored = query(db, "SELECT confidence FROM v_signals WHERE perturbation = 'pgd' ORDER BY example_id")
    expected = arrays["probs__pgd"][np.arange(N), arrays["labels"]]
    np.testing.assert_array_equal(np.array([r["confidence"] for r in stored], np.float32), expected)


# ---------------------------------------------------------------- golden: the paper's own loop on its own layout


def test_ccs2019_golden_confidence_matches_the_paper_loop(tmp_path: Path):
    files = {
        "robust": ccs2019_arrays(seed=101, n_train=300, n_test=500, n_classes=10),
        "natural": ccs2019_arrays(seed=102, n_train=250, n_test=250, n_classes=10),
    }
    db = tmp_path / "golden.duckdb"
    runner = CliRunner()
    for name, arrays in files.items():
        path = _write_npz(tmp_path / f"{name}.npz", arrays)
        result = runner.invoke(
            main,
            [
                "import",
                str(path),
                "--format",
                "ccs2019",
                "--name",
                name,
                "--dataset",
                # the two synthetic files are not the same examples (their labels differ per id), which the
                # importer refuses under one dataset name
                f"yale-{name}",
                "--db",
                str(db),
            ],
        )
        assert result.exit_code == 0, result.output
        n_train, n_test = len(arrays["train_label"]), len(arrays["test_label"])
        assert (
            f"imported {name} (" in result.stdout
            and f"{n_train} members, {n_test} non-members, 10 classes" in result.stdout
        )
    result = runner.invoke(main, ["score", "--attack", "confidence", "--db", str(db)])
    assert result.exit_code == 0, result.output
    assert "confidence: 4 scored, 0 cached" in result.stdout

    metrics = {
        (r["model_name"], r["perturbation"]): r
        for r in query(db, "SELECT * FROM v_metrics WHERE attack = 'confidence'")
    }
    models = {r["model_name"]: r for r in query(db, "SELECT * FROM v_models")}
    assert len(metrics) == 4
    for name, arrays in files.items():
        for perturbation in ("benign", "adversarial"):
            train = arrays[f"output_train_{perturbation}"]
            test = arrays[f"output_test_{perturbation}"]
            # the paper's inference_via_confidence: true-label confidences straight from the float32 matrices
            confidence1 = np.array([train[i, arrays["train_label"][i]] for i in range(train.shape[0])])
            confidence2 = np.array([test[i, arrays["test_label"][i]] for i in range(test.shape[0])])
            assert (confidence1 == 1.0).sum() > 50 and (confidence2 == 1.0).sum() > 20
            row = metrics[(name, perturbation)]
            assert row["balanced_accuracy"] == pytest.approx(
                paper_inference_loop(confidence1, confidence2), abs=1e-12, rel=0
            )
            member = np.r_[np.ones(len(confidence1), bool), np.zeros(len(confidence2), bool)]
            assert row["auc"] == pytest.approx(
                roc_auc_score(member, np.r_[confidence1, confidence2].astype(np.float64)), abs=1e-12, rel=0
            )
            scores = query(
                db,
                "SELECT example_id, is_member, score FROM v_scores WHERE attack = 'confidence' "
                "AND model_name = $name AND perturbation = $p ORDER BY example_id",
                name=name,
                p=perturbation,
            )
            assert [r["example_id"] for r in scores] == list(range(len(member)))
            assert [r["is_member"] for r in scores] == member.tolist()
            np.testing.assert_array_equal([r["score"] for r in scores], np.r_[confidence1, confidence2])
            if perturbation == "benign":
                # the paper printed model accuracy from argmax of the same matrices
                acc1 = np.mean(np.argmax(train, axis=1) == arrays["train_label"])
                acc2 = np.mean(np.argmax(test, axis=1) == arrays["test_label"])
                assert models[name]["train_acc"] == pytest.approx(acc1, abs=1e-12)
                assert models[name]["test_acc"] == pytest.approx(acc2, abs=1e-12)
        assert models[name]["dataset"] == f"yale-{name}" and models[name]["origin"] == "imported"
