"""Analysis layer: the six findings of Song, Shokri & Mittal (CCS 2019) decided from stored scores.

Every finding is an estimate with a 95 % bootstrap interval, decided as HELD (the interval excludes 0 in the
claimed direction), NOT HELD (it excludes 0 the other way) or INCONCLUSIVE; a finding the store cannot
measure (e.g. one eps only) is NOT MEASURED. Both sides of a comparison use the same perturbation kind at the
same perturbation eps (no best-of I_B / I_A / I_V on one side only), and every dataset is reported.

1. robust models leak more than natural ones: paired difference per robust defense and kind;
2. PGD-AT: I_A > I_B: paired difference of one model's adversarial and benign metric, over seeds;
3. verifiable defenses leak more than natural and less than empirical ones: HELD when every part is HELD,
   NOT HELD when a part is NOT HELD;
4. leakage grows with the training eps / 5. with the model width: least-squares slope of the metric over
   the models of one defense, interval from the bootstrap over examples (shared by models on the same
   examples) and, per eps or width level, over seeds;
6. the robustness generalization gap (adversarial train - test accuracy) correlates with leakage (I_A):
   Spearman's rho over models, interval from the bootstrap over models.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from robmia_db.analysis.compare import ScoreVector, _eps_key, make_pair, paired_rows
from robmia_db.analysis.paired import metric_of, paired_difference, shared_replicates
from robmia_db.attacks.intervals import (
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    percentile_interval,
)

HELD, NOT_HELD, INCONCLUSIVE, NOT_MEASURED = "HELD", "NOT HELD", "INCONCLUSIVE", "NOT MEASURED"
EMPIRICAL = ("pgd_at", "distributional_at", "trades")
VERIFIABLE = ("dual", "diffai", "ibp", "crown_ibp")
CLAIMS = {
    1: "robust models leak more than natural models",
    2: "PGD-AT: I_A > I_B",
    3: "verifiable defenses leak more than natural but less than empirical ones",
    4: "leakage grows with the training eps",
    5: "leakage grows with the model width",
    6: "the robustness generalization gap correlates with leakage",
}


def decide(ci_low: float | None, ci_high: float | None) -> str:
    """HELD / NOT HELD / INCONCLUSIVE for a claim that the quantity is > 0."""
    if ci_low is None or ci_high is None or np.isnan(ci_low) or np.isnan(ci_high):
        return NOT_MEASURED
    if ci_low > 0:
        return HELD
    if ci_high < 0:
        return NOT_HELD
    return INCONCLUSIVE


def combine(decisions: Sequence[str]) -> str:
    """A conjunction of claims: NOT HELD if any part is, HELD if all are, else INCONCLUSIVE."""
    measured = [d for d in decisions if d != NOT_MEASURED]
    if not measured:
        return NOT_MEASURED
    if NOT_HELD in measured:
        return NOT_HELD
    if all(d == HELD for d in decisions):
        return HELD
    return INCONCLUSIVE


def _row(dataset, finding, detail, estimate, low, high, n, **extra) -> dict[str, Any]:
    return {
        "dataset": dataset, "finding": finding, "claim": CLAIMS[finding], "detail": detail,
        "estimate": estimate, "ci_low": low, "ci_high": high, "decision": decide(low, high), "n": n, **extra,
    }  # fmt: skip


def _own_eps(vectors: Sequence[ScoreVector]) -> list[ScoreVector]:
    """Per model and kind, the perturbation at the model's own eps (benign has none), else a unique one."""
    by_model: dict[tuple, list[ScoreVector]] = {}
    for v in vectors:
        by_model.setdefault((v.model_key, v.kind), []).append(v)
    chosen = []
    for (_, kind), items in by_model.items():
        if kind == "benign" or len(items) == 1:
            chosen.append(items[0])
            continue
        own = [v for v in items if _eps_key(v.perturbation_eps) == _eps_key(v.eps)]
        if own:
            chosen.append(own[0])
    return chosen


def _at_own_eps(r: dict[str, Any]) -> bool:
    """I_A / I_V as the paper defines them: at the (first) robust model's own training eps."""
    return (
        r["kind"] == "benign" or r["eps_a"] is None or _eps_key(r["perturbation_eps"]) == _eps_key(r["eps_a"])
    )


def robust_vs_natural(vectors, dataset, n_resamples, seed) -> list[dict[str, Any]]:
    rows = []
    for defense in sorted({v.defense for v in vectors} - {"natural", None}):
        for r in paired_rows(
            vectors, defense, "natural", n_resamples=n_resamples, n_permutations=1, seed=seed
        ):
            if not _at_own_eps(r):
                continue
            detail = f"{defense} - natural, {r['kind']} ({r['arch']}, width {r['width']}, eps {r['eps_a']})"
            rows.append(_row(dataset, 1, detail, r["difference"], r["ci_low"], r["ci_high"], r["n_pairs"]))
    return rows


