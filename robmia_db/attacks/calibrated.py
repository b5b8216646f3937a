"""Attacks layer: the numerics of the reference-model attacks (LiRA, RMIA, privacy risk score, thresholds).

Numpy only, no store access: the built-in attack files (`builtin/lira_*.py`, `rmia_*.py`, ...) read their
relations through the sandbox and call these. Every function works on one target model at a time with
that target's own references, so nothing here can see the target's membership. Conventions and the
reference code each one follows are set out in the README's reference-attack section and in
`shared/docs/reference-attacks.md` (§§3-6); the tests check the test vectors of that document.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from robmia_db.errors import AttackDefinitionError
from robmia_db.store.signals import confidence_logit_from_probs

LOG_SQRT_2PI = 0.5 * np.log(2.0 * np.pi)
SIGMA_FLOOR = 1e-30  # added to every sigma, as both reference codes do (Carlini's score.py, TF Privacy)
LOCATIONS = ("median", "mean")
VARIANCES = ("per_example", "global")

# phi, with the documented fallback for stores recorded before `confidence_logit` existed
PHI_COLUMNS = "confidence_logit AS phi, CASE WHEN confidence_logit IS NULL THEN probs END AS fallback_probs"


def check_choice(attack: str, name: str, value: object, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise AttackDefinitionError(
            None, f"{attack}: param {name} must be one of {list(allowed)} (got {value!r})"
        )
    return str(value)


@dataclass
class ReferenceMatrix:
    """One target's reference values for its examples: values[m, n] (NaN where a reference lacks x)."""

    example_id: np.ndarray  # the target's examples, sorted
    values: np.ndarray
    is_member: np.ndarray  # [m, n] bool, False where missing
    present: np.ndarray  # [m, n] bool

    @property
    def inside(self) -> np.ndarray:
        return np.where(self.present & self.is_member, self.values, np.nan)

    @property
    def outside(self) -> np.ndarray:
        return np.where(self.present & ~self.is_member, self.values, np.nan)


def _fill_column_mean(per_example: np.ndarray) -> np.ndarray:
    """TF Privacy's rule for examples without IN (or OUT) references: the mean over the other examples."""
    missing = np.isnan(per_example)
    if missing.any() and not missing.all():
        per_example = per_example.copy()
        per_example[missing] = per_example[~missing].mean()
    return per_example


