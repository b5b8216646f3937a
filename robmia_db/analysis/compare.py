"""Analysis layer: "defense A leaks more than defense B", paired over seeds and examples, from the store.

Models are matched on dataset, architecture and width; each side's training eps is kept apart (one row per
pair of eps); scores are matched on perturbation kind and perturbation eps (so I_A of one model is compared
with I_A of the other, at the same attack budget), and models are matched one to one on seed and model
index (a fleet's models share their seed), within one experiment where several would match. The two models
of a pair must have the same examples with the same membership (the same data and membership settings),
which is what makes the comparison paired. Holm's correction is applied over the rows of one call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from robmia_db.analysis.paired import DEFAULT_PERMUTATIONS, METRICS, Pair, holm, paired_difference
from robmia_db.attacks.intervals import DEFAULT_RESAMPLES, DEFAULT_SEED
from robmia_db.errors import RobmiaError
from robmia_db.store.query import run_query

KINDS = ("benign", "adversarial", "verified")


@dataclass
class ScoreVector:
    """One model's scores for one attack and perturbation, in example_id order."""

    model_key: str
    model_name: str
    dataset: str | None
    arch: str | None
    width: float | None
    defense: str | None
    eps: float | None
    seed: int | None
    perturbation: str
    kind: str | None
    perturbation_eps: float | None
    example_id: np.ndarray
    is_member: np.ndarray
    score: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)
    model_index: int = 0  # a fleet's models share their seed and differ here (`membership.n_models`)
    experiment: str | None = None


def load_vectors(
    db_path: str | Path, attack: str, defenses: Sequence[str] | None = None, kind: str | None = None
) -> list[ScoreVector]:
    """Every stored score vector of `attack` (optionally of these defenses and this kind)."""
    where = ["s.attack = $attack", "m.status = 'completed'"]
    params: dict[str, Any] = {"attack": attack}
    if defenses:
        where.append("list_contains($defenses, m.defense)")
        params["defenses"] = list(defenses)
    if kind:
        where.append("p.kind = $kind")
        params["kind"] = kind
    table = run_query(
        db_path,
        f"""SELECT s.model_key, m.model_name, m.dataset, m.arch, m.width, m.defense, m.eps, m.seed,
                   m.model_index, m.experiment, m.adv_train_acc, m.adv_test_acc, s.perturbation, p.kind, p.eps AS perturbation_eps,
                   list(s.example_id ORDER BY s.example_id) AS example_id,
                   list(s.is_member ORDER BY s.example_id) AS is_member,
                   list(s.score ORDER BY s.example_id) AS score
            FROM v_scores s JOIN v_models m USING (model_key)
            JOIN v_perturbations p ON p.model_key = s.model_key AND p.perturbation = s.perturbation
            WHERE {" AND ".join(where)}
            GROUP BY ALL ORDER BY m.dataset, m.defense, m.eps, m.seed, m.model_name, s.perturbation""",
        params,
    )
    vectors = []
    for row in table.to_pylist():
        scores = np.array([np.nan if v is None else v for v in row["score"]], dtype=np.float64)
        vectors.append(
            ScoreVector(
                row["model_key"], row["model_name"], row["dataset"], row["arch"], row["width"], row["defense"],
                row["eps"], row["seed"], row["perturbation"], row["kind"], row["perturbation_eps"],
                np.asarray(row["example_id"], dtype=np.int64), np.asarray(row["is_member"], dtype=bool), scores,
                {"adv_train_acc": row["adv_train_acc"], "adv_test_acc": row["adv_test_acc"]},
                row["model_index"] or 0, row["experiment"],
            )
        )  # fmt: skip
    return vectors


def _eps_key(value: float | None) -> float | None:
    return None if value is None else round(float(value), 9)


def make_pair(x: ScoreVector, y: ScoreVector) -> Pair:
    """A `Pair` of two vectors over the same examples; an error names both models otherwise."""
    if not (np.array_equal(x.example_id, y.example_id) and np.array_equal(x.is_member, y.is_member)):
        raise RobmiaError(
            f"{x.model_name} and {y.model_name} were not evaluated on the same examples with the same "
            "membership; a paired comparison needs the same data and membership settings"
        )
    for v in (x, y):
        if np.isnan(v.score).any():
            raise RobmiaError(
                f"{v.model_name} ({v.perturbation}) has NULL scores; a paired comparison needs all"
            )
    return Pair(x.score, y.score, x.is_member)


def _replicate(v: ScoreVector) -> tuple:
    """What makes two models of different defenses a pair: the same seed and, in a fleet, the same model."""
    return (v.seed is None, v.seed, v.model_index)