def adversarial_vs_benign(vectors, dataset, n_resamples, seed) -> list[dict[str, Any]]:
    rows = []
    own = [v for v in _own_eps(vectors) if v.defense == "pgd_at"]
    groups: dict[tuple, dict[Any, dict[str, ScoreVector]]] = {}
    for v in own:
        key = (v.arch, _eps_key(v.width), _eps_key(v.eps))
        # one model's I_A against its own I_B: every model is a pair (a fleet's models share their seed)
        groups.setdefault(key, {}).setdefault(v.model_key, {})[v.kind] = v
    for (arch, width, eps), by_model in sorted(groups.items(), key=lambda kv: str(kv[0])):
        pairs = [
            make_pair(k["adversarial"], k["benign"])
            for k in by_model.values()  # the vectors' order: by seed, then model name
            if {"adversarial", "benign"} <= set(k)
        ]
        if not pairs:
            continue
        result = paired_difference(pairs, "balanced_accuracy", n_resamples, 1, seed)
        detail = f"pgd_at I_A - I_B ({arch}, width {width}, eps {eps})"
        rows.append(_row(dataset, 2, detail, result.difference, result.ci_low, result.ci_high, len(pairs)))
    return rows


def verifiable_between(vectors, dataset, n_resamples, seed) -> list[dict[str, Any]]:
    rows = []
    defenses = {v.defense for v in vectors}
    for verifiable in sorted(defenses & set(VERIFIABLE)):
        parts = paired_rows(
            vectors, verifiable, "natural", n_resamples=n_resamples, n_permutations=1, seed=seed
        )
        for empirical in sorted(defenses & set(EMPIRICAL)):
            parts += paired_rows(
                vectors, empirical, verifiable, n_resamples=n_resamples, n_permutations=1, seed=seed
            )
        # one claim at one eps: both sides trained at the same eps, I_A / I_V at that eps
        parts = [
            r
            for r in parts
            if _at_own_eps(r) and (r["b"] == "natural" or _eps_key(r["eps_a"]) == _eps_key(r["eps_b"]))
        ]
        part_rows = [
            _row(
                dataset, 3, f"{r['a']} - {r['b']}, {r['kind']} ({r['arch']}, width {r['width']}, eps {r['eps_a']})",
                r["difference"], r["ci_low"], r["ci_high"], r["n_pairs"], part_of=verifiable,
            )
            for r in parts
        ]  # fmt: skip
        decision = combine([r["decision"] for r in part_rows])
        complete = any(r["b"] == "natural" for r in parts) and any(r["a"] in EMPIRICAL for r in parts)
        if not complete and decision != NOT_HELD:
            decision = NOT_MEASURED  # half of the claim cannot be HELD on its own
        summary = _row(dataset, 3, f"{verifiable}: all parts", None, None, None, len(parts))
        summary["decision"] = decision
        if not complete:
            summary["detail"] += " (natural or empirical side not measured on the same network)"
        rows += part_rows + [summary]
    return rows


def _membership_key(v: ScoreVector) -> str:
    digest = hashlib.sha256(v.example_id.tobytes() + v.is_member.tobytes())
    return digest.hexdigest()


