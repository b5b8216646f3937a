"""Benchmark script (uses the runner, attacks and store layers): reproduce Song et al. (CCS 2019), section 5.1.

Runs `specs/paper/<dataset>*.toml` (or `specs/paper-lite/...` with `--lite`) into one DuckDB store, scores the
`confidence` attack, prints our table beside the paper's numbers, and decides all six of the paper's findings
statistically (`robmia_db.analysis.findings`): (1) robust models leak more than natural; (2) PGD-AT: I_A > I_B;
(3) verifiable defenses leak more than natural, less than empirical; (4) leakage grows with training eps;
(5) with model width; (6) the robustness generalization gap correlates with leakage. Each comparison is HELD
(its 95 % bootstrap interval excludes 0 in the paper's direction), NOT HELD (it excludes 0 the other way) or
INCONCLUSIVE, with the same perturbation kind and eps on both sides, every dataset included; NOT MEASURED
where the specs hold no such models (one eps, one width, no matched network or seed).

The ratio printed is the membership advantage (2 acc - 1) of the best robust model over the natural model's,
ours against the paper's. Numbers go to a JSON file (`--out`).

Usage:
    python benchmarks/reproduce_paper.py --data DIR [--lite] [--db PATH] [--datasets yale,fmnist,cifar10]
    python benchmarks/reproduce_paper.py --findings-only --db PATH     # any store, e.g. the digits sweeps
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SPECS_FULL = REPO / "specs" / "paper"
SPECS_LITE = REPO / "specs" / "paper-lite"
DATASETS = ("yale", "fmnist", "cifar10")
REGISTRY_NAME = {"yale": "yale", "fmnist": "fashion_mnist", "cifar10": "cifar10"}
# Folder names under which the data is commonly kept, besides the registry names themselves.
FOLDER_ALIASES = {
    "yale": ("yale", "extended-yale-b-cropped", "CroppedYale"),
    "fashion_mnist": ("fashion_mnist", "fashion-mnist", "FashionMNIST"),
    "cifar10": ("cifar10", "cifar-10", "CIFAR10"),
}
EMPIRICAL = ("pgd_at", "distributional_at", "trades")
VERIFIABLE = ("dual", "diffai", "ibp", "crown_ibp")
DEFENSE_ORDER = ("natural", "pgd_at", "distributional_at", "trades", "dual", "diffai", "ibp", "crown_ibp")
DEFENSE_TITLE = {
    "natural": "Natural",
    "pgd_at": "PGD-based adv. training",
    "distributional_at": "Distributional adv. training",
    "trades": "Difference-based (TRADES)",
    "dual": "Duality-based verification",
    "diffai": "Abstract interpretation (DiffAI)",
    "ibp": "IBP verification",
    "crown_ibp": "CROWN-IBP verification",
}
COLUMNS = (
    "train_acc",
    "test_acc",
    "adv_train_acc",
    "adv_test_acc",
    "ver_train_acc",
    "ver_test_acc",
    "I_B",
    "I_A",
    "I_V",
)

# paper.md section 5.1 ([NB]: the authors' notebooks), in %: train, test, adv-train, adv-test, I_B, I_A.
# Verified accuracies and I_V were not recovered (paper.md section 5.2), so they are None.
_PAPER_ROWS: dict[str, dict[str, tuple[float, ...]]] = {
    "yale": {
        "natural": (100.00, 98.25, 4.53, 2.92, 55.85, 54.27),
        "pgd_at": (99.89, 96.69, 99.00, 77.63, 61.69, 68.83),
        "distributional_at": (99.58, 93.77, 83.26, 55.06, 62.23, 64.07),
        "trades": (99.53, 93.77, 99.42, 83.85, 58.06, 65.59),
        "dual": (98.89, 92.80, 98.53, 83.66, 55.90, 60.40),
        "diffai": (99.26, 83.27, 85.68, 50.39, 65.11, 65.64),
        "ibp": (99.16, 85.80, 94.42, 68.68, 60.45, 66.28),
    },
    "fmnist": {
        "natural": (100.00, 92.18, 4.35, 4.14, 57.12, 50.95),
        "pgd_at": (99.93, 90.88, 96.91, 68.06, 58.32, 64.49),
        "distributional_at": (97.98, 90.62, 67.63, 51.61, 57.35, 59.49),
        "trades": (99.35, 90.92, 90.13, 72.40, 57.02, 58.83),
        "dual": (75.13, 74.29, 65.77, 65.36, 50.58, 50.42),
        "diffai": (86.44, 85.47, 74.12, 73.28, 50.79, 50.69),
        "ibp": (89.85, 86.26, 82.60, 78.44, 52.13, 52.06),
    },
    "cifar10": {
        "natural": (100.00, 95.01, 0.00, 0.00, 57.43, 50.86),
        "pgd_at": (99.998, 87.25, 96.08, 46.61, 74.89, 75.67),
        "distributional_at": (100.00, 90.10, 40.56, 25.92, 67.16, 64.24),
        "trades": (99.50, 87.99, 76.06, 46.50, 61.18, 67.08),
    },
}


def paper_table() -> dict[str, dict[str, dict[str, float | None]]]:
    """The paper's section 5.1 numbers as {dataset: {defense: {column: percent or None}}}."""
    table: dict[str, dict[str, dict[str, float | None]]] = {}
    for dataset, rows in _PAPER_ROWS.items():
        table[dataset] = {}
        for defense, (tr, te, atr, ate, ib, ia) in rows.items():
            table[dataset][defense] = {
                "train_acc": tr,
                "test_acc": te,
                "adv_train_acc": atr,
                "adv_test_acc": ate,
                "ver_train_acc": None,
                "ver_test_acc": None,
                "I_B": ib,
                "I_A": ia,
                "I_V": None,
            }
    return table


