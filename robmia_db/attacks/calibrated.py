"""Attacks layer: the numerics of the reference-model attacks (LiRA, RMIA, privacy risk score, thresholds).

Numpy only, no store access: the built-in attack files (`builtin/lira_*.py`, `rmia_*.py`, ...) read their
relations through the sandbox and call these. Every function works on one target model at a time with
that target's own references, so nothing here can see the target's membership. Conventions and the
reference code each one follows are set out in the README's reference-attack section and in
`shared/docs/reference-attacks.md` (§§3-6); the tests check the test vectors of that document.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from robmia_db.attacks.fleet import ReferenceMatrix
from robmia_db.errors import AttackDefinitionError

LOG_SQRT_2PI = 0.5 * np.log(2.0 * np.pi)
SIGMA_FLOOR = 1e-30  # added to every sigma, as both reference codes do (Carlini's score.py, TF Privacy)
LOCATIONS = ("median", "mean")
VARIANCES = ("per_example", "global")

__all__ = ["ReferenceMatrix", "gaussian_fit", "lira_online", "lira_offline", "rmia_fraction"]


def check_choice(attack: str, name: str, value: object, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise AttackDefinitionError(
            None, f"{attack}: param {name} must be one of {list(allowed)} (got {value!r})"
        )
    return str(value)


def _fill_column_mean(per_example: np.ndarray) -> np.ndarray:
    """TF Privacy's rule for examples without IN (or OUT) references: the mean over the other examples."""
    missing = np.isnan(per_example)
    if missing.any() and not missing.all():
        per_example = per_example.copy()
        per_example[missing] = per_example[~missing].mean()
    return per_example


def _divide(total: np.ndarray, count: np.ndarray) -> np.ndarray:
    """total / count, NaN where count is 0."""
    return np.divide(total, count, out=np.full(np.shape(total), np.nan), where=count > 0)


@dataclass
class Side:
    """The IN (or OUT) entries of a reference matrix: mask[r, n], count per example, and where they start
    in the matrix's per-example order (IN entries come first, then OUT)."""

    mask: np.ndarray
    count: np.ndarray
    start: np.ndarray


def side(refs: ReferenceMatrix, inside: bool) -> Side:
    return Side(*refs.side(inside))


