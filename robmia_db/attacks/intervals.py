"""Attacks layer: stratified bootstrap intervals of the membership metrics; imports numpy, duckdb, pyarrow
(and scipy's sparse matrices, when intervals are computed).

The resampling protocol is the contract (a plain numpy loop reproduces it exactly, see
`reference_replicates`): one ``numpy.random.default_rng(seed)`` per (attack, model, perturbation); members
and non-members each in ``example_id`` order; replicate ``b`` draws ``rng.integers(0, P, size=P)`` (member
positions) and then ``rng.integers(0, N, size=N)`` (non-member positions), for ``b = 0 .. B-1``. Members and
non-members are resampled separately (a stratified bootstrap), so every replicate keeps the design's P and N
and the balanced accuracy keeps its meaning. Because the draws depend only on the seed, P and N, two models
evaluated on the same examples share their resamples: intervals of the same examples are paired.

The vectorised path draws each chunk of replicates once for all the groups of one (P, N) (the models of one
spec), counts how often each example is drawn, and sums those counts into each group's *member columns*
(`ScoreBins`: runs of member-only distinct scores, and scores tied across the classes; the only thresholds
a metric can be decided at) with one sparse product. Every metric then comes from cumulative counts, in the
same integer arithmetic as `metrics.reference_metrics`, so each replicate equals the metrics of the
resampled rows exactly; ties are exact because all rows of one distinct score fall into one column.

Intervals are percentile intervals (numpy's default linear quantile) of the replicates: 95 % by default.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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
# Elements per working array of one chunk of replicates: keeps each in cache-sized memory (~4 MB as int32).
_CHUNK_ELEMENTS = 1_000_000
# Examples over the groups of one batch that share draws: bounds the sparse matrices held at once (~10 B each).
_BATCH_EXAMPLES = 4_000_000


def _split(scores: Any, is_member: Any) -> tuple[np.ndarray, np.ndarray]:
    score_array = np.asarray(scores, dtype=np.float64).ravel()
    member_array = np.asarray(is_member, dtype=bool).ravel()
    if score_array.shape != member_array.shape:
        raise ValueError(f"scores ({score_array.size}) and is_member ({member_array.size}) differ in length")
    keep = ~np.isnan(score_array)
    return score_array[keep & member_array], score_array[keep & ~member_array]


def draw_positions(rng: np.random.Generator, n_members: int, n_nonmembers: int, count: int) -> Iterator:
    """Yields ``count`` replicates' (member positions, non-member positions), in the protocol's order.

    The positions are 32-bit where they fit: numpy draws a bounded integer below 2**32 from one 32-bit word
    whatever the output type, so they equal the protocol's int64 draws (a test checks this) at half the
    memory traffic."""
    dtype = np.uint32 if max(n_members, n_nonmembers) < 2**32 else np.int64
    for _ in range(count):
        yield (
            rng.integers(0, n_members, size=n_members, dtype=dtype),
            rng.integers(0, n_nonmembers, size=n_nonmembers, dtype=dtype),
        )


def _draw_block(rng: np.random.Generator, P: int, N: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, P) member and (rows, N) non-member positions of the next `rows` replicates."""
    if P == N and P < 2**32:
        # with one bound, one call of (rows, 2, P) draws exactly the protocol's 2 x rows calls (each value
        # comes from the next 32-bit word, accepted or not by the bound alone), without their per-call cost
        draws = rng.integers(0, P, size=(rows, 2, P), dtype=np.uint32)
        return draws[:, 0], draws[:, 1]
    dtype = np.uint32 if max(P, N) < 2**32 else np.int64
    members, nonmembers = np.empty((rows, P), dtype=dtype), np.empty((rows, N), dtype=dtype)
    for i, (m, n) in enumerate(draw_positions(rng, P, N, rows)):
        members[i], nonmembers[i] = m, n
    return members, nonmembers


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
    dtype = np.int32 if P * N < 2**31 - 1 else np.int64
    offsets = (np.arange(rows, dtype=np.int64) * K)[:, None]
    pos = np.bincount((member_ranks + offsets).ravel(), minlength=rows * K)
    neg = np.bincount((nonmember_ranks + offsets).ravel(), minlength=rows * K)
    pos = pos.reshape(rows, K).astype(dtype, copy=False)
    neg = neg.reshape(rows, K).astype(dtype, copy=False)
    return metrics_from_counts(pos, neg, np.einsum("ij,ij->i", pos, neg), P, N)