def _metric_replicates(
    vectors: Sequence[ScoreVector], n_resamples: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(points, replicates (len, B)) of the balanced accuracy; shared resamples for shared examples."""
    points = np.empty(len(vectors))
    reps = np.empty((len(vectors), n_resamples))
    groups: dict[str, list[int]] = {}
    for i, v in enumerate(vectors):
        groups.setdefault(_membership_key(v), []).append(i)
    for g, (_, indices) in enumerate(sorted(groups.items())):
        members = vectors[indices[0]].is_member
        full = shared_replicates(
            [vectors[i].score for i in indices], members, "balanced_accuracy", n_resamples, [seed, g]
        )
        for row, i in enumerate(indices):
            reps[i] = full[row]
            points[i] = metric_of(vectors[i].score, members, "balanced_accuracy")
    return points, reps


def _slope(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares slope of y (..., n) on x (n,)."""
    xc = x - x.mean()
    return (y - y.mean(axis=-1, keepdims=True)) @ xc / (xc @ xc)


def trend(vectors, dataset, axis: str, n_resamples, seed) -> list[dict[str, Any]]:
    """Findings 4 (axis 'eps') and 5 (axis 'width'): slope of leakage over the axis, per defense and kind."""
    finding = 4 if axis == "eps" else 5
    rows = []
    # a model trained at an eps is attacked at its own eps; one trained without (natural) has no own eps, so
    # each of its attack eps is its own series (one PGD eps per series, never a mixture)
    untrained = [v for v in vectors if v.defense is not None and v.eps is None]
    own = [v for v in _own_eps(vectors) if v.defense is not None and v.eps is not None] + untrained
    groups: dict[tuple, list[ScoreVector]] = {}
    for v in own:
        if axis == "eps" and v.eps is None:
            continue  # natural training ignores eps
        other = _eps_key(v.width) if axis == "eps" else _eps_key(v.eps)
        attack_eps = _eps_key(v.perturbation_eps) if v.eps is None else None
        groups.setdefault((v.defense, v.arch, other, v.kind, attack_eps), []).append(v)
    rng = np.random.default_rng([seed, finding])
    for (defense, arch, other, kind, attack_eps), items in sorted(groups.items(), key=lambda kv: str(kv[0])):
        x = np.array([float(getattr(v, axis)) for v in items])
        if np.unique(x).size < 2:
            continue
        points, reps = _metric_replicates(items, n_resamples, seed)
        # seeds: within each level, resample its models with replacement
        chosen = np.empty((n_resamples, len(items)), dtype=np.int64)
        for level in np.unique(x):
            at = np.flatnonzero(x == level)
            chosen[:, at] = at[rng.integers(0, at.size, size=(n_resamples, at.size))]
        boot = _slope(x, reps[chosen, np.arange(n_resamples)[:, None]])
        estimate = float(_slope(x, points))
        low, high = percentile_interval(boot, DEFAULT_CONFIDENCE)
        per_unit = "per unit of eps" if axis == "eps" else "per unit of width"
        other_name = "width" if axis == "eps" else "eps"
        attacked = f", attack eps {attack_eps}" if attack_eps is not None and kind != "benign" else ""
        detail = f"{defense}, {kind} ({arch}, {other_name} {other}{attacked}; {len(items)} models at {axis} {sorted(set(x.tolist()))}; slope {per_unit})"
        rows.append(_row(dataset, finding, detail, estimate, low, high, len(items)))
    return rows


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties averaged, along the last axis."""
    order = np.argsort(values, axis=-1, kind="stable")
    flat_values = np.take_along_axis(values, order, axis=-1)
    n = values.shape[-1]
    out = np.empty(values.shape)
    for idx in np.ndindex(values.shape[:-1]):
        v = flat_values[idx]
        starts = np.r_[0, np.flatnonzero(np.diff(v) != 0) + 1]
        ends = np.r_[starts[1:], n]
        r = np.repeat((starts + ends + 1) / 2.0, ends - starts)
        out[idx + (order[idx],)] = r
    return out


def spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row pair (Pearson correlation of average ranks); NaN when a row is constant."""
    rx, ry = _average_ranks(np.asarray(x, float)), _average_ranks(np.asarray(y, float))
    rx = rx - rx.mean(axis=-1, keepdims=True)
    ry = ry - ry.mean(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rx * ry).sum(axis=-1) / np.sqrt((rx * rx).sum(axis=-1) * (ry * ry).sum(axis=-1))


def gap_correlation(vectors, dataset, n_resamples, seed) -> list[dict[str, Any]]:
    rows = []
    own = [
        v for v in _own_eps(vectors)
        if v.kind == "adversarial" and v.extra.get("adv_train_acc") is not None and v.extra.get("adv_test_acc") is not None
    ]  # fmt: skip
    if len(own) < 4:
        return rows
    gap = np.array([v.extra["adv_train_acc"] - v.extra["adv_test_acc"] for v in own])
    leak = np.array([metric_of(v.score, v.is_member, "balanced_accuracy") for v in own])
    rng = np.random.default_rng([seed, 6])
    chosen = rng.integers(0, len(own), size=(n_resamples, len(own)))
    boot = spearman(gap[chosen], leak[chosen])
    boot = boot[~np.isnan(boot)]
    estimate = float(spearman(gap, leak))
    low, high = percentile_interval(boot, DEFAULT_CONFIDENCE) if boot.size else (None, None)
    detail = (
        f"Spearman rho of adversarial train-test gap and I_A over {len(own)} models (bootstrap over models)"
    )
    rows.append(_row(dataset, 6, detail, estimate, low, high, len(own)))
    return rows


def decide_findings(
    vectors: Sequence[ScoreVector], n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED
) -> list[dict[str, Any]]:
    """Every finding for every dataset among `vectors` (the `confidence` attack's scores, say).

    Returns rows with dataset, finding (1-6), claim, detail, estimate, ci_low, ci_high, decision, n; a
    finding with no row for a dataset gets one NOT MEASURED row saying so.
    """
    rows: list[dict[str, Any]] = []
    for dataset in sorted({v.dataset for v in vectors}, key=str):
        subset = [v for v in vectors if v.dataset == dataset]
        found = (
            robust_vs_natural(subset, dataset, n_resamples, seed)
            + adversarial_vs_benign(subset, dataset, n_resamples, seed)
            + verifiable_between(subset, dataset, n_resamples, seed)
            + trend(subset, dataset, "eps", n_resamples, seed)
            + trend(subset, dataset, "width", n_resamples, seed)
            + gap_correlation(subset, dataset, n_resamples, seed)
        )
        for finding in CLAIMS:
            if not any(r["finding"] == finding for r in found):
                found.append(
                    {**_row(dataset, finding, "not measurable from these models", None, None, None, 0)}
                )
        rows += sorted(found, key=lambda r: r["finding"])
    return rows
