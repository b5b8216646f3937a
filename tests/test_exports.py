"""`robmia-db report --tables csv|latex`: the paper table and leaderboard with intervals, checked against
v_metrics (bootstrap intervals) and scipy's t interval (over a configuration's models)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats

from robmia_db.attacks.scoring import score_attacks
from robmia_db.cli import main
from tests.attack_fixtures import import_outputs, query, synthetic_outputs


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("exports")
    db = folder / "store.duckdb"
    for name, seed, defense in [
        ("nat_0", 1, "natural"),
        ("pgd_a", 2, "pgd_at"),
        ("pgd_b", 3, "pgd_at"),
        ("pgd_c", 4, "pgd_at"),
    ]:
        labels = np.random.default_rng(0).integers(0, 10, 300)  # one dataset: the same examples
        path = synthetic_outputs(seed, n=300, labels=labels).save(folder / f"{name}.npz")
        import_outputs(db, path, "npz", name=name, dataset="faces_v1", defense=defense)
    score_attacks(db, ["confidence", "loss"], resamples=200)
    return db


def _read(path):
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_csv_tables_carry_the_stored_intervals(store, tmp_path):
    result = CliRunner().invoke(
        main, ["report", "--db", str(store), "--tables", "csv", "-o", str(tmp_path / "t")]
    )
    assert result.exit_code == 0, result.output
    assert result.output.split() == [
        str(tmp_path / "t" / "paper_table.csv"),
        str(tmp_path / "t" / "leaderboard.csv"),
    ]
    paper = {r["defense"]: r for r in _read(tmp_path / "t" / "paper_table.csv")}
    metrics = {
        (r["model_name"], r["kind"]): r
        for r in query(store, "SELECT * FROM v_metrics WHERE attack = 'confidence'")
    }
    natural = metrics[("nat_0", "benign")]
    assert paper["natural"]["n_models"] == "1" and paper["natural"]["i_b_interval"] == "bootstrap"
    assert float(paper["natural"]["i_b"]) == natural["balanced_accuracy"]
    assert float(paper["natural"]["i_b_ci_low"]) == natural["balanced_accuracy_ci_low"]
    assert float(paper["natural"]["i_b_ci_high"]) == natural["balanced_accuracy_ci_high"]
    robust = [metrics[(n, "adversarial")]["balanced_accuracy"] for n in ("pgd_a", "pgd_b", "pgd_c")]
    low, high = stats.t.interval(0.95, 2, loc=np.mean(robust), scale=stats.sem(robust))
    row = paper["pgd_at"]
    assert row["n_models"] == "3" and row["i_a_interval"] == "models"
    assert row["n_seeds"] == "0"  # imported models have no training seed
    assert float(row["i_a"]) == pytest.approx(np.mean(robust), abs=1e-12)
    assert float(row["i_a_ci_low"]) == pytest.approx(low, abs=1e-6)
    assert float(row["i_a_ci_high"]) == pytest.approx(high, abs=1e-6)
    board = _read(tmp_path / "t" / "leaderboard.csv")
    assert len(board) == len(query(store, "SELECT * FROM v_metrics"))
    for r in board:
        m = query(
            store, "SELECT * FROM v_metrics WHERE model_name = $m AND attack = $a AND perturbation = $p",
            m=r["model_name"], a=r["attack"], p=r["perturbation"],
        )[0]  # fmt: skip
        for column in ("auc", "auc_ci_low", "auc_ci_high", "tpr_at_fpr_1e2_ci_high"):
            assert float(r[column]) == m[column]


def test_latex_tables_are_booktabs_with_escaped_names(store, tmp_path):
    result = CliRunner().invoke(
        main, ["report", "--db", str(store), "--tables", "latex", "-o", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    paper = (tmp_path / "paper_table.tex").read_text()
    board = (tmp_path / "leaderboard.tex").read_text()
    for text in (paper, board):
        assert text.index("\\toprule") < text.index("\\midrule") < text.index("\\bottomrule")
        assert "faces_v1" not in text.replace("faces\\_v1", "")
    natural = query(
        store,
        "SELECT * FROM v_metrics WHERE attack = 'confidence' AND model_name = 'nat_0' AND kind = 'benign'",
    )[0]
    cell = (
        f"{100 * natural['balanced_accuracy']:.2f} {{\\scriptsize [{100 * natural['balanced_accuracy_ci_low']:.2f}, "
        f"{100 * natural['balanced_accuracy_ci_high']:.2f}]}}"
    )
    assert cell in paper
    assert "pgd\\_a" in board and "$I_A$" in paper


def test_tables_refuse_a_file_as_folder(store, tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("x")
    result = CliRunner().invoke(main, ["report", "--db", str(store), "--tables", "csv", "-o", str(target)])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: -o {target}: with --tables, -o is a folder, and this is a file"