def _tp_at_fp_limits(tp: np.ndarray, fp: np.ndarray, limits: Sequence[int]) -> list[np.ndarray]:
    """Per limit and row, tp at the last column with fp <= limit (0 if none): fp grows along a row, so the
    allowed columns are a prefix, usually short at low FPR; the longest is found by doubling its length."""
    K = fp.shape[1]
    length = min(K, 64)
    while length < K and np.any(fp[:, length - 1] <= max(limits)):
        length = min(K, 2 * length)
    tp_prefix, fp_prefix = tp[:, :length], fp[:, :length]
    row = np.arange(tp.shape[0])
    out = []
    for limit in limits:
        allowed = np.count_nonzero(fp_prefix <= limit, axis=1)
        at = tp_prefix[row, np.maximum(allowed - 1, 0)]
        out.append(np.where(allowed > 0, at, 0).astype(np.int64))
    return out


class ScoreBins:
    """One group's scores as *member columns*, the only thresholds the bootstrap needs to evaluate.

    Distinct scores, highest first; a column is a run of consecutive member-only distinct scores, or one
    distinct score that members and non-members share (a tie across the classes). Each non-member counts
    towards the first column at or below its score (the column's false positives include it). No metric
    changes: inside a member-only run the false positives are constant, so the best balanced accuracy, the
    TPR at each FPR and the AUC terms are those of the run's end; at a non-member-only score the true
    positives equal those of the column above it with more false positives, so it never beats that column
    (and the bottom non-members after the last column, all false positives, change nothing).
    """

    def __init__(self, member_scores: np.ndarray, nonmember_scores: np.ndarray):
        ranked = RankedScores(member_scores, nonmember_scores)
        K = ranked.n_distinct
        has_m = np.bincount(ranked.member_rank, minlength=K) > 0
        has_n = np.bincount(ranked.nonmember_rank, minlength=K) > 0
        tied = has_m & has_n
        member_only = has_m & ~has_n
        starts = has_m.copy()
        starts[1:] &= ~(member_only[1:] & member_only[:-1])
        started = np.cumsum(starts)  # columns started at or above each distinct score
        self.n_members = ranked.n_members
        self.n_nonmembers = ranked.n_nonmembers
        self.n_columns = int(started[-1])
        self.member_column = started[ranked.member_rank] - 1
        # a non-member's column: its own (a tie) or the next one to start below it; n_columns = none
        self.nonmember_column = started[ranked.nonmember_rank] - has_m[ranked.nonmember_rank]
        self.tie_columns = started[tied] - 1
        tie_index = np.cumsum(tied) - 1
        self.nonmember_tie = np.where(tied[ranked.nonmember_rank], tie_index[ranked.nonmember_rank], -1)
        self.member_tie = np.where(tied[ranked.member_rank], tie_index[ranked.member_rank], -1)

    def indicator(self, dtype) -> Any:
        """Sparse 0/1 (2J + 2T, P + N) matrix that sums how often each example is drawn (members, then
        non-members) into J member counts per column, J false-positive increments per column (a tied
        non-member counts in its column), then the non-member and the member counts of the T tie columns
        (a contiguous block each, for the AUC's ties)."""
        from scipy.sparse import csr_matrix  # deferred: only scoring with intervals pays scipy's import

        P, J, T = self.n_members, self.n_columns, self.tie_columns.size
        counted = self.nonmember_column < J
        tie, member_tie = self.nonmember_tie >= 0, self.member_tie >= 0
        nonmember = np.arange(self.n_nonmembers)
        rows = np.concatenate(
            (
                self.member_column,
                J + self.nonmember_column[counted],
                2 * J + self.nonmember_tie[tie],
                2 * J + T + self.member_tie[member_tie],
            )
        )
        cols = np.concatenate(
            (np.arange(P), P + nonmember[counted], P + nonmember[tie], np.flatnonzero(member_tie))
        )
        shape = (2 * J + 2 * T, P + self.n_nonmembers)
        return csr_matrix((np.ones(rows.size, dtype=dtype), (rows, cols)), shape=shape)