def data_root_for(data_dir: Path) -> Path:
    """A folder to use as $ROBMIA_DATA: `data_dir` itself, or a temp folder of links named as the registry.

    `robmia_db.datasets.base.resolve_root` looks for `$ROBMIA_DATA/<registry name>`; data kept under another
    common name (e.g. `fashion-mnist/`, `extended-yale-b-cropped/`) is linked under the registry name.
    """
    links: dict[str, Path] = {}
    for name, aliases in FOLDER_ALIASES.items():
        if (data_dir / name).exists():
            continue
        found = next((data_dir / alias for alias in aliases if (data_dir / alias).exists()), None)
        if found is not None:
            links[name] = found.resolve()
    if not links:
        return data_dir
    root = Path(tempfile.mkdtemp(prefix="robmia-data-"))
    for entry in data_dir.iterdir():
        if entry.name not in links:
            (root / entry.name).symlink_to(entry.resolve())
    for name, target in links.items():
        (root / name).symlink_to(target)
    return root


def spec_files(lite: bool, datasets: list[str]) -> list[Path]:
    """The spec files of the chosen datasets, the file holding the natural model first for each."""
    folder = SPECS_LITE if lite else SPECS_FULL
    paths: list[Path] = []
    for dataset in datasets:
        main = folder / f"{dataset}.toml"
        others = sorted(p for p in folder.glob(f"{dataset}-*.toml"))
        paths += ([main] if main.exists() else []) + others
    return paths


def spec_defenses(path: Path) -> list[str]:
    with path.open("rb") as handle:
        return list(tomllib.load(handle).get("training", {}).get("defenses", ["natural"]))


def implemented_defenses() -> set[str]:
    """Defenses the runner can train now.

    The runner's registry imports only the empirical module; the verifiable one registers itself on import, so
    it is imported here when present (drop this once `robmia_db.runner.defenses` imports it).
    """
    from robmia_db.runner.defenses import DEFENSES

    try:
        importlib.import_module("robmia_db.runner.defenses.verifiable")
    except ImportError:
        pass
    return set(DEFENSES)