def gaussian_fit(values: np.ndarray, location: str, variance: str) -> tuple[np.ndarray, np.ndarray]:
    """Location and scale per example from values[m, n] (NaN = not observed), as TF Privacy's
    `compute_score_lira`: nanmedian or nanmean, ddof-0 std per example or one scalar std of the
    per-example-centred deviations, empty examples filled with the column mean, sigma + 1e-30."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns are filled below
        loc = np.nanmedian(values, axis=0) if location == "median" else np.nanmean(values, axis=0)
        if variance == "global":
            deviations = values - loc[None, :]
            scale = np.full(
                values.shape[1], np.nanstd(deviations) if np.isfinite(deviations).any() else np.nan
            )
        else:
            scale = np.nanstd(values, axis=0)
    return _fill_column_mean(loc), _fill_column_mean(scale) + SIGMA_FLOOR


def log_normal_pdf(x: np.ndarray, loc: np.ndarray, scale: np.ndarray) -> np.ndarray:
    z = (x - loc) / scale
    return -0.5 * z * z - np.log(scale) - LOG_SQRT_2PI


def lira_online(phi: np.ndarray, refs: ReferenceMatrix, location: str, variance: str) -> np.ndarray:
    """Per-query log-likelihood ratio log N(phi; mu_in, s_in) - log N(phi; mu_out, s_out) (member-high)."""
    mu_in, s_in = gaussian_fit(refs.inside, location, variance)
    mu_out, s_out = gaussian_fit(refs.outside, location, variance)
    return log_normal_pdf(phi, mu_in, s_in) - log_normal_pdf(phi, mu_out, s_out)


def lira_offline(phi: np.ndarray, refs: ReferenceMatrix, location: str, variance: str) -> np.ndarray:
    """Per-query one-sided z = (phi - mu_out) / s_out, the paper's Lambda = Phi(z) before the monotone Phi
    (kept as z so that scores never saturate at 1.0 and tie)."""
    mu_out, s_out = gaussian_fit(refs.outside, location, variance)
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        p_out = _fill_column_mean(np.nanmean(probs.outside, axis=0))
        if mode == "online":
            p_in = _fill_column_mean(np.nanmean(probs.inside, axis=0))
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


# --- reading the relations once and splitting them per target --------------------------------------------


def _group(column) -> dict[str, np.ndarray]:
    """Row indices per distinct string value, without turning the strings into Python objects."""
    import pyarrow.compute as pc

    encoded = pc.dictionary_encode(column.combine_chunks() if hasattr(column, "combine_chunks") else column)
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(encoded.dictionary) + 1))
    return {
        str(value): order[bounds[i] : bounds[i + 1]] for i, value in enumerate(encoded.dictionary.to_pylist())
    }


def _columns(table, names: list[str]) -> dict[str, np.ndarray]:
    out = {name: table.column(name).to_numpy(zero_copy_only=False) for name in names}
    if "phi" in table.column_names:
        phi = table.column("phi").to_numpy(zero_copy_only=False).astype(np.float64)
        missing = np.isnan(phi)
        if missing.any():
            probs = table.column("fallback_probs").filter(missing).to_pylist()
            labels = table.column("label").to_numpy(zero_copy_only=False)[missing]
            phi[missing] = confidence_logit_from_probs(np.asarray(probs, dtype=np.float32), labels)
        out["value"] = phi
    else:
        out["value"] = table.column("value").to_numpy(zero_copy_only=False).astype(np.float64)
    return out


def phi_sql(ctx, relation: str, kind: str | None = None) -> str:
    """phi's columns for one relation: the stored float64 column, plus the float32 probabilities only where
    some rows predate it (reading the list column costs more than the whole attack otherwise)."""
    where = "AND kind = $kind" if kind else ""
    missing = (
        ctx.sql(
            f"SELECT count(*) AS n FROM {relation} WHERE confidence_logit IS NULL {where}",
            {"kind": kind} if kind else None,
        )
        .column("n")[0]
        .as_py()
    )
    return PHI_COLUMNS if missing else "confidence_logit AS phi"


def read_targets(ctx, value_sql: str, relation: str = "target") -> dict[str, dict[str, np.ndarray]]:
    """Per target model: (example_id, label, value) sorted by example id; no membership (the relation has
    none)."""
    table = ctx.sql(f"SELECT model_key, example_id, label, {value_sql} FROM {relation}")
    columns = _columns(table, ["example_id", "label"])
    out = {}
    for key, rows in sorted(_group(table.column("model_key")).items()):
        rows = rows[np.argsort(columns["example_id"][rows], kind="stable")]
        out[key] = {name: values[rows] for name, values in columns.items()}
    return out


@dataclass
class FleetReferences:
    """Every reference model's rows of one relation as [model, example] matrices (each reference model's
    rows are identical whichever target it serves), plus, per target T, the models listed as T's
    references (`target_model_key = T`). A target only ever reads the rows of its own references, so its
    own membership is never used for it."""

    model_keys: list[str]  # sorted
    example_id: np.ndarray  # sorted union over the references
    values: np.ndarray  # [M, N] float64, NaN where absent
    is_member: np.ndarray  # [M, N] bool
    present: np.ndarray  # [M, N] bool
    label: np.ndarray  # [M, N] int, -1 where absent
    targets: dict[str, np.ndarray]  # target key -> row indices of its reference models, sorted by key

    def rows_of(self, key: str) -> np.ndarray:
        return self.targets.get(key, np.zeros(0, dtype=np.int64))

    def long(self, key: str) -> dict[str, np.ndarray]:
        """T's reference rows in (model key, example id) order: Song & Mittal's threshold rule keeps the
        first of tied candidates."""
        rows = self.rows_of(key)
        present = self.present[rows]
        return {
            "value": self.values[rows][present],
            "is_member": self.is_member[rows][present],
            "label": self.label[rows][present],
        }


def read_references(ctx, value_sql: str, kind: str | None = None) -> FleetReferences:
    """The `reference` relation (optionally one kind), deduplicated to one row per (model, example)."""
    where = "WHERE kind = $kind" if kind else ""
    params = {"kind": kind} if kind else None
    table = ctx.sql(
        f"SELECT DISTINCT model_key, example_id, label, is_member, {value_sql} FROM reference {where}", params
    )
    pairs = ctx.sql(f"SELECT DISTINCT target_model_key, model_key FROM reference {where}", params)
    columns = _columns(table, ["example_id", "label", "is_member"])
    models = _group(table.column("model_key"))
    names = sorted(models)
    row = np.empty(table.num_rows, dtype=np.int64)
    for rank, name in enumerate(names):
        row[models[name]] = rank
    example_id, col = np.unique(columns["example_id"], return_inverse=True)
    shape = (len(names), len(example_id))
    present = np.zeros(shape, bool)
    present[row, col] = True
    if present.sum() != table.num_rows:
        raise AttackDefinitionError(
            None, "the reference relation has differing rows for one (model, example)"
        )
    values = np.full(shape, np.nan)
    values[row, col] = columns["value"]
    members = np.zeros(shape, bool)
    members[row, col] = columns["is_member"].astype(bool)
    labels = np.full(shape, -1, dtype=np.int64)
    labels[row, col] = columns["label"]
    rank = {name: i for i, name in enumerate(names)}
    pair_models = pairs.column("model_key").to_pylist()
    targets = {
        key: np.sort(np.array([rank[pair_models[i]] for i in rows], dtype=np.int64))
        for key, rows in _group(pairs.column("target_model_key")).items()
    }
    return FleetReferences(names, example_id, values, members, present, labels, targets)


def matrix_for(target: dict[str, np.ndarray], fleet: FleetReferences, key: str) -> ReferenceMatrix:
    """T's reference matrix over T's own (sorted) examples."""
    rows = fleet.rows_of(key)
    ids = target["example_id"]
    col = np.minimum(np.searchsorted(fleet.example_id, ids), max(len(fleet.example_id) - 1, 0))
    known = (fleet.example_id[col] == ids) if len(fleet.example_id) else np.zeros(len(ids), bool)
    present = fleet.present[rows][:, col] & known[None, :]
    return ReferenceMatrix(
        ids,
        np.where(present, fleet.values[rows][:, col], np.nan),
        fleet.is_member[rows][:, col] & present,
        present,
    )


def result_table(pieces: list[tuple[str, np.ndarray, np.ndarray]]):
    import pyarrow as pa

    keys = [np.full(len(ids), key, dtype=object) for key, ids, _ in pieces]
    return pa.table(
        {
            "model_key": pa.array(np.concatenate(keys) if keys else [], pa.string()),
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
        targets = read_targets(ctx, phi_sql(ctx, kind or "target"), relation=kind or "target")
        references = read_references(ctx, phi_sql(ctx, "reference", kind), kind=kind)
        for key, target in targets.items():
            if key in ids and not np.array_equal(ids[key], target["example_id"]):
                raise AttackDefinitionError(None, f"{attack}: model {key} has different examples per kind")
            ids[key] = target["example_id"]
            value = statistic(target["value"], matrix_for(target, references, key), location, variance)
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
    value = "exp(-loss) AS value"
    references = read_references(ctx, value)
    pieces = []
    for key, target in read_targets(ctx, value).items():
        if len(target["example_id"]) < 2:
            raise AttackDefinitionError(
                None, f"{attack}: model {key} has fewer than 2 examples (no population)"
            )
        refs = matrix_for(target, references, key)
        pr_x = np.maximum(rmia_pr_x(refs, mode, a), np.finfo(np.float64).tiny)
        ratio = require_finite(attack, key, target["value"] / pr_x, "no reference model saw any example")
        pieces.append((key, target["example_id"], rmia_fraction(ratio, ratio, gamma, exclude_self=True)))
    return result_table(pieces)


# each signal oriented so that higher means "more likely a member" (Song & Mittal's features: conf, -H, -Mentr)
THRESHOLD_FEATURES = {
    "confidence": "CAST(confidence AS DOUBLE)",
    "entropy": "-entropy",
    "mentropy": "-mentropy",
    "loss": "-loss",
    "margin": "margin",
}
# the privacy risk score bins the raw (positive) value, low = member
RISK_FEATURES = {"mentropy": "mentropy", "entropy": "entropy", "loss": "loss"}


def _per_class(ctx, value_sql: str):
    """Per target: its rows, and per class of its examples the references' member and non-member values."""
    references = read_references(ctx, f"{value_sql} AS value")
    for key, target in read_targets(ctx, f"{value_sql} AS value").items():
        refs = references.long(key)
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
