"""Benchmark (script, not a test): render time and page size of `robmia-db report` on a large synthetic store.

Builds a store of 100 models x 10 attacks x 3 perturbations (benign, adversarial, verified) with 2,000
examples per model by inserting rows straight into the real tables (models, membership, perturbations,
signals, attacks, scores and metrics computed by `compute_metrics`), then times the report. Baseline:
the report's own queries alone (`collect_report_data`), measured in the same run; the ratio says what
shaping, charts and templating add on top of reading the store. Imports numpy, duckdb, pyarrow and the
store, metrics and report layers; no torch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

from robmia_db.attacks.metrics import compute_metrics
from robmia_db.store.connection import transaction, writing

DEFAULT_OUT = Path(__file__).parent / "results" / "bench_report.json"
DEFENSES = ("natural", "pgd_at", "trades", "ibp")
WIDTHS = (1.0, 2.0, 4.0, 8.0, 16.0)
ATTACKS = (
    ("confidence", "confidence"),
    ("loss", "loss"),
    ("entropy", "entropy"),
    ("mentropy", "mentropy"),
    ("margin", "margin"),
    ("adv_loss_gap", "loss"),
    ("noisy_confidence", "confidence"),
    ("noisy_loss", "loss"),
    ("scaled_margin", "margin"),
    ("rank_confidence", "confidence"),
)
PERTURBATIONS = (("benign", "benign", None), ("pgd", "adversarial", 8 / 255), ("ibp", "verified", 8 / 255))


def make_synthetic_store(
    db_path: str | Path,
    n_models: int = 100,
    n_attacks: int = 10,
    n_examples: int = 2000,
    n_classes: int = 10,
    seed: int = 0,
    experiment: str = "synthetic",
) -> dict[str, int]:
    """Write a realistic-shaped store: float32 softmax-like confidences, members more confident.

    Models cycle through defenses x widths x seeds, so the store has width sweeps and several seeds per
    configuration. Every model has the three perturbations and every attack is scored on each.

    Args:
        db_path: Store file to create (must not exist).
        n_models: Number of models.
        n_attacks: Number of attacks (at most 10).
        n_examples: Examples per model (half members).
        n_classes: Classes of the synthetic labels.
        seed: Random seed.
        experiment: Experiment name of every model.

    Returns:
        Row counts per table written.
    """
    rng = np.random.default_rng(seed)
    now = datetime(2025, 1, 1, tzinfo=timezone.utc)
    attacks = ATTACKS[:n_attacks]
    model_rows, membership, perturbations, signals, scores = [], [], [], [], []
    labels = rng.integers(0, n_classes, n_examples).astype(np.int32)
    example_ids = np.arange(n_examples, dtype=np.int32)
    for index in range(n_models):
        defense = DEFENSES[index % len(DEFENSES)]
        width = WIDTHS[(index // len(DEFENSES)) % len(WIDTHS)]
        model_seed = index // (len(DEFENSES) * len(WIDTHS))
        model_key = f"{index:016x}"
        name = f"{experiment}/{defense}-w{width:g}-s{model_seed}"
        eps = None if defense == "natural" else 8 / 255
        is_member = np.zeros(n_examples, dtype=bool)
        is_member[rng.choice(n_examples, n_examples // 2, replace=False)] = True
        model_rows.append(
            {
                "model_key": model_key, "model_name": name, "experiment": experiment, "origin": "trained",
                "dataset": "synthetic", "arch": "cnn", "width": width, "defense": defense, "eps": eps,
                "seed": model_seed, "model_index": 0, "membership_scheme": "train_test",
                "n_members": int(is_member.sum()), "n_nonmembers": int((~is_member).sum()), "n_classes": n_classes,
                "config": json.dumps({"training": {"epochs": 100, "defense": defense, "eps": eps}, "model": {"width": width}}),
                "status": "completed", "git_commit": "0" * 40, "git_dirty": False,
                "package_versions": json.dumps({"python": platform.python_version()}), "host": "bench",
                "device": "cpu", "started_at": now + timedelta(minutes=index), "finished_at": now + timedelta(minutes=index + 1),
                "train_seconds": 60.0,
            }
        )  # fmt: skip
        membership.append(
            pa.table(
                {"model_key": [model_key] * n_examples, "example_id": example_ids, "is_member": is_member}
            )
        )
        # Robust, wider models overfit more: the member shift grows with width and robustness.
        shift = 0.15 + 0.05 * np.log2(width) + (0.2 if defense != "natural" else 0.0)
        for p_index, (p_name, kind, p_eps) in enumerate(PERTURBATIONS):
            signal_key = f"{index:08x}{p_index:08x}"
            base = 2.5 - 1.2 * p_index
            logit = rng.normal(base, 1.5, n_examples) + shift * is_member
            confidence = (1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
            loss = -np.log(np.clip(confidence.astype(np.float64), 1e-12, None))
            entropy = rng.gamma(2.0, 0.3, n_examples) * (1.0 - confidence)
            margin = logit + rng.normal(0, 0.3, n_examples)
            correct = confidence > 0.5
            perturbations.append(
                {
                    "signal_key": signal_key, "model_key": model_key, "name": p_name, "kind": kind, "eps": p_eps,
                    "settings": json.dumps({"kind": kind}), "n_rows": n_examples,
                    "member_acc": float(correct[is_member].mean()), "nonmember_acc": float(correct[~is_member].mean()),
                    "seconds": 1.0, "created_at": now,
                }
            )  # fmt: skip
            signals.append(
                pa.table(
                    {
                        "signal_key": [signal_key] * n_examples, "model_key": [model_key] * n_examples,
                        "example_id": example_ids, "label": labels, "is_member": is_member, "loss": loss,
                        "confidence": confidence, "margin": margin, "entropy": entropy, "mentropy": entropy * 1.1,
                        "is_correct": correct,
                    }
                )
            )  # fmt: skip
            for a_index, (_attack, signal) in enumerate(attacks):
                source = {
                    "confidence": confidence,
                    "loss": -loss,
                    "entropy": -entropy,
                    "mentropy": -entropy,
                    "margin": margin,
                }[signal]
                noise = 0.0 if a_index < 6 else rng.normal(0, 0.05, n_examples)
                scores.append(
                    pa.table(
                        {
                            "attack_key": pa.array([f"a{a_index:015x}"] * n_examples).dictionary_encode(),
                            "model_key": pa.array([model_key] * n_examples).dictionary_encode(),
                            "perturbation": pa.array([p_name] * n_examples).dictionary_encode(),
                            "example_id": example_ids,
                            "score": np.asarray(source, dtype=np.float64) + noise,
                        }
                    )
                )
    attack_rows = [
        {
            "attack_key": f"a{i:015x}", "name": name, "title": f"{name} (synthetic)", "paper": None,
            "description": f"Synthetic attack on the {signal} signal.", "language": "sql", "source_path": None,
            "source": "SELECT 1", "params": "{}", "needs": json.dumps(["signal"]), "created_at": now,
        }
        for i, (name, signal) in enumerate(attacks)
    ]  # fmt: skip
    with writing(db_path) as con, transaction(con):
        con.execute(
            "INSERT INTO experiments VALUES (?, ?, ?, ?, ?)",
            [
                experiment,
                "synthetic benchmark store",
                "synthetic.toml",
                "[experiment]\nname = 'synthetic'\n",
                now,
            ],
        )
        con.register("_models", pa.Table.from_pylist(model_rows))
        con.execute(
            "INSERT INTO models BY NAME SELECT * REPLACE (CAST(config AS JSON) AS config, "
            "CAST(package_versions AS JSON) AS package_versions) FROM _models"
        )
        con.register(
            "_examples",
            pa.table(
                {
                    "dataset": ["synthetic"] * n_examples,
                    "example_id": example_ids,
                    "label": labels,
                    "origin_split": ["train"] * n_examples,
                }
            ),
        )
        con.execute("INSERT INTO examples BY NAME SELECT * FROM _examples")
        con.register("_membership", pa.concat_tables(membership))
        con.execute("INSERT INTO membership BY NAME SELECT * FROM _membership")
        con.register("_perturbations", pa.Table.from_pylist(perturbations))
        con.execute(
            "INSERT INTO perturbations BY NAME SELECT * REPLACE (CAST(settings AS JSON) AS settings) FROM _perturbations"
        )
        con.register("_signals", pa.concat_tables(signals))
        con.execute("INSERT INTO signals BY NAME SELECT * FROM _signals")
        con.register("_attacks", pa.Table.from_pylist(attack_rows))
        con.execute(
            "INSERT INTO attacks BY NAME SELECT * REPLACE (CAST(params AS JSON) AS params, CAST(needs AS JSON) AS needs) FROM _attacks"
        )
        con.register("_scores", pa.concat_tables(scores))
        con.execute("INSERT INTO scores BY NAME SELECT * FROM _scores")
        metrics = compute_metrics(
            con,
            """SELECT s.attack_key, s.model_key, s.perturbation, s.score, b.is_member FROM scores s
               JOIN membership b USING (model_key, example_id)""",
            ["attack_key", "model_key", "perturbation"],
        )
        con.register("_metrics", metrics)
        con.execute(
            """INSERT INTO metrics BY NAME
               SELECT *, 'synthetic' AS inputs_key, 0.01 AS seconds, TIMESTAMPTZ '2025-01-01 00:00:00+00' AS created_at
               FROM _metrics"""
        )
    return {
        "models": len(model_rows),
        "perturbations": len(perturbations),
        "signals": n_models * len(PERTURBATIONS) * n_examples,
        "scores": n_models * len(PERTURBATIONS) * len(attacks) * n_examples,
        "metrics": metrics.num_rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=100)
    parser.add_argument("--attacks", type=int, default=10)
    parser.add_argument("--examples", type=int, default=2000, help="examples per model (half members)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--workdir", type=Path, help="keep the store and page here (default: a temporary folder)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        result = run(workdir, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def run(workdir: Path, args: argparse.Namespace) -> dict:
    from robmia_db.report import build_report, collect_report_data
    from robmia_db.report.charts import vega_bundle

    db_path = workdir / "synthetic.duckdb"
    for leftover in (db_path, db_path.with_name(db_path.name + ".wal")):
        leftover.unlink(missing_ok=True)
    started = time.perf_counter()
    counts = make_synthetic_store(
        db_path, n_models=args.models, n_attacks=args.attacks, n_examples=args.examples
    )
    store_seconds = time.perf_counter() - started

    started = time.perf_counter()
    vega_bundle()  # built once per machine (cached on disk); not part of a render
    bundle_seconds = time.perf_counter() - started

    query_times, render_times = [], []
    page = workdir / "synthetic.html"
    for _ in range(args.repeats):
        started = time.perf_counter()
        collect_report_data(db_path)
        query_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        build_report(db_path, output=page)
        render_times.append(time.perf_counter() - started)
    # what a user waits for: a fresh `robmia-db report` process, imports included
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "robmia_db", "report", "--db", str(db_path), "-o", str(page)],
        check=True,
        capture_output=True,
    )
    cli_seconds = time.perf_counter() - started
    html = page.read_text(encoding="utf-8")
    result = {
        "benchmark": "bench_report",
        "store": counts,
        "store_bytes": db_path.stat().st_size,
        "store_build_seconds": round(store_seconds, 3),
        "bundle_seconds_first_call": round(bundle_seconds, 3),
        "queries_seconds_best": round(min(query_times), 3),
        "render_seconds_best": round(min(render_times), 3),
        "render_seconds_all": [round(t, 3) for t in render_times],
        "render_over_queries_ratio": round(min(render_times) / min(query_times), 3),
        "cli_seconds_fresh_process": round(cli_seconds, 3),
        "page_bytes": len(html.encode("utf-8")),
        "page_megabytes": round(len(html.encode("utf-8")) / 1e6, 3),
        "charts": html.count('class="chart"'),
        "limits": {"render_seconds": 5.0, "page_megabytes": 5.0},
        "within_limits": min(render_times) < 5.0 and len(html.encode("utf-8")) < 5e6,
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
    }
    return result


if __name__ == "__main__":
    main()