class LineReporter:
    """Prints one line per model and per perturbation, and every tenth epoch."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def _stamp(self) -> str:
        return f"[{time.perf_counter() - self.started:7.0f}s]"

    def plan(self, jobs, actions) -> None:
        todo = sum(1 for action in actions.values() if action != "skip")
        print(f"{self._stamp()} {len(jobs)} models, {todo} to train or complete", flush=True)

    def model_started(self, job, index, total, action) -> None:
        print(f"{self._stamp()} model {index + 1}/{total} {job.model_name}: {action}", flush=True)

    def epoch_done(self, job, epoch, epochs, stats) -> None:
        if epoch == epochs or epoch % 10 == 0:
            print(
                f"{self._stamp()}   epoch {epoch}/{epochs} loss {stats.get('loss', float('nan')):.4f}",
                flush=True,
            )

    def perturbation_started(self, job, perturbation, index, total) -> None:
        print(f"{self._stamp()}   signals {index + 1}/{total}", flush=True)

    def model_finished(self, outcome) -> None:
        note = f" ERROR {outcome.error}" if outcome.error else ""
        print(f"{self._stamp()}   {outcome.action} in {outcome.seconds:.0f}s{note}", flush=True)


@dataclass
class Results:
    """Our measured table, plus what was run."""

    table: dict[str, dict[str, dict[str, float | None]]] = field(default_factory=dict)
    models: list[dict[str, Any]] = field(default_factory=list)


def _percent(value: float | None) -> float | None:
    return None if value is None else round(100.0 * float(value), 2)


def _mean(values: list[float]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def read_results(db_path: Path, model_keys: list[str]) -> Results:
    """Per dataset and defense, the mean over seeds of accuracies and confidence-attack accuracies (in %).

    Only the models the specs declare (`model_keys`) count, so older runs in the same store do not mix in.
    Each spec records one perturbation per kind, so the kind identifies the signal (I_B, I_A, I_V).
    """
    import duckdb

    short = {v: k for k, v in REGISTRY_NAME.items()}
    con = duckdb.connect(str(db_path), read_only=True)
    try:
        models = con.execute(
            """
            SELECT m.model_key, m.model_name, m.experiment, m.dataset, m.defense, m.eps, m.seed, m.status,
                   m.train_acc, m.test_acc, m.adv_train_acc, m.adv_test_acc,
                   m.verified_train_acc, m.verified_test_acc, m.train_seconds,
                   max(x.balanced_accuracy) FILTER (WHERE x.kind = 'benign') AS i_b,
                   max(x.balanced_accuracy) FILTER (WHERE x.kind = 'adversarial') AS i_a,
                   max(x.balanced_accuracy) FILTER (WHERE x.kind = 'verified') AS i_v
            FROM v_models m
            LEFT JOIN v_metrics x ON x.model_key = m.model_key AND x.attack = 'confidence'
            WHERE m.model_key IN (SELECT unnest(?::VARCHAR[]))
            GROUP BY ALL
            ORDER BY m.dataset, m.defense, m.seed
            """,
            [model_keys],
        ).fetchall()
    finally:
        con.close()
    names = (
        "model_key model_name experiment dataset defense eps seed status train_acc test_acc adv_train_acc "
        "adv_test_acc ver_train_acc ver_test_acc train_seconds I_B I_A I_V"
    ).split()
    results = Results()
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in models:
        record = dict(zip(names, row))
        results.models.append(
            {k: (v if not isinstance(v, float) else round(v, 6)) for k, v in record.items()}
        )
        if record["status"] != "completed":
            continue
        grouped.setdefault((short.get(record["dataset"], record["dataset"]), record["defense"]), []).append(
            record
        )
    for (dataset, defense), records in grouped.items():
        results.table.setdefault(dataset, {})[defense] = {
            column: _percent(_mean([r[column] for r in records])) for column in COLUMNS
        } | {"n_models": len(records)}
    return results


def best_inference(row: dict[str, float | None] | None) -> float | None:
    if not row:
        return None
    values = [row[k] for k in ("I_B", "I_A", "I_V") if row.get(k) is not None]
    return max(values) if values else None


def check_findings(
    table: dict[str, dict[str, dict[str, float | None]]], planned: dict[str, list[str]]
) -> list[dict[str, Any]]:
    """The paper's qualitative findings, checked on one table (ours or the paper's own).

    Args:
        table: {dataset: {defense: row}}.
        planned: {dataset: defenses} to check; one missing from `table` is reported as not measured.
    """
    findings: list[dict[str, Any]] = []
    for dataset, defenses in planned.items():
        rows = table.get(dataset, {})
        natural = best_inference(rows.get("natural"))
        for defense in defenses:
            if defense == "natural":
                continue
            row = rows.get(defense)
            best = best_inference(row)
            expected = not (dataset == "fmnist" and defense in VERIFIABLE)
            held = None if natural is None or best is None else best > natural
            findings.append(
                {
                    "dataset": dataset,
                    "finding": "robust best inference > natural best inference",
                    "defense": defense,
                    "ours": best,
                    "natural": natural,
                    "held": held,
                    "paper_expects": expected,
                }
            )
        if "pgd_at" in defenses:
            pgd = rows.get("pgd_at") or {}
            i_a, i_b = pgd.get("I_A"), pgd.get("I_B")
            held = None if i_a is None or i_b is None else i_a > i_b
            findings.append(
                {
                    "dataset": dataset,
                    "finding": "PGD-AT: I_A > I_B",
                    "defense": "pgd_at",
                    "ours": i_a,
                    "natural": i_b,
                    "held": held,
                    "paper_expects": True,
                }
            )
    return findings


def statistical_findings(db_path: Path, model_keys: list[str], n_resamples: int) -> list[dict[str, Any]]:
    """The six findings decided from the `confidence` scores of the specs' models (robmia_db.analysis)."""
    from robmia_db.analysis.compare import load_vectors
    from robmia_db.analysis.findings import decide_findings

    keys = set(model_keys)
    vectors = [v for v in load_vectors(db_path, "confidence") if v.model_key in keys]
    return decide_findings(vectors, n_resamples=n_resamples)


