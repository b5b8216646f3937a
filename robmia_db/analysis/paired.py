"""Analysis layer: paired statistics on membership metrics; imports numpy and the attacks layer only.

A *pair* is two score vectors over the same examples with the same membership (e.g. a PGD-AT and a natural
model of one seed, or one model's adversarial and benign scores). The effect is the mean over pairs of
``metric(a) - metric(b)``. Its interval is a paired bootstrap: within a pair both sides are evaluated on the
same stratified resample of examples (the protocol of `robmia_db.attacks.intervals`), and, when there are
several pairs (seeds), the pairs are resampled too (a two-level bootstrap over seeds and examples). The
p-value is a paired permutation test (Bandos et al. 2005 for paired ROC data): under the null hypothesis the
two scores of each example are exchangeable, so each example's two scores are swapped at random, within
each pair; two-sided, with scipy's conventions (twice the smaller tail, +1 in numerator and denominator when
sampled, exact enumeration when all swaps fit in the budget).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from robmia_db.attacks.intervals import (
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    RankedScores,
    draw_positions,
    metrics_from_ranks,
    percentile_interval,
)
from robmia_db.attacks.metrics import reference_metrics

METRICS = ("balanced_accuracy", "auc", "tpr_at_fpr_0", "tpr_at_fpr_1e3", "tpr_at_fpr_1e2")
DEFAULT_PERMUTATIONS = 1000


@dataclass(frozen=True)
class Pair:
    """Two score vectors over the same examples (same order), with their membership."""

    a: np.ndarray
    b: np.ndarray
    is_member: np.ndarray

    def __post_init__(self) -> None:
        if not (self.a.shape == self.b.shape == self.is_member.shape):
            raise ValueError("a pair's scores and membership must have the same length")


def metric_of(scores: np.ndarray, is_member: np.ndarray, metric: str) -> float:
    value = reference_metrics(scores, is_member)[metric]
    return float("nan") if value is None else float(value)


def shared_replicates(
    score_vectors: Sequence[np.ndarray], is_member: np.ndarray, metric: str, n_resamples: int, seed
) -> np.ndarray:
    """(len(score_vectors), B) replicates of `metric`, every vector on the same resampled examples.

    The draws follow the intervals protocol (members, then non-members, per replicate, in example order),
    so a single vector's replicates equal `bootstrap_replicates` with the same seed.
    """
    members = np.asarray(is_member, dtype=bool)
    kept = [np.asarray(s, dtype=np.float64) for s in score_vectors]
    if any(np.isnan(s).any() for s in kept):
        raise ValueError("scores contain NaN; paired statistics need a score for every example")
    ranked = [RankedScores(s[members], s[~members]) for s in kept]
    P, N = int(members.sum()), int((~members).sum())
    rng = np.random.default_rng(seed)
    out = np.empty((len(kept), n_resamples))
    done = 0
    chunk = max(1, min(n_resamples, 2_000_000 // max(P + N, 1)))
    while done < n_resamples:
        rows = min(chunk, n_resamples - done)
        mp = np.empty((rows, P), dtype=np.int64)
        npos = np.empty((rows, N), dtype=np.int64)
        for i, (m, n) in enumerate(draw_positions(rng, P, N, rows)):
            mp[i], npos[i] = m, n
        for k, r in enumerate(ranked):
            out[k, done : done + rows] = r.metrics(mp, npos)[metric]
        done += rows
    return out


def permutation_pvalue(
    pairs: Sequence[Pair], metric: str, n_permutations: int = DEFAULT_PERMUTATIONS, seed=DEFAULT_SEED
) -> tuple[float, int, bool]:
    """Two-sided paired permutation p-value of mean over pairs of metric(a) - metric(b).

    Returns (p-value, number of permutations used, exact). Exact enumeration of every swap pattern when
    ``2 ** total examples <= n_permutations`` (as scipy's `permutation_test` does), else a random sample.
    """
    observed = float(
        np.mean([metric_of(p.a, p.is_member, metric) - metric_of(p.b, p.is_member, metric) for p in pairs])
    )
    sizes = [p.a.size for p in pairs]
    total = sum(sizes)
    exact = total < 63 and 2**total <= n_permutations
    if exact:
        patterns = (np.array(bits, dtype=bool) for bits in itertools.product((False, True), repeat=total))
        count = 2**total
    else:
        rng = np.random.default_rng(seed)
        patterns = (rng.random(total) < 0.5 for _ in range(n_permutations))
        count = n_permutations
    # Ranks over the union of a pair's two score vectors order any mix of them exactly, so each swap
    # pattern's metrics come from rank matrices without re-sorting (metrics_from_ranks).
    ranked = []
    for p in pairs:
        distinct = np.unique(np.concatenate((p.a, p.b)))
        K = distinct.size
        ra = K - 1 - np.searchsorted(distinct, p.a)
        rb = K - 1 - np.searchsorted(distinct, p.b)
        ranked.append((ra, rb, p.is_member, K))
    bounds = np.cumsum([0, *sizes])
    null = np.zeros(count)
    done = 0
    chunk = max(1, 1_000_000 // max(total, 1))
    while done < count:
        block = np.array(list(itertools.islice(patterns, chunk)), dtype=bool).reshape(-1, total)
        for (ra, rb, members, K), lo, hi in zip(ranked, bounds[:-1], bounds[1:]):
            w = block[:, lo:hi]
            x = np.where(w, rb, ra)
            y = np.where(w, ra, rb)
            mx = metrics_from_ranks(x[:, members], x[:, ~members], K)[metric]
            my = metrics_from_ranks(y[:, members], y[:, ~members], K)[metric]
            null[done : done + block.shape[0]] += (mx - my) / len(pairs)
        done += block.shape[0]
    # scipy's relative tolerance for null values equal to the observed one up to rounding
    gamma = abs(np.finfo(np.float64).eps * 100 * observed)
    adjustment = 0 if exact else 1
    less = (np.count_nonzero(null <= observed + gamma) + adjustment) / (count + adjustment)
    greater = (np.count_nonzero(null >= observed - gamma) + adjustment) / (count + adjustment)
    return float(min(1.0, 2 * min(less, greater))), count, exact


@dataclass
class PairedResult:
    metric: str
    n_pairs: int
    a_mean: float
    b_mean: float
    difference: float
    ci_low: float
    ci_high: float
    p_value: float
    n_permutations: int
    exact: bool
    replicates: np.ndarray


def paired_difference(
    pairs: Sequence[Pair],
    metric: str = "balanced_accuracy",
    n_resamples: int = DEFAULT_RESAMPLES,
    n_permutations: int = DEFAULT_PERMUTATIONS,
    seed: int = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE,
) -> PairedResult:
    """Effect, paired bootstrap interval and paired permutation p-value of metric(a) - metric(b).

    Pair ``k`` draws its examples from ``default_rng([seed, k])``; the pairs themselves are resampled from
    ``default_rng([seed, len(pairs)])`` when there is more than one.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)} (got {metric!r})")
    if not pairs:
        raise ValueError("no pairs to compare")
    a_points = [metric_of(p.a, p.is_member, metric) for p in pairs]
    b_points = [metric_of(p.b, p.is_member, metric) for p in pairs]
    per_pair = np.empty((len(pairs), n_resamples))
    for k, pair in enumerate(pairs):
        reps = shared_replicates([pair.a, pair.b], pair.is_member, metric, n_resamples, [seed, k])
        per_pair[k] = reps[0] - reps[1]
    if len(pairs) > 1:
        rng = np.random.default_rng([seed, len(pairs)])
        chosen = rng.integers(0, len(pairs), size=(n_resamples, len(pairs)))
        replicates = per_pair[chosen, np.arange(n_resamples)[:, None]].mean(axis=1)
    else:
        replicates = per_pair[0]
    low, high = percentile_interval(replicates, confidence)
    p_value, count, exact = permutation_pvalue(pairs, metric, n_permutations, seed)
    return PairedResult(
        metric=metric,
        n_pairs=len(pairs),
        a_mean=float(np.mean(a_points)),
        b_mean=float(np.mean(b_points)),
        difference=float(np.mean(a_points) - np.mean(b_points)),
        ci_low=low,
        ci_high=high,
        p_value=p_value,
        n_permutations=count,
        exact=exact,
        replicates=replicates,
    )


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the input order."""
    p = np.asarray(p_values, dtype=np.float64)
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out.tolist()
