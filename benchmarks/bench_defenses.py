"""Benchmark: training cost per batch of every defense, as a ratio to natural training measured in the same run.

One training step = the defense's loss, backward, its gradient clipping, and an Adam step; batch 128, eps 0.1,
1 torch thread, process CPU time, the minimum of several repeats after a warm-up (the machine is shared; the
median is kept in the JSON, and the load average before and after). Networks are the two CNNs of
defenses.md section 5 (28x28: Conv(1->16, k4 s2) - Conv(16->32, k4 s2) - FC 100 - 10; 8x8: Conv(1->16, k3 s1)
- Conv(16->32, k4 s2) - FC 100 - 10) on random inputs. Schedules sit at full eps, where the robust losses are
kappa = 0.5 mixes, as in defenses.md section 5.1; CROWN-IBP is measured with beta = 1 (the CROWN-IBP bound,
the costly end of its schedule). The dual and zonotope steps at 28x28 are measured on a batch of 32 and
scaled by 4 (their cost is linear in the batch). The projected dual rows are followed by convex_adversarial
0.4.4's own step in the same mode (proj=k, l1_median, bounded input), and the ratio ours / theirs.

    python benchmarks/bench_defenses.py [--out benchmarks/results/bench_defenses.json] [--repeats 5]
        [--only projections]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robmia_db.runner.defenses import TrainProgress, build_defense
from robmia_db.spec.defenses import DEFENSE_PARAMS

EPS = 0.1
BATCH = 128

# (label, defense, parameters): 10-step PGD / TRADES at eps/4, 15-step WRM, kappa 0.5 mixes (defenses.md 5)
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("natural", "natural", {}),
    ("pgd_at (10 steps)", "pgd_at", {"steps": 10}),
    ("trades (10 steps)", "trades", {"steps": 10}),
    ("distributional_at wrm (1 + 15 steps)", "distributional_at", {"mode": "wrm", "steps": 15}),
    ("distributional_at ccs2019 (8 steps)", "distributional_at", {"mode": "ccs2019"}),
    ("ibp", "ibp", {}),
    ("crown_ibp (beta 1)", "crown_ibp", {"beta_final": 1.0}),
    ("diffai box", "diffai", {}),
    ("diffai zonotope", "diffai", {"domain": "zonotope"}),
    ("dual (exact)", "dual", {}),
    ("dual (20 projections)", "dual", {"projections": 20, "norm": "l1_median"}),
    ("dual (50 projections)", "dual", {"projections": 50, "norm": "l1_median"}),
]
EXPENSIVE_AT_28 = {"diffai zonotope", "dual (exact)", "dual (20 projections)", "dual (50 projections)"}
# convex_adversarial 0.4.4's training step in its projection mode, the authors' own code (same network,
# batch, eps, clipping and Adam step), measured right after ours with the same inputs.
CONVEX_ADVERSARIAL = {"dual (20 projections)": 20, "dual (50 projections)": 50}
EPOCH_SAMPLES = 10_000  # defenses.md quotes epochs of 10k samples (79 batches of 128)

# defenses.md section 5.1, seconds per batch of 128 at 1 thread (28x28, 8x8); None where not measured there
REFERENCE_SECONDS: dict[str, tuple[float | None, float | None]] = {
    "natural": (0.008, 0.003),
    "pgd_at (10 steps)": (0.0885, 0.021),
    "trades (10 steps)": (0.098, 0.025),
    "distributional_at wrm (1 + 15 steps)": (0.123, 0.028),
    "distributional_at ccs2019 (8 steps)": (None, None),
    "ibp": (0.022, 0.009),
    "crown_ibp (beta 1)": (0.20, 0.050),
    "diffai box": (0.022, 0.009),  # "approximately IBP"
    "diffai zonotope": (36.0, 1.64),  # exact DeepZ, hand prototype
    "dual (exact)": (38.0, 1.4),  # convex_adversarial exact
    "dual (20 projections)": (None, None),
    "dual (50 projections)": (5.2, 1.09),  # convex_adversarial proj=50 l1_median
}


def cnn_28() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )


def cnn_8() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, stride=1, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )


def _inputs(batch: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, side, side, generator=generator)
    return x, torch.randint(0, 10, (batch,), generator=generator)


def _timed(step, repeats: int) -> dict[str, float]:
    """Process CPU seconds of `step` after one warm-up: the minimum (the figure quoted) and the median."""
    times = []
    for index in range(repeats + 1):
        started = time.process_time()
        step()
        if index:
            times.append(time.process_time() - started)
    return {"min": min(times), "median": statistics.median(times)}


def step_seconds(
    defense_name: str, params: dict[str, Any], model: nn.Module, batch: int, side: int, repeats: int
):
    """CPU seconds (min and median) of one training step: loss, backward, clipping, Adam step."""
    spec_params = DEFENSE_PARAMS[defense_name](**params)
    eps = EPS if spec_params.uses_eps else None
    defense = build_defense(defense_name, spec_params.resolved(eps), eps)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y = _inputs(batch, side)
    progress = TrainProgress(epoch=99, step=99 * 10, steps_per_epoch=10, epochs=100)  # every ramp is done

    def step() -> None:
        loss = defense.loss(model, x, y, progress)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if defense.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), defense.grad_clip_norm)
        optimizer.step()

    return _timed(step, repeats), defense.describe_epoch(progress)


def convex_adversarial_seconds(projections: int, model: nn.Module, batch: int, side: int, repeats: int):
    """The same step through convex_adversarial.robust_loss(proj=k, norm_type="l1_median", bounded_input)."""
    from convex_adversarial import robust_loss

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y = _inputs(batch, side)

    def step() -> None:
        loss, _ = robust_loss(model, EPS, x, y, proj=projections, norm_type="l1_median", bounded_input=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return _timed(step, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/bench_defenses.json")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated parts of case labels to run (natural always runs: it is the baseline), "
        'e.g. "projections" for the dual rows against convex_adversarial',
    )
    args = parser.parse_args()
    wanted = [part.strip() for part in args.only.split(",") if part.strip()]
    torch.set_num_threads(1)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "setup": {
            "batch": BATCH, "eps": EPS, "threads": 1, "repeats": args.repeats, "timer": "process CPU time, min (median kept)",
            "torch": torch.__version__, "python": platform.python_version(),
            "load_average_before": os.getloadavg(),
        },
        "inputs": {},
    }  # fmt: skip
    for side, build in ((28, cnn_28), (8, cnn_8)):
        rows: dict[str, Any] = {}
        baseline = None
        for label, name, params in CASES:
            if wanted and name != "natural" and not any(part in label for part in wanted):
                continue
            torch.manual_seed(0)
            model = build()
            small = side == 28 and label in EXPENSIVE_AT_28
            batch = 32 if small else BATCH
            repeats = 2 if (small or label in EXPENSIVE_AT_28) else args.repeats
            timing, schedule = step_seconds(name, params, model, batch, side, repeats)
            seconds = timing["min"] * BATCH / batch
            baseline = seconds if name == "natural" else baseline
            reference = REFERENCE_SECONDS[label][0 if side == 28 else 1]
            reference_natural = REFERENCE_SECONDS["natural"][0 if side == 28 else 1]
            row = {
                "seconds_per_batch": round(seconds, 5),
                "median_seconds_per_batch": round(timing["median"] * BATCH / batch, 5),
                "seconds_per_epoch_10k": round(seconds * EPOCH_SAMPLES / BATCH, 2),
                "ratio_to_natural": round(seconds / baseline, 2),
                "measured_on_batch": batch,
                "schedule": {k: round(v, 4) for k, v in schedule.items()},
                "reference_seconds": reference,
                "reference_ratio_to_natural": round(reference / reference_natural, 2) if reference else None,
            }
            rows[label] = row
            print(
                f"{side:>2}x{side:<2} {label:<38} {seconds:9.4f} s/batch  x{row['ratio_to_natural']:<8}"
                f" (defenses.md: {row['reference_ratio_to_natural'] or '-'})",
                flush=True,
            )
            if label in CONVEX_ADVERSARIAL:
                torch.manual_seed(0)
                theirs = convex_adversarial_seconds(CONVEX_ADVERSARIAL[label], build(), batch, side, repeats)
                theirs_seconds = theirs["min"] * BATCH / batch
                row["convex_adversarial_seconds_per_batch"] = round(theirs_seconds, 5)
                row["convex_adversarial_seconds_per_epoch_10k"] = round(
                    theirs_seconds * EPOCH_SAMPLES / BATCH, 2
                )
                row["ratio_to_convex_adversarial"] = round(seconds / theirs_seconds, 3)
                print(
                    f"{side:>2}x{side:<2} {'  convex_adversarial 0.4.4, same k':<38} {theirs_seconds:9.4f} s/batch"
                    f"  ours / theirs = {row['ratio_to_convex_adversarial']:.2f}x (goal <= 1.0);"
                    f" epoch of 10k: {row['seconds_per_epoch_10k']:.0f} s vs"
                    f" {row['convex_adversarial_seconds_per_epoch_10k']:.0f} s",
                    flush=True,
                )
        results["inputs"][f"{side}x{side}"] = rows
    results["setup"]["load_average_after"] = os.getloadavg()
    results["setup"]["wall_seconds"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out} ({results['setup']['wall_seconds']} s)")


if __name__ == "__main__":
    main()