def print_findings(findings: list[dict[str, Any]]) -> None:
    """Per dataset and finding, each decision with its estimate and 95 % interval (in points for accuracies)."""
    print("\nFindings (95 % bootstrap intervals; HELD = the interval excludes 0 in the paper's direction)")
    current = None
    for f in findings:
        if (f["dataset"], f["finding"]) != current:
            current = (f["dataset"], f["finding"])
            print(f"  {f['dataset']} ({f['finding']}) {f['claim']}")
        if f["estimate"] is None:
            print(f"      {f['decision']:<13} {f['detail']}")
            continue
        scale = 1.0 if f["finding"] == 6 else 100.0
        unit = "" if f["finding"] == 6 else " points"
        if f["finding"] in (4, 5):
            unit = " points per unit"
        print(
            f"      {f['decision']:<13} {f['detail']}: {scale * f['estimate']:+.2f}{unit} "
            f"[{scale * f['ci_low']:+.2f}, {scale * f['ci_high']:+.2f}] (n = {f['n']})"
        )
    decided = [f for f in findings if f["estimate"] is not None and not f["detail"].endswith("all parts")]
    summary = {d: sum(f["decision"] == d for f in decided) for d in ("HELD", "NOT HELD", "INCONCLUSIVE")}
    print("  " + ", ".join(f"{v} {k}" for k, v in summary.items()) + f" of {len(decided)} comparisons")