def side_median(refs: ReferenceMatrix, s: Side) -> np.ndarray:
    """Per example the median of the side's values (mean of the two middle ones for an even count), picked
    from the sorted order by index: an element (or two) of the side itself, never a difference of sums."""
    n_refs, n = refs.values.shape
    if n_refs == 0:
        return np.full(n, np.nan)
    columns = np.arange(n)
    low = np.minimum(s.start + np.maximum(s.count - 1, 0) // 2, n_refs - 1)
    high = np.minimum(s.start + s.count // 2, n_refs - 1)
    a = refs.values[refs.order[columns, low], columns]
    b = refs.values[refs.order[columns, high], columns]
    return np.where(s.count > 0, (a + b) * 0.5, np.nan)


def _subtract_on_side(
    refs: ReferenceMatrix, s: Side, minuend: np.ndarray, subtrahend: np.ndarray | float, out=None
) -> np.ndarray:
    """minuend - subtrahend on the side's entries, 0 elsewhere (into `out`, else a new [r, n] array), so that
    the side's sums are plain sums. Where every value is finite this multiplies by the 0/1 mask (about 5x
    faster than a ufunc with `where=` at fleet sizes, and the same numbers: x * 1 is x and x * 0 a zero); a
    NaN or inf outside the side would turn into NaN that way, so such matrices take the masked ufunc."""
    if refs.all_finite:
        # a NaN subtrahend marks an example without entries on this side, whose column is all masked out
        out = np.subtract(minuend, np.nan_to_num(subtrahend, nan=0.0), out=out)
        out *= s.mask.view(np.uint8)
        return out
    return np.subtract(minuend, subtrahend, out=np.zeros(minuend.shape) if out is None else out, where=s.mask)


def side_deviations(refs: ReferenceMatrix, s: Side, centre: np.ndarray | float) -> np.ndarray:
    """A new [r, n] array: values - centre on the side's entries, 0 elsewhere."""
    return _subtract_on_side(refs, s, refs.values, centre)


def side_mean(refs: ReferenceMatrix, s: Side) -> np.ndarray:
    return _divide(side_deviations(refs, s, 0.0).sum(axis=0), s.count)


def fit_side(
    refs: ReferenceMatrix, inside: bool, location: str, variance: str
) -> tuple[np.ndarray, np.ndarray]:
    """Location and scale per example of the IN (or OUT) references, as TF Privacy's `compute_score_lira`:
    median or mean, ddof-0 std per example or one scalar std of the per-example-centred values, empty
    examples filled with the column mean, sigma + 1e-30."""
    s = side(refs, inside)
    mean = side_mean(refs, s) if location == "mean" or variance == "per_example" else None
    loc = side_median(refs, s) if location == "median" else mean
    # centred values of the side, zero elsewhere (in place: these are the largest arrays of an attack)
    centre = loc if variance == "global" else mean
    centred = side_deviations(refs, s, centre)
    if variance == "global":
        total = int(s.count.sum())
        if total:
            _subtract_on_side(refs, s, centred, centred.sum() / total, out=centred)
            std = np.sqrt(np.square(centred, out=centred).sum() / total)
        else:
            std = np.nan
        scale = np.full(refs.values.shape[1], std)
    else:
        scale = np.sqrt(_divide(np.square(centred, out=centred).sum(axis=0), s.count))
    return _fill_column_mean(loc), _fill_column_mean(scale) + SIGMA_FLOOR


def gaussian_fit(values: np.ndarray, location: str, variance: str) -> tuple[np.ndarray, np.ndarray]:
    """`fit_side` over values[m, n] with NaN = not observed."""
    present = ~np.isnan(values)
    refs = ReferenceMatrix(np.arange(values.shape[1]), values, present, present)
    return fit_side(refs, True, location, variance)


def log_normal_pdf(x: np.ndarray, loc: np.ndarray, scale: np.ndarray) -> np.ndarray:
    z = (x - loc) / scale
    return -0.5 * z * z - np.log(scale) - LOG_SQRT_2PI


def lira_online(phi: np.ndarray, refs: ReferenceMatrix, location: str, variance: str) -> np.ndarray:
    """Per-query log-likelihood ratio log N(phi; mu_in, s_in) - log N(phi; mu_out, s_out) (member-high)."""
    mu_in, s_in = fit_side(refs, True, location, variance)
    mu_out, s_out = fit_side(refs, False, location, variance)
    return log_normal_pdf(phi, mu_in, s_in) - log_normal_pdf(phi, mu_out, s_out)


def lira_offline(phi: np.ndarray, refs: ReferenceMatrix, location: str, variance: str) -> np.ndarray:
    """Per-query one-sided z = (phi - mu_out) / s_out, the paper's Lambda = Phi(z) before the monotone Phi
    (kept as z so that scores never saturate at 1.0 and tie)."""
    mu_out, s_out = fit_side(refs, False, location, variance)
    return (phi - mu_out) / s_out


def require_finite(attack: str, model_key: str, scores: np.ndarray, what: str) -> np.ndarray:
    bad = ~np.isfinite(scores)
    if bad.any():
        raise AttackDefinitionError(
            None,
            f"{attack}: {int(bad.sum())} of {len(scores)} scores of model {model_key} are not finite "
            f"({what})",
        )
    return scores


def rmia_pr_x(probs: ReferenceMatrix, mode: str, a: float) -> np.ndarray:
    """Pr(x) from the references' true-label probabilities: online 1/2 P_IN + 1/2 P_OUT; offline
    ((1 + a)/2) P_OUT + (1 - a)/2. Means (equal to the paper code's 20% trimmed mean for up to 4 values);
    empty IN / OUT sides take the column mean, as in LiRA."""
    p_out = _fill_column_mean(side_mean(probs, side(probs, False)))
    if mode == "online":
        p_in = _fill_column_mean(side_mean(probs, side(probs, True)))
        return 0.5 * p_in + 0.5 * p_out
    return 0.5 * (1.0 + a) * p_out + 0.5 * (1.0 - a)


def rmia_fraction(ratio_x: np.ndarray, ratio_z: np.ndarray, gamma: float, exclude_self: bool) -> np.ndarray:
    """Score(x) = Pr_z[r(x)/r(z) >= gamma] with r > 0, as the share of z with r(z) <= r(x)/gamma, by one sort
    of r(z) and a binary search per x (no |X| x |Z| join). With `exclude_self` Z is X itself minus x."""
    sorted_z = np.sort(ratio_z)
    bound = ratio_x / gamma
    count = np.searchsorted(sorted_z, bound, side="right").astype(np.float64)
    if exclude_self:
        count -= ratio_x <= bound
        return count / (len(ratio_z) - 1)
    return count / len(ratio_z)


def threshold_setting(train: np.ndarray, test: np.ndarray) -> float:
    """Song & Mittal's `_thre_setting`: among the candidates (train values, then test values) the first
    strict maximum of 1/2 (frac(train >= v) + frac(test < v)), starting from tau = 0, acc = 0; a class
    without train or without test values keeps tau = 0."""
    train = np.asarray(train, dtype=np.float64)
    test = np.asarray(test, dtype=np.float64)
    if len(train) == 0 or len(test) == 0:
        return 0.0
    candidates = np.concatenate([train, test])
    sorted_train, sorted_test = np.sort(train), np.sort(test)
    # same float expression as theirs: count / (len + 0.0), then 0.5 * (a + b)
    train_ratio = (len(train) - np.searchsorted(sorted_train, candidates, side="left")) / (len(train) + 0.0)
    test_ratio = np.searchsorted(sorted_test, candidates, side="left") / (len(test) + 0.0)
    accuracy = 0.5 * (train_ratio + test_ratio)
    best = int(np.argmax(accuracy))
    return float(candidates[best]) if accuracy[best] > 0.0 else 0.0


@dataclass
class RiskHistogram:
    edges: np.ndarray | None  # None: all reference values equal (or none), the posterior is the prior 1/2
    member: np.ndarray
    nonmember: np.ndarray


def risk_histogram(train: np.ndarray, test: np.ndarray, num_bins: int, log_bins: bool) -> RiskHistogram:
    """Song & Mittal's per-class histograms: `num_bins` bins between the pooled min and max (log-spaced with
    values floored to 1e-10), each histogram normalised to sum to 1."""
    train = np.asarray(train, dtype=np.float64)
    test = np.asarray(test, dtype=np.float64)
    if log_bins:
        train, test = np.maximum(train, 1e-10), np.maximum(test, 1e-10)
    pooled = np.concatenate([train, test])
    if len(train) == 0 or len(test) == 0 or pooled.min() == pooled.max():
        return RiskHistogram(None, np.zeros(num_bins), np.zeros(num_bins))
    low, high = pooled.min(), pooled.max()
    if log_bins:
        edges = np.logspace(np.log10(low), np.log10(high), num_bins + 1)
    else:
        edges = np.linspace(low, high, num_bins + 1)
    member = np.histogram(train, bins=edges)[0] / len(train)
    nonmember = np.histogram(test, bins=edges)[0] / len(test)
    return RiskHistogram(edges, member, nonmember)


def risk_posterior(values: np.ndarray, histogram: RiskHistogram) -> np.ndarray:
    """P(member | value) = h_member[b] / (h_member[b] + h_nonmember[b]) of the value's bin b: values at or
    above the last edge go to the last bin, at or below the first to bin 0; an empty bin takes the nearest
    non-empty one, the lower neighbour first at equal distance."""
    values = np.asarray(values, dtype=np.float64)
    if histogram.edges is None:
        return np.full(len(values), 0.5)
    n_bins = len(histogram.member)
    total = histogram.member + histogram.nonmember
    posterior = np.where(total > 0, histogram.member / np.where(total > 0, total, 1.0), np.nan)
    filled = posterior.copy()
    for b in np.flatnonzero(total == 0):
        for distance in range(1, n_bins):
            candidates = [b - distance, b + distance]
            found = [c for c in candidates if 0 <= c < n_bins and total[c] > 0]
            if found:
                filled[b] = posterior[found[0]]
                break
    bins = np.clip(np.searchsorted(histogram.edges, values, side="right") - 1, 0, n_bins - 1)
    return filled[bins]


def result_table(pieces: list[tuple[str, np.ndarray, np.ndarray]]):
    import pyarrow as pa

    keys = [pa.repeat(pa.scalar(key, pa.string()), len(ids)) for key, ids, _ in pieces]
    return pa.table(
        {
            "model_key": pa.concat_arrays(keys) if keys else pa.array([], pa.string()),
            "example_id": pa.array(np.concatenate([p[1] for p in pieces]) if pieces else [], pa.int32()),
            "score": pa.array(np.concatenate([p[2] for p in pieces]) if pieces else [], pa.float64()),
        }
    )


# --- the attacks' score() bodies, shared by the built-in files ---------------------------------------------


def lira_attack(ctx, params: dict, attack: str, mode: str, kinds: tuple[str, ...] | None):
    """LiRA on one perturbation (`kinds` None: the `target` relation) or jointly on several kinds, each kind
    its own Gaussian: online sums the per-query LLRs, offline averages the per-query one-sided z-scores."""
    location = check_choice(attack, "location", params["location"], LOCATIONS)
    variance = check_choice(attack, "variance", params["variance"], VARIANCES)
    statistic = lira_online if mode == "online" else lira_offline
    queries = kinds or (None,)
    totals: dict[str, np.ndarray] = {}
    ids: dict[str, np.ndarray] = {}
    for kind in queries:
        for key, target in ctx.targets("phi", kind).items():
            if key in ids and not np.array_equal(ids[key], target["example_id"]):
                raise AttackDefinitionError(None, f"{attack}: model {key} has different examples per kind")
            ids[key] = target["example_id"]
            refs = ctx.references(key, "phi", kind, target["example_id"])
            value = statistic(target["value"], refs, location, variance)
            totals[key] = value if key not in totals else totals[key] + value
    pieces = []
    for key, total in totals.items():
        if mode == "offline":
            total = total / len(queries)
        pieces.append(
            (key, ids[key], require_finite(attack, key, total, "no reference model saw any example"))
        )
    return result_table(pieces)


def rmia_attack(ctx, params: dict, attack: str, mode: str):
    """RMIA on one perturbation. Pr(x|theta) = p_y = exp(-loss) in float64 (never saturated); the population
    Z of target T is T's own examples other than x: label-free, so T's membership is never used."""
    gamma = float(params["gamma"])
    a = float(params.get("a", 1.0))
    if not gamma > 0:
        raise AttackDefinitionError(None, f"{attack}: param gamma must be > 0 (got {gamma})")
    if not 0.0 <= a <= 1.0:
        raise AttackDefinitionError(None, f"{attack}: param a must be in [0, 1] (got {a})")
    pieces = []
    for key, target in ctx.targets("p_true").items():
        if len(target["example_id"]) < 2:
            raise AttackDefinitionError(
                None, f"{attack}: model {key} has fewer than 2 examples (no population)"
            )
        refs = ctx.references(key, "p_true", None, target["example_id"])
        pr_x = np.maximum(rmia_pr_x(refs, mode, a), np.finfo(np.float64).tiny)
        ratio = require_finite(attack, key, target["value"] / pr_x, "no reference model saw any example")
        pieces.append((key, target["example_id"], rmia_fraction(ratio, ratio, gamma, exclude_self=True)))
    return result_table(pieces)


# each signal oriented so that higher means "more likely a member" (Song & Mittal's features: conf, -H, -Mentr)
THRESHOLD_FEATURES = {
    "confidence": ("confidence", 1.0),
    "entropy": ("entropy", -1.0),
    "mentropy": ("mentropy", -1.0),
    "loss": ("loss", -1.0),
    "margin": ("margin", 1.0),
}
# the privacy risk score bins the raw (positive) value, low = member
RISK_FEATURES = {"mentropy": ("mentropy", 1.0), "entropy": ("entropy", 1.0), "loss": ("loss", 1.0)}


def _per_class(ctx, feature: tuple[str, float]):
    """Per target: its rows, and per class of its examples the references' member and non-member values
    (over every example the references have)."""
    column, sign = feature
    for key, target in ctx.targets(column).items():
        target = {**target, "value": sign * target["value"]}
        refs = ctx.references(key, column).long()
        refs["value"] = sign * refs["value"]
        members = refs["is_member"].astype(bool)
        classes = []
        for label in np.unique(target["label"]):
            same = refs["label"] == label
            classes.append(
                (target["label"] == label, refs["value"][same & members], refs["value"][same & ~members])
            )
        yield key, target, classes


def class_thresholds_attack(ctx, params: dict, attack: str):
    signal = check_choice(attack, "signal", params["signal"], tuple(THRESHOLD_FEATURES))
    pieces = []
    for key, target, classes in _per_class(ctx, THRESHOLD_FEATURES[signal]):
        score = target["value"].copy()
        for rows, train, test in classes:
            score[rows] -= threshold_setting(train, test)
        pieces.append((key, target["example_id"], score))
    return result_table(pieces)


def risk_score_attack(ctx, params: dict, attack: str):
    signal = check_choice(attack, "signal", params["signal"], tuple(RISK_FEATURES))
    num_bins = int(params["num_bins"])
    if num_bins < 1:
        raise AttackDefinitionError(None, f"{attack}: param num_bins must be >= 1 (got {num_bins})")
    pieces = []
    for key, target, classes in _per_class(ctx, RISK_FEATURES[signal]):
        score = np.full(len(target["value"]), np.nan)
        for rows, train, test in classes:
            histogram = risk_histogram(train, test, num_bins, bool(params["log_bins"]))
            score[rows] = risk_posterior(target["value"][rows], histogram)
        pieces.append((key, target["example_id"], score))
    return result_table(pieces)