def metrics_from_counts(
    pos: np.ndarray, neg: np.ndarray, ties: np.ndarray, P: int, N: int
) -> dict[str, np.ndarray]:
    """Every interval metric per row of (rows, J) counts per column (highest scores first).

    Args:
        pos: Members per column.
        neg: Non-members per column (a column's false positives are the cumulative sum); non-members below
            the last column may be left out.
        ties: Per row, the sum over columns of members x non-members of the same score (the AUC's ties).
        P: Members. N: Non-members.

    Integer arithmetic as in `metrics.reference_metrics`, so each row equals the metrics of the resampled
    rows bit for bit. `pos` and `neg` may be views with contiguous rows.
    """
    rows = pos.shape[0]
    # int32 halves the memory traffic of the O(B x J) passes; products need P * N to fit in it
    dtype = np.int32 if P * N < 2**31 - 1 else np.int64
    tp = np.cumsum(pos, axis=1, dtype=dtype)
    fp = np.cumsum(neg, axis=1, dtype=dtype)
    # tp N - fp P, divided by gcd(P, N) > 0: the same first maximum and sign, in one pass when P = N
    g = math.gcd(P, N)
    gain = tp - fp if P == N else tp * dtype(N // g) - fp * dtype(P // g)
    best = np.argmax(gain, axis=1)  # first = highest threshold, as reference_metrics
    row = np.arange(rows)
    beats = gain[row, best] > 0
    best_tp = tp[row, best].astype(np.int64)
    best_fp = fp[row, best].astype(np.int64)
    # the same float operations as reference_metrics, so replicates match it bit for bit
    balanced = np.where(beats, 0.5 * (best_tp / P + 1.0 - best_fp / N), 0.5)
    # 2 x (pairs ranked right) + (tied pairs) = 2 P N - 2 x (pairs with the non-member at or above the
    # member) + (tied pairs); the sum is at most P * N, so it fits in dtype as the products do
    above = np.einsum("ij,ij->i", pos, fp, dtype=dtype).astype(np.int64)
    auc2 = 2 * P * N - 2 * above + np.asarray(ties, dtype=np.int64)
    out = {"balanced_accuracy": balanced, "auc": auc2 / (2.0 * P * N)}
    # unresolvable with N non-members: NULL, as in metrics.reference_metrics
    levels = [(name, num * N // den) for name, num, den in _TPR_LEVELS if not (num and N * num < den)]
    for name, _, _ in _TPR_LEVELS:
        out[name] = np.full(rows, np.nan)
    for (name, _), tp_at in zip(levels, _tp_at_fp_limits(tp, fp, [limit for _, limit in levels])):
        out[name] = tp_at / P
    return out


def replicates_of_groups(
    groups: Sequence[tuple[np.ndarray, np.ndarray]],
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> list[dict[str, np.ndarray]]:
    """`bootstrap_replicates` of many (member scores, non-member scores) groups at once.

    The draws depend only on the seed, P and N, so groups of equal P and N (the models of one spec) share
    them: each chunk of replicates is drawn once, and one sparse product per group sums its draw counts
    into the group's columns. Groups are taken in batches of at most `_BATCH_EXAMPLES` examples (each batch
    draws the same sequence again), so memory stays bounded however many groups there are.
    """
    out: list[dict[str, np.ndarray]] = [{} for _ in groups]
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, (members, nonmembers) in enumerate(groups):
        if members.size and nonmembers.size and n_resamples > 0:
            by_size.setdefault((members.size, nonmembers.size), []).append(i)
    for (P, N), same_size in by_size.items():
        per_batch = max(1, _BATCH_EXAMPLES // (P + N))
        for start in range(0, len(same_size), per_batch):
            batch = same_size[start : start + per_batch]
            for i, replicates in zip(
                batch, _replicates_sharing_draws([groups[i] for i in batch], n_resamples, seed)
            ):
                out[i] = replicates
    return out


def _replicates_sharing_draws(
    groups: list[tuple[np.ndarray, np.ndarray]], n_resamples: int, seed: int
) -> list[dict[str, np.ndarray]]:
    P, N = groups[0][0].size, groups[0][1].size
    # a draw count is at most P (or N); int16 halves the traffic of the sparse sums where it fits
    dtype = np.int16 if max(P, N) < 2**15 else np.int32
    shapes, indicators = [], []
    for members, nonmembers in groups:
        bins = ScoreBins(members, nonmembers)
        shapes.append((bins.n_columns, bins.tie_columns.size))
        indicators.append(bins.indicator(dtype))
    width = max(P + N, max(2 * J + 2 * T for J, T in shapes))
    chunk = max(1, min(n_resamples, _CHUNK_ELEMENTS // width))
    parts: list[dict[str, list[np.ndarray]]] = [{m: [] for m in INTERVAL_METRICS} for _ in groups]
    rng = np.random.default_rng(seed)
    done = 0
    while done < n_resamples:
        rows = min(chunk, n_resamples - done)
        members, nonmembers = _draw_block(rng, P, N, rows)
        # how often each example is drawn, once for all the groups; example-major so that the sparse sums
        # run along contiguous rows (a table look-up and a bincount per group and replicate costs more,
        # even for one group)
        drawn = np.empty((rows, P + N), dtype=dtype)
        for i in range(rows):
            drawn[i, :P] = np.bincount(members[i], minlength=P)
            drawn[i, P:] = np.bincount(nonmembers[i], minlength=N)
        drawn = np.ascontiguousarray(drawn.T)
        for (J, T), indicator, part in zip(shapes, indicators, parts):
            # (rows, 2J + 2T), in the row order of `ScoreBins.indicator`
            per_column = (indicator @ drawn).T.astype(np.int32, order="C")
            tie_members, tie_nonmembers = per_column[:, 2 * J + T :], per_column[:, 2 * J : 2 * J + T]
            ties = np.einsum("ij,ij->i", tie_members, tie_nonmembers, dtype=np.int64)  # up to P * N
            values = metrics_from_counts(per_column[:, :J], per_column[:, J : 2 * J], ties, P, N)
            for name, v in values.items():
                part[name].append(v)
        done += rows
    return [{name: np.concatenate(v) for name, v in part.items()} for part in parts]


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
    return replicates_of_groups([_split(scores, is_member)], n_resamples, seed)[0]


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
    return _intervals_of(bootstrap_replicates(scores, is_member, n_resamples, seed), confidence)


def _intervals_of(replicates: dict[str, np.ndarray], confidence: float) -> dict[str, float | None]:
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
    spans = list(zip(starts.tolist(), ends.tolist()))
    groups = [_split(scores[start:end], members[start:end]) for start, end in spans]
    for (start, _), replicates in zip(spans, replicates_of_groups(groups, n_resamples, seed)):
        for n, column in zip(names, key_columns):
            out[n].append(column[start].item() if hasattr(column[start], "item") else column[start])
        intervals = _intervals_of(replicates, confidence)
        for column_name in INTERVAL_COLUMNS:
            out[column_name].append(intervals[column_name])
    arrays = {n: pa.array(out[n], type=table.schema.field(n).type) for n in names}
    arrays |= {c: pa.array(out[c], type=pa.float64()) for c in INTERVAL_COLUMNS}
    return pa.table(arrays)


def write_intervals(
    con, attack_name: str, attack_key: str, n_resamples: int, units: str, labelled: pa.Table
) -> None:
    """The hook `scoring` calls after writing metrics: intervals of the units in the registered table `units`.

    Runs inside scoring's transaction, on its connection. `labelled` holds every row of those units
    (model_key, perturbation, example_id, score, is_member): one part of the run, never the whole store.
    """
    con.execute(
        f"""DELETE FROM metric_intervals WHERE attack_key IN (SELECT attack_key FROM attacks WHERE name = ?)
           AND (model_key, perturbation) IN (SELECT model_key, perturbation FROM {units})""",
        [attack_name],
    )
    if n_resamples <= 0:
        return
    # one (model, perturbation) at a time: memory holds one model's rows on top of the part
    groups = con.execute(f"SELECT model_key, perturbation FROM {units} ORDER BY ALL").fetchall()
    parts = []
    for model_key, perturbation in groups:
        same = pc.and_(
            pc.equal(labelled["model_key"], model_key), pc.equal(labelled["perturbation"], perturbation)
        )
        parts.append(
            grouped_intervals(labelled.filter(same), ["model_key", "perturbation"], n_resamples, DEFAULT_SEED)
        )
    if not parts:
        return
    intervals = pa.concat_tables(parts)
    con.register("_new_intervals", intervals)
    columns = ", ".join(f"i.{c}" for c in INTERVAL_COLUMNS)
    con.execute(
        f"""INSERT INTO metric_intervals
            SELECT ?, i.model_key, i.perturbation, d.inputs_key, ?, ?, ?, {columns}
            FROM _new_intervals i JOIN {units} d USING (model_key, perturbation)""",
        [attack_key, n_resamples, DEFAULT_SEED, DEFAULT_CONFIDENCE],
    )
    con.unregister("_new_intervals")