def advantage_ratio(rows: dict[str, dict[str, float | None]]) -> dict[str, Any] | None:
    """Membership advantage (2 acc - 1) of the best robust model over the natural model's best."""
    natural = best_inference(rows.get("natural"))
    robust = [(best_inference(row), defense) for defense, row in rows.items() if defense != "natural"]
    robust = [(value, defense) for value, defense in robust if value is not None]
    if natural is None or not robust:
        return None
    best, defense = max(robust)
    natural_adv, robust_adv = 2 * natural - 100, 2 * best - 100
    ratio = robust_adv / natural_adv if natural_adv > 0 else None
    return {
        "defense": defense,
        "natural_advantage": natural_adv,
        "robust_advantage": robust_adv,
        "ratio": ratio,
    }


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_table(
    dataset: str, ours: dict[str, dict[str, float | None]], paper: dict[str, dict[str, float | None]]
) -> None:
    header = ("defense", "train", "test", "adv-tr", "adv-te", "ver-tr", "ver-te", "I_B", "I_A", "I_V")
    print(f"\n{dataset}: ours / paper (%)")
    print(f"{header[0]:<34}" + "".join(f"{h:>16}" for h in header[1:]))
    for defense in [d for d in DEFENSE_ORDER if d in ours or d in paper]:
        mine, theirs = ours.get(defense, {}), paper.get(defense, {})
        cells = [f"{_cell(mine.get(c))}/{_cell(theirs.get(c))}" for c in COLUMNS]
        print(f"{DEFENSE_TITLE.get(defense, defense):<34}" + "".join(f"{c:>16}" for c in cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="folder with one subfolder per dataset ($ROBMIA_DATA)")
    parser.add_argument("--lite", action="store_true", help="the CPU-sized specs in specs/paper-lite/")
    parser.add_argument("--db", default=None, help="DuckDB store (default: paper[-lite].duckdb here)")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma list of yale, fmnist, cifar10")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    parser.add_argument(
        "--device", default=None, help="auto, cpu or cuda (default: the specs' runtime.device)"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="train nothing; score and report the store"
    )
    parser.add_argument(
        "--resamples", type=int, default=1000, help="bootstrap replicates behind every finding's interval"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="JSON output (default benchmarks/results/reproduce_paper[-lite]-<datasets>.json)",
    )
    parser.add_argument(
        "--findings-only",
        action="store_true",
        help="no specs, no training: decide the findings on every model of --db (scoring confidence first)",
    )
    args = parser.parse_args(argv)
    if args.findings_only:
        if not args.db:
            parser.error("--findings-only needs --db")
        from robmia_db.attacks.scoring import score_attacks
        from robmia_db.store.query import run_query

        score_attacks(args.db, ["confidence"], resamples=args.resamples)
        keys = [r["model_key"] for r in run_query(args.db, "SELECT model_key FROM v_models").to_pylist()]
        findings = statistical_findings(Path(args.db), keys, args.resamples)
        print_findings(findings)
        out = Path(args.out or REPO / "benchmarks" / "results" / f"findings-{Path(args.db).stem}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"db": str(args.db), "findings": findings}, indent=2, default=str))
        print(f"\nwrote {out}")
        return 0

    if not args.data:
        parser.error("--data is required (unless --findings-only)")
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown:
        parser.error(f"unknown dataset {unknown[0]!r} (choose from {', '.join(DATASETS)})")
    data_dir = Path(args.data).expanduser().resolve()
    if not data_dir.is_dir():
        parser.error(f"--data {data_dir} is not a folder")
    suffix = "-lite" if args.lite else ""
    db_path = Path(args.db or f"paper{suffix}.duckdb")
    out_path = Path(
        args.out or REPO / "benchmarks" / "results" / f"reproduce_paper{suffix}-{'-'.join(datasets)}.json"
    )

    import torch

    torch.set_num_threads(args.threads)
    os.environ["ROBMIA_DATA"] = str(data_root_for(data_dir))

    from robmia_db.attacks.scoring import score_attacks
    from robmia_db.runner.executor import run_specs
    from robmia_db.store.connection import checkpoint_dir

    available = implemented_defenses()
    paths, left_out = [], []
    for path in spec_files(args.lite, datasets):
        missing = [d for d in spec_defenses(path) if d not in available]
        (left_out if missing else paths).append((path, missing))
    for path, missing in left_out:
        print(f"left out {path.relative_to(REPO)}: the runner does not implement {', '.join(missing)} yet")
    if not paths:
        print("nothing to run")
        return 1
    from robmia_db.spec import load_specs

    model_keys = [job.model_key for item in load_specs([p for p, _ in paths]) for job in item.jobs]

    # the runner's periodic partial save does not create the checkpoint folder itself
    checkpoint_dir(db_path).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    failed: list[str] = []
    if not args.report_only:
        print(f"running {len(paths)} specs into {db_path} (ROBMIA_DATA={os.environ['ROBMIA_DATA']})")
        summary = run_specs(
            [p for p, _ in paths], db_path, reporter=LineReporter(), threads=args.threads, device=args.device
        )
        failed = [f"{o.job.model_name}: {o.error}" for o in summary.failed]
    run_seconds = time.perf_counter() - started
    started = time.perf_counter()
    score_attacks(db_path, ["confidence"])
    score_seconds = time.perf_counter() - started

    ours = read_results(db_path, model_keys)
    paper = paper_table()
    for dataset in datasets:
        print_table(dataset, ours.table.get(dataset, {}), paper.get(dataset, {}))

    paper_findings = check_findings(paper, {d: list(paper[d]) for d in datasets})
    our_findings = statistical_findings(db_path, model_keys, args.resamples)
    print_findings(our_findings)

    ratios = {}
    print("\nMembership advantage, best robust model / natural model (ratio against the same-run baseline)")
    for dataset in datasets:
        mine = advantage_ratio(ours.table.get(dataset, {}))
        theirs = advantage_ratio(paper.get(dataset, {}))
        ratios[dataset] = {"ours": mine, "paper": theirs}
        if mine is not None and theirs is not None:
            ratio = "-" if mine["ratio"] is None else f"{mine['ratio']:.2f}x"
            print(
                f"  {dataset:<8} ours {mine['robust_advantage']:.2f} ({mine['defense']}) / "
                f"{mine['natural_advantage']:.2f} = {ratio};  paper {theirs['ratio']:.2f}x ({theirs['defense']})"
            )
    if failed:
        print("\nFailed models:\n  " + "\n  ".join(failed))

    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(
        json.dumps(
            {
                "lite": args.lite,
                "datasets": datasets,
                "db": str(db_path),
                "specs": [str(p.relative_to(REPO)) for p, _ in paths],
                "specs_left_out": {str(p.relative_to(REPO)): m for p, m in left_out},
                "run_seconds": round(run_seconds, 1),
                "score_seconds": round(score_seconds, 1),
                "ours": ours.table,
                "paper": {d: paper[d] for d in datasets},
                "models": ours.models,
                "findings": our_findings,
                "paper_findings": paper_findings,
                "advantage_ratio": ratios,
                "failed": failed,
            },
            indent=2,
            default=str,
        )
    )
    print(f"\nwrote {out_path}")
    return 0 if not failed else 2


if __name__ == "__main__":
    sys.exit(main())
