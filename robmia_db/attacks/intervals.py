"""Attacks layer: stratified bootstrap intervals of the membership metrics; imports numpy, duckdb, pyarrow.

The resampling protocol is the contract (a plain numpy loop reproduces it exactly, see
`reference_replicates`): one ``numpy.random.default_rng(seed)`` per (attack, model, perturbation); members
and non-members each in ``example_id`` order; replicate ``b`` draws ``rng.integers(0, P, size=P)`` (member
positions) and then ``rng.integers(0, N, size=N)`` (non-member positions), for ``b = 0 .. B-1``. Members and
non-members are resampled separately (a stratified bootstrap), so every replicate keeps the design's P and N
and the balanced accuracy keeps its meaning. Because the draws depend only on the seed, P and N, two models
evaluated on the same examples share their resamples: intervals of the same examples are paired.

The vectorised path turns each replicate's draws into counts per distinct score (a bincount of the drawn
positions' score ranks), then computes every metric from cumulative counts, in the same integer arithmetic
as `metrics.reference_metrics`, so each replicate equals the metrics of the resampled rows exactly; ties
are handled because all rows of one distinct score fall into one count.

Intervals are percentile intervals (numpy's default linear quantile) of the replicates: 95 % by default.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0
DEFAULT_CONFIDENCE = 0.95

# Metrics with an interval; they are the rank-based ones whose resampling distribution the bootstrap fits.
INTERVAL_METRICS: tuple[str, ...] = (
    "balanced_accuracy",
    "auc",
    "tpr_at_fpr_0",
    "tpr_at_fpr_1e3",
    "tpr_at_fpr_1e2",
)
INTERVAL_COLUMNS: tuple[str, ...] = tuple(
    f"{metric}_ci_{side}" for metric in INTERVAL_METRICS for side in ("low", "high")
)
_TPR_LEVELS: tuple[tuple[str, int, int], ...] = (
    ("tpr_at_fpr_0", 0, 1),
    ("tpr_at_fpr_1e3", 1, 1000),
    ("tpr_at_fpr_1e2", 1, 100),
)
# Elements per working array of one chunk of replicates: keeps each chunk in cache-sized memory (~16 MB).
_CHUNK_ELEMENTS = 2_000_000


def _split(scores: Any, is_member: Any) -> tuple[np.ndarray, np.ndarray]:
    score_array = np.asarray(scores, dtype=np.float64).ravel()
    member_array = np.asarray(is_member, dtype=bool).ravel()
    if score_array.shape != member_array.shape:
        raise ValueError(f"scores ({score_array.size}) and is_member ({member_array.size}) differ in length")
    keep = ~np.isnan(score_array)
    return score_array[keep & member_array], score_array[keep & ~member_array]


def draw_positions(rng: np.random.Generator, n_members: int, n_nonmembers: int, count: int) -> Iterator:
    """Yields ``count`` replicates' (member positions, non-member positions), in the protocol's order."""
    for _ in range(count):
        yield rng.integers(0, n_members, size=n_members), rng.integers(0, n_nonmembers, size=n_nonmembers)


class RankedScores:
    """One group's scores as ranks of distinct values, highest score first (rank 0)."""

    def __init__(self, member_scores: np.ndarray, nonmember_scores: np.ndarray):
        self.n_members = member_scores.size
        self.n_nonmembers = nonmember_scores.size
        distinct = np.unique(np.concatenate((member_scores, nonmember_scores)))
        self.n_distinct = distinct.size
        # np.unique sorts ascending; rank 0 must be the highest score (the first threshold of the sweep).
        self.member_rank = (self.n_distinct - 1 - np.searchsorted(distinct, member_scores)).astype(np.int64)
        self.nonmember_rank = (self.n_distinct - 1 - np.searchsorted(distinct, nonmember_scores)).astype(
            np.int64
        )

    def metrics(self, member_positions: np.ndarray, nonmember_positions: np.ndarray) -> dict[str, np.ndarray]:
        """Every interval metric for each row of the position matrices (rows = replicates)."""
        return metrics_from_ranks(
            self.member_rank[member_positions], self.nonmember_rank[nonmember_positions], self.n_distinct
        )


