"""Every CPU benchmark script runs to the end at a tiny size and writes its JSON, with its own checks held.

Why: a benchmark is how a speed claim in the README is re-checked; two of them had stopped running
unnoticed (bench_training's spec lacked the dataset once datasets stopped defaulting to digits, and
paper_golden imported seven differently split files under one dataset name, which the importer now
refuses). Sizes here are too small for the timings to mean anything: what is asserted is that each script
completes, writes its JSON, and that the equalities it measures against a second method still hold
(scores, metrics, weights, checksums). Not run here: `paper_golden.py` and `reproduce_paper.py` (they need
the paper's data), `bench_executor.py` (a Ray cluster: `test_ray.py` covers the executor), `bench_memory.py`
and `bench_malloc.py` (minutes of fresh processes), `gpu_*.py` (a GPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (script, arguments besides --out, what its JSON must show)
CASES = {
    "bench_scoring": (["--rows", "20000", "--models", "2"], "scoring"),
    "bench_intervals": (["--models", "2", "--examples", "600", "--resamples", "50"], None),
    "bench_invariance": (["--models", "3", "--examples", "120", "--repeats", "1"], None),
    "bench_store": (["--models", "2", "--rows", "3000"], None),
    "bench_ingest": (["--rows", "20000", "--existing-rows", "20000", "--repeats", "1"], None),
    "bench_report": (["--models", "3", "--attacks", "2", "--examples", "200", "--repeats", "1"], "report"),
    "bench_reference_attacks": (["--scale", "0.01"], "reference"),
    "bench_fleet_memory": (["--sizes", "6x300"], "fleet"),
    "bench_training": (["--members", "200", "--repeats", "1"], "training"),
    "bench_bounds": (["--quick", "--repeats", "1"], "bounds"),
    "bench_defenses": (["--only", "projections", "--repeats", "1"], "projections"),
}


def _check(kind: str | None, result: dict) -> None:
    if kind == "scoring":
        assert result["max_abs_auc_diff_vs_sklearn"] == 0.0
        assert result["max_abs_balanced_accuracy_diff_vs_sklearn"] == 0.0
        assert result["integer_numerators_equal_numpy"] is True
    elif kind == "report":
        assert result["charts"] > 0 and result["page_bytes"] > 0
    elif kind == "reference":
        assert max(result["max_abs_score_difference"].values()) < 1e-9
        assert result["max_abs_difference_numpy_sorted_vs_numpy"] < 1e-9
    elif kind == "fleet":
        (row,) = result["rows"]
        assert row["disk"]["checksum"] == row["memory"]["checksum"]
    elif kind == "training":
        assert result["pgd_at"]["max_abs_weight_difference"] == 0.0
        assert result["natural"]["max_abs_weight_difference"] == 0.0
    elif kind == "bounds":
        assert {goal["name"] for goal in result["goals"]} >= {"CROWN-IBP", "CROWN intersected with IBP"}
        assert all(goal["measured"] > 0 for goal in result["goals"])
    elif kind == "projections":
        rows = [
            row for size in result["inputs"].values() for name, row in size.items() if "projections" in name
        ]
        assert rows and all(row["seconds_per_batch"] > 0 for row in rows)


@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_runs_to_the_end_and_keeps_its_equalities(script: str, tmp_path: Path) -> None:
    arguments, kind = CASES[script]
    out = tmp_path / f"{script}.json"
    extra = ["--store-dir", str(tmp_path / "stores")] if script == "bench_fleet_memory" else []
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    finished = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *arguments, *extra, "--out", str(out)],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-3000:]
    _check(kind, json.loads(out.read_text()))
