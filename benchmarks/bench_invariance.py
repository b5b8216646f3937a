"""Benchmark (script, not a test): the cost of the invariance contract on a fleet.

Attacks that read reference models now run one target per sandbox, so `reference` never holds the
target's own labels. The baseline, measured in the same run on the same store, is the former batching:
every target of a perturbation in one sandbox, `reference` holding every target's references (with
`target_model_key`), which leaked labels between targets. Two reference attacks: a SQL one (a LiRA-like
offline score: the target's loss against the mean OUT loss of its references) and the built-in
`class_thresholds` (Python). Writes JSON to benchmarks/results/bench_invariance.json.

    python benchmarks/bench_invariance.py --models 16 --examples 1000
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from attack_fixtures import import_synthetic, synthetic_outputs  # noqa: E402

import robmia_db.attacks.scoring as scoring  # noqa: E402
from robmia_db.attacks.fleet import FleetCache  # noqa: E402
from robmia_db.attacks.relations import Relations  # noqa: E402

DEFAULT_OUT = Path(__file__).parent / "results" / "bench_invariance.json"
OFFLINE_SQL = """-- title = "offline loss ratio against OUT references"
-- needs = ["signal", "reference_models"]
SELECT t.model_key, t.example_id,
       coalesce(avg(r.loss) FILTER (WHERE NOT r.is_member), avg(r.loss)) - t.loss AS score
FROM target t JOIN reference r ON r.target_model_key = t.model_key AND r.example_id = t.example_id
GROUP BY t.model_key, t.example_id, t.loss
"""


def one_batch(attack, units, relations, calibration_models=0):
    """The former batching: all targets in one sandbox, every target's references side by side (and no
    nested calibration: both sides are timed with `calibration_models=0`)."""
    if not attack.needs_reference:
        yield units, relations
        return
    reference = relations["reference"]
    pieces = []
    for unit in units:
        rows = reference.filter(pc.is_in(reference["model_key"], pa.array(unit.references, pa.string())))
        pieces.append(
            rows.add_column(
                0, "target_model_key", pa.repeat(pa.scalar(unit.model_key, pa.string()), rows.num_rows)
            )
        )
    # attacks reading arrays (`ctx.references`) get each target's own references either way
    tables = {**relations, "reference": pa.concat_tables(pieces)}
    yield units, Relations(tables, FleetCache(reference), units)


def build_fleet(folder: Path, models: int, examples: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, examples)
    ids = np.arange(examples)
    outputs = {
        f"m{i:02d}": synthetic_outputs(
            seed + 1 + i, n=examples, labels=labels, example_id=ids,
            is_member=rng.permutation(np.arange(examples) < examples // 2), adversarial={"pgd": 1.5},
        )
        for i in range(models)
    }  # fmt: skip
    db = folder / "fleet.duckdb"
    import_synthetic(db, folder / "npz", outputs, dataset="shared")
    return db


def timed(db: Path, attack: str | Path, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        # no nested leave-one-out calibration on either side: the former batching had none
        (outcome,) = scoring.score_attacks(db, [attack], force=True, calibration_models=0)
        best = min(best, time.perf_counter() - started)
        assert outcome.scored > 0 and not outcome.skipped
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=16)
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    from threadpoolctl import threadpool_limits

    results = {}
    with tempfile.TemporaryDirectory() as tmp, threadpool_limits(1):
        folder = Path(tmp)
        db = build_fleet(folder, args.models, args.examples, args.seed)
        sql_attack = folder / "offline_loss.sql"
        sql_attack.write_text(OFFLINE_SQL)
        original = scoring.batches
        for name, attack in (("sql_offline", sql_attack), ("class_thresholds", "class_thresholds")):
            per_target = timed(db, attack, args.repeats)
            scoring.batches = one_batch
            try:
                batched = timed(db, attack, args.repeats)
            finally:
                scoring.batches = original
            results[name] = {
                "per_target_s": per_target,
                "one_batch_s": batched,
                "ratio_per_target_over_one_batch": per_target / batched,
            }
            units = 2 * args.models
            print(
                f"{name:17s} {args.models} models x {args.examples} examples x 2 perturbations ({units} units): "
                f"one target per sandbox {per_target:.2f} s, one batch (leaky, former) {batched:.2f} s, "
                f"ratio {per_target / batched:.2f}x"
            )
    payload = {
        "benchmark": "bench_invariance",
        "models": args.models,
        "examples": args.examples,
        "repeats": args.repeats,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