def metrics_from_ranks(
    member_ranks: np.ndarray, nonmember_ranks: np.ndarray, K: int
) -> dict[str, np.ndarray]:
    """Every interval metric per row of (rows, P) member and (rows, N) non-member score ranks.

    Ranks number the distinct scores from the highest (0) to the lowest (K - 1); only their order matters,
    so ranks over any superset of the scores (e.g. two models' scores together) give the same metrics.
    """
    rows, P = member_ranks.shape
    N = nonmember_ranks.shape[1]
    # int32 halves the memory traffic of the O(B x K) passes; products need P * N to fit in it
    small = P * N < 2**31 - 1
    dtype = np.int32 if small else np.int64
    offsets = (np.arange(rows, dtype=np.int64) * K)[:, None]
    pos = np.bincount((member_ranks + offsets).ravel(), minlength=rows * K)
    neg = np.bincount((nonmember_ranks + offsets).ravel(), minlength=rows * K)
    pos = pos.reshape(rows, K).astype(dtype, copy=False)
    neg = neg.reshape(rows, K).astype(dtype, copy=False)
    tp = np.cumsum(pos, axis=1, dtype=dtype)
    fp = np.cumsum(neg, axis=1, dtype=dtype)
    gain = tp * dtype(N) - fp * dtype(P)
    best = np.argmax(gain, axis=1)[:, None]  # first = highest threshold, as reference_metrics
    best_gain = np.take_along_axis(gain, best, axis=1)[:, 0]
    best_tp = np.take_along_axis(tp, best, axis=1)[:, 0].astype(np.int64)
    best_fp = np.take_along_axis(fp, best, axis=1)[:, 0].astype(np.int64)
    beats = best_gain > 0
    # the same float operations as reference_metrics, so replicates match it bit for bit
    balanced = np.where(beats, 0.5 * (best_tp / P + 1.0 - best_fp / N), 0.5)
    # both sums are at most P * N, so they fit in dtype as the products do
    auc2 = 2 * np.einsum("ij,ij->i", pos, dtype(N) - fp).astype(np.int64) + np.einsum(
        "ij,ij->i", pos, neg
    ).astype(np.int64)
    out = {"balanced_accuracy": balanced, "auc": auc2 / (2.0 * P * N)}
    for name, num, den in _TPR_LEVELS:
        if num and N * num < den:  # unresolvable with N non-members: NULL, as in metrics.reference_metrics
            out[name] = np.full(rows, np.nan)
            continue
        out[name] = _tpr_at_fpr(tp, fp, num * N // den) / P
    return out


def _tpr_at_fpr(tp: np.ndarray, fp: np.ndarray, fp_limit: int) -> np.ndarray:
    """Per row, tp at the last column with fp <= fp_limit (0 if none): fp grows along a row, so the
    allowed columns are a prefix, usually short at low FPR; it is found by doubling its length."""
    K = fp.shape[1]
    length = min(K, 64)
    while length < K and np.any(fp[:, length - 1] <= fp_limit):
        length = min(K, 2 * length)
    allowed = np.count_nonzero(fp[:, :length] <= fp_limit, axis=1)
    at = np.take_along_axis(tp[:, :length], np.maximum(allowed - 1, 0)[:, None], axis=1)[:, 0]
    return np.where(allowed > 0, at, 0).astype(np.int64)


def bootstrap_replicates(
    scores: Any, is_member: Any, n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED
) -> dict[str, np.ndarray]:
    """Each interval metric over `n_resamples` stratified bootstrap replicates, vectorised.

    Args:
        scores: Scores, one per row, in ``example_id`` order (NaN rows are excluded, as in the metrics).
        is_member: Booleans, one per row.
        n_resamples: Number of replicates B.
        seed: Seed of the protocol's generator.

    Returns:
        ``{metric: float64 array of length B}`` for `INTERVAL_METRICS`; empty when there are no members or
        no non-members.
    """
    members, nonmembers = _split(scores, is_member)
    if members.size == 0 or nonmembers.size == 0 or n_resamples <= 0:
        return {}
    ranked = RankedScores(members, nonmembers)
    rng = np.random.default_rng(seed)
    width = max(members.size, nonmembers.size, ranked.n_distinct)
    chunk = max(1, min(n_resamples, _CHUNK_ELEMENTS // width))
    parts: dict[str, list[np.ndarray]] = {name: [] for name in INTERVAL_METRICS}
    done = 0
    while done < n_resamples:
        rows = min(chunk, n_resamples - done)
        member_positions = np.empty((rows, members.size), dtype=np.int64)
        nonmember_positions = np.empty((rows, nonmembers.size), dtype=np.int64)
        for i, (m, n) in enumerate(draw_positions(rng, members.size, nonmembers.size, rows)):
            member_positions[i] = m
            nonmember_positions[i] = n
        for name, values in ranked.metrics(member_positions, nonmember_positions).items():
            parts[name].append(values)
        done += rows
    return {name: np.concatenate(values) for name, values in parts.items()}


def reference_replicates(
    scores: Any, is_member: Any, n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED
) -> dict[str, np.ndarray]:
    """The same replicates by a plain bootstrap loop over `metrics.reference_metrics` (slow; for tests)."""
    from robmia_db.attacks.metrics import reference_metrics

    members, nonmembers = _split(scores, is_member)
    rng = np.random.default_rng(seed)
    out: dict[str, list[float]] = {name: [] for name in INTERVAL_METRICS}
    for m, n in draw_positions(rng, members.size, nonmembers.size, n_resamples):
        resampled = np.concatenate((members[m], nonmembers[n]))
        labels = np.r_[np.ones(members.size, bool), np.zeros(nonmembers.size, bool)]
        row = reference_metrics(resampled, labels)
        for name in INTERVAL_METRICS:
            out[name].append(row[name])
    return {name: np.asarray(values, dtype=np.float64) for name, values in out.items()}


def percentile_interval(
    replicates: np.ndarray, confidence: float = DEFAULT_CONFIDENCE
) -> tuple[float, float]:
    """The central `confidence` percentile interval of bootstrap replicates (numpy's linear quantile)."""
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(np.asarray(replicates, dtype=np.float64), [alpha, 1.0 - alpha])
    return float(low), float(high)


def bootstrap_intervals(
    scores: Any,
    is_member: Any,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict[str, float | None]:
    """``{metric}_ci_low`` / ``_ci_high`` for every interval metric of one group (None when undefined)."""
    replicates = bootstrap_replicates(scores, is_member, n_resamples, seed)
    result: dict[str, float | None] = dict.fromkeys(INTERVAL_COLUMNS)
    for name, values in replicates.items():
        if np.all(np.isnan(values)):  # a metric that is NULL itself (an unresolvable FPR level)
            continue
        result[f"{name}_ci_low"], result[f"{name}_ci_high"] = percentile_interval(values, confidence)
    return result


def grouped_intervals(
    table: pa.Table,
    group_by: Sequence[str],
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE,
) -> pa.Table:
    """Intervals per group of an Arrow table ``(*group_by, example_id, score, is_member)``.

    Rows are put in ``example_id`` order inside each group (the protocol's order) whatever their input
    order. Returns ``(*group_by, *INTERVAL_COLUMNS)``, one row per group.
    """
    names = list(group_by)
    if table.num_rows == 0:
        fields = [table.schema.field(n) for n in names] + [
            pa.field(c, pa.float64()) for c in INTERVAL_COLUMNS
        ]
        return pa.schema(fields).empty_table()
    sort_keys = [(n, "ascending") for n in names] + [("example_id", "ascending")]
    table = table.sort_by(sort_keys)
    key_columns = [table.column(n).to_numpy(zero_copy_only=False) for n in names]
    scores = table.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
    members = table.column("is_member").to_numpy(zero_copy_only=False).astype(bool)
    if names:
        change = np.zeros(table.num_rows, dtype=bool)
        change[0] = True
        for column in key_columns:
            change[1:] |= column[1:] != column[:-1]
        starts = np.flatnonzero(change)
    else:
        starts = np.array([0])
    ends = np.r_[starts[1:], table.num_rows]
    out: dict[str, list[Any]] = {n: [] for n in [*names, *INTERVAL_COLUMNS]}
    for start, end in zip(starts.tolist(), ends.tolist()):
        for n, column in zip(names, key_columns):
            out[n].append(column[start].item() if hasattr(column[start], "item") else column[start])
        intervals = bootstrap_intervals(scores[start:end], members[start:end], n_resamples, seed, confidence)
        for column_name in INTERVAL_COLUMNS:
            out[column_name].append(intervals[column_name])
    arrays = {n: pa.array(out[n], type=table.schema.field(n).type) for n in names}
    arrays |= {c: pa.array(out[c], type=pa.float64()) for c in INTERVAL_COLUMNS}
    return pa.table(arrays)


def write_intervals(con, attack_name: str, attack_key: str, n_resamples: int = DEFAULT_RESAMPLES) -> None:
    """The hook `scoring` calls after writing metrics: intervals of the scores in ``_new_scores``.

    Runs inside scoring's transaction, on its connection, with ``_new_scores`` and ``_done`` registered.
    """
    con.execute(
        """DELETE FROM metric_intervals WHERE attack_key IN (SELECT attack_key FROM attacks WHERE name = ?)
           AND (model_key, perturbation) IN (SELECT model_key, perturbation FROM _done)""",
        [attack_name],
    )
    if n_resamples <= 0:
        return
    # one (model, perturbation) at a time: memory holds one model's scores, not the run's
    groups = con.execute("SELECT model_key, perturbation FROM _done ORDER BY ALL").fetchall()
    parts = []
    for model_key, perturbation in groups:
        rows = con.sql(
            """SELECT s.model_key, s.perturbation, s.example_id, s.score, b.is_member FROM _new_scores s
               JOIN membership b ON b.model_key = s.model_key AND b.example_id = s.example_id
               WHERE s.model_key = $model AND s.perturbation = $perturbation AND b.model_key = $model""",
            params={"model": model_key, "perturbation": perturbation},
        ).to_arrow_table()
        parts.append(grouped_intervals(rows, ["model_key", "perturbation"], n_resamples, DEFAULT_SEED))
    if not parts:
        return
    intervals = pa.concat_tables(parts)
    con.register("_new_intervals", intervals)
    columns = ", ".join(f"i.{c}" for c in INTERVAL_COLUMNS)
    con.execute(
        f"""INSERT INTO metric_intervals
            SELECT ?, i.model_key, i.perturbation, d.inputs_key, ?, ?, ?, {columns}
            FROM _new_intervals i JOIN _done d USING (model_key, perturbation)""",
        [attack_key, n_resamples, DEFAULT_SEED, DEFAULT_CONFIDENCE],
    )
    con.unregister("_new_intervals")