def match_models(a_vectors: Sequence[ScoreVector], b_vectors: Sequence[ScoreVector]) -> list[tuple]:
    """(A, B) pairs of one group: matched on seed and model index (a fleet's models share their seed); where
    several models of a side match, within one experiment. A match that stays ambiguous is an error, never a
    silent pick of one of them."""
    by_replicate: dict[tuple, tuple[list[ScoreVector], list[ScoreVector]]] = {}
    for side, vectors in enumerate((a_vectors, b_vectors)):
        for v in vectors:
            by_replicate.setdefault(_replicate(v), ([], []))[side].append(v)
    pairs = []
    for _, (xs, ys) in sorted(by_replicate.items()):
        if not xs or not ys:
            continue
        if len(xs) == 1 and len(ys) == 1:
            pairs.append((xs[0], ys[0]))
            continue
        shared = sorted({x.experiment for x in xs} & {y.experiment for y in ys}, key=str)
        for experiment in shared:
            same_x = [x for x in xs if x.experiment == experiment]
            same_y = [y for y in ys if y.experiment == experiment]
            if len(same_x) > 1 or len(same_y) > 1:
                twins = same_x if len(same_x) > 1 else same_y
                raise RobmiaError(
                    f"{twins[0].model_name} and {twins[1].model_name} are both {twins[0].defense} with seed "
                    f"{twins[0].seed} (model {twins[0].model_index}) in experiment {experiment!r}: a paired "
                    "comparison cannot tell which to pair; remove one (robmia-db rm) or compare them apart"
                )
            pairs.append((same_x[0], same_y[0]))
        if not shared:
            names = ", ".join(v.model_name for v in xs + ys)
            raise RobmiaError(
                f"models {names} match on seed {xs[0].seed} (model {xs[0].model_index}) but no two of them share "
                "an experiment: a paired comparison cannot tell which to pair; remove the extra ones "
                "(robmia-db rm) or compare them apart"
            )
    return pairs


def compare_defenses(
    db_path: str | Path,
    a: str,
    b: str,
    attack: str = "confidence",
    kind: str | None = None,
    metric: str = "balanced_accuracy",
    n_resamples: int = DEFAULT_RESAMPLES,
    n_permutations: int = DEFAULT_PERMUTATIONS,
    seed: int = DEFAULT_SEED,
) -> list[dict[str, Any]]:
    """One row per (dataset, arch, width, eps of A, eps of B, kind, perturbation eps) with matched seeds.

    Raises:
        RobmiaError: unknown metric or kind, a defense with no scored models, or no matched seeds.
    """
    if metric not in METRICS:
        raise RobmiaError(f"--metric must be one of {', '.join(METRICS)} (got {metric!r})")
    if kind is not None and kind not in KINDS:
        raise RobmiaError(f"--kind must be one of {', '.join(KINDS)} (got {kind!r})")
    if a == b:
        raise RobmiaError(f"--a and --b are the same defense ({a!r})")
    vectors = load_vectors(db_path, attack, [a, b], kind)
    for defense in (a, b):
        if not any(v.defense == defense for v in vectors):
            scope = f" with {kind} signals" if kind else ""
            raise RobmiaError(f"no models of defense {defense!r}{scope} have {attack!r} scores in {db_path}")
    rows = [
        {"attack": attack, **row}
        for row in paired_rows(vectors, a, b, metric, n_resamples, n_permutations, seed)
    ]
    if not rows:
        raise RobmiaError(
            f"no matched models: {a!r} and {b!r} share no (dataset, arch, width, perturbation kind and eps, seed)"
        )
    for row, adjusted in zip(rows, holm([r["p_value"] for r in rows])):
        row["p_holm"] = adjusted
    return rows


def paired_rows(
    vectors: Sequence[ScoreVector],
    a: str,
    b: str,
    metric: str = "balanced_accuracy",
    n_resamples: int = DEFAULT_RESAMPLES,
    n_permutations: int = DEFAULT_PERMUTATIONS,
    seed: int = DEFAULT_SEED,
) -> list[dict[str, Any]]:
    """Paired A - B rows from loaded vectors (see `compare_defenses`); no Holm correction here."""
    groups: dict[tuple, dict[str, dict[float | None, list[ScoreVector]]]] = {}
    for v in vectors:
        if v.defense not in (a, b):
            continue
        side = "a" if v.defense == a else "b"
        key = (v.dataset, v.arch, _eps_key(v.width), v.kind, _eps_key(v.perturbation_eps))
        groups.setdefault(key, {"a": {}, "b": {}})[side].setdefault(_eps_key(v.eps), []).append(v)
    rows = []
    for (dataset, arch, width, vkind, peps), sides in sorted(groups.items(), key=lambda kv: str(kv[0])):
        for eps_a, a_vectors in sorted(sides["a"].items(), key=lambda kv: (kv[0] is None, kv[0])):
            for eps_b, b_vectors in sorted(sides["b"].items(), key=lambda kv: (kv[0] is None, kv[0])):
                matched = match_models(a_vectors, b_vectors)
                if not matched:
                    continue
                pairs = [make_pair(x, y) for x, y in matched]
                seeds = sorted({x.seed for x, _ in matched}, key=lambda s: (s is None, s))
                result = paired_difference(pairs, metric, n_resamples, n_permutations, seed)
                rows.append(
                    {
                        "dataset": dataset, "arch": arch, "width": width, "a": a, "eps_a": eps_a, "b": b,
                        "eps_b": eps_b, "kind": vkind, "perturbation_eps": peps,
                        "metric": metric, "n_pairs": result.n_pairs, "seeds": seeds,
                        "a_value": result.a_mean, "b_value": result.b_mean, "difference": result.difference,
                        "ci_low": result.ci_low, "ci_high": result.ci_high, "p_value": result.p_value,
                    }
                )  # fmt: skip
    return rows
