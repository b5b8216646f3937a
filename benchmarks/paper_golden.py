"""Reproduce the paper's 14 Yale inference accuracies from the authors' own per-sample outputs.

Usage: python benchmarks/paper_golden.py ../shared/golden/privacy-vs-robustness-yale [--out results.json]

Imports each npz with `robmia-db import --format ccs2019` semantics into a fresh store, scores the built-in
`confidence` attack through the same SQL path users run, and compares with the printed values. Exits 1 on
any difference over 1e-12. Also prints AUC and TPR at 1% and 0.1% FPR beside the paper's balanced accuracy
("-" where too few non-members leave a rate undefined, with the metrics module's note).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from robmia_db.attacks.importers import import_outputs  # noqa: E402
from robmia_db.attacks.scoring import score_attacks  # noqa: E402
from robmia_db.store.query import run_query  # noqa: E402

# The authors' printed values (paper.md section 5.1, golden README): I_B and I_A per defense.
PAPER = {
    "natural": (0.5585306164243293, 0.5427329510546794),
    "pgd_at": (0.6168687282408356, 0.6882561949621135),
    "distributional_at": (0.6223202949006759, 0.6406952693016588),
    "trades": (0.5805519148064715, 0.6558775343026828),
    "duality": (0.5589913987302887, 0.6039596559492116),
    "diffai": (0.6510567274216671, 0.6563721073110793),
    "ibp": (0.6045054269916035, 0.6627769813639157),
}
TOLERANCE = 1e-12


def _shown(value: float | None) -> str:
    """A low-FPR rate, or "-" where the metrics module leaves it NULL (too few non-members; see the note)."""
    return "-" if value is None else f"{value:.4f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="folder with natural.npz, pgd_at.npz, ...")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/paper_golden.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "golden.duckdb"
        started = time.perf_counter()
        for defense in PAPER:
            # No shared --dataset: each of the authors' files holds its own train/test split, so example i of
            # one file is another image than example i of the next (the importer refuses that claim).
            import_outputs(db, args.folder / f"{defense}.npz", "ccs2019", name=defense, defense=defense)
        imported = time.perf_counter() - started
        started = time.perf_counter()
        score_attacks(db, ["confidence"])
        scored = time.perf_counter() - started
        rows = run_query(
            db,
            "SELECT model_name, perturbation, balanced_accuracy, auc, tpr_at_fpr_1e2, tpr_at_fpr_1e3, low_fpr_note "
            "FROM v_metrics "
            "WHERE attack = 'confidence'",
        ).to_pylist()
    ours = {(r["model_name"], r["perturbation"]): r for r in rows}
    worst = 0.0
    results = []
    print(
        f"{'defense':<18} {'signal':<12} {'paper':>20} {'robmia-db':>20} {'diff':>9} {'AUC':>7} {'TPR@1%':>7}"
        f" {'TPR@0.1%':>9}"
    )
    for defense, (benign, adversarial) in PAPER.items():
        for signal, paper_value in (("benign", benign), ("adversarial", adversarial)):
            row = ours[(defense, signal)]
            diff = abs(row["balanced_accuracy"] - paper_value)
            worst = max(worst, diff)
            results.append(
                {
                    "defense": defense,
                    "signal": signal,
                    "paper": paper_value,
                    "ours": row["balanced_accuracy"],
                    "diff": diff,
                    "auc": row["auc"],
                    "tpr_at_fpr_1e2": row["tpr_at_fpr_1e2"],
                    "tpr_at_fpr_1e3": row["tpr_at_fpr_1e3"],
                    "low_fpr_note": row["low_fpr_note"],
                }
            )
            print(
                f"{defense:<18} {signal:<12} {paper_value:>20.16f} {row['balanced_accuracy']:>20.16f} {diff:>9.1e} "
                f"{row['auc']:>7.4f} {_shown(row['tpr_at_fpr_1e2']):>7} {_shown(row['tpr_at_fpr_1e3']):>9}"
            )
    notes = {r["low_fpr_note"] for r in rows if r["low_fpr_note"]}
    for note in sorted(notes):
        print(f"  -: {note}")
    ok = worst <= TOLERANCE
    print(
        f"\nlargest difference {worst:.2e} (tolerance {TOLERANCE:g}): {'all 14 reproduced' if ok else 'MISMATCH'}"
    )
    print(f"import {imported:.2f} s, scoring {scored:.2f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"max_abs_diff": worst, "ok": ok, "rows": results, "import_s": imported, "score_s": scored},
            indent=2,
        )
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
