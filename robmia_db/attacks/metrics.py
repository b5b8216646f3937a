"""Attacks layer: membership metrics (DuckDB SQL + numpy reference); imports duckdb, numpy, pyarrow, errors.

Conventions shared by every function here:

* A row is a member prediction iff ``score >= t``; higher scores mean "more likely a member".
* ``P`` = number of members, ``N`` = number of non-members of a group.
* Rows whose score is NULL or NaN, or whose ``is_member`` is NULL, are excluded from every count
  (they are not counted anywhere, so a caller that wants to report them must count them itself).
* The paper's inference accuracy (Song et al., CCS 2019, ``inference_utils.py``) is the best balanced
  accuracy ``0.5 * (TPR(t) + 1 - FPR(t))`` over every observed score ``t``, starting from 0.5. The
  threshold is an oracle: it is tuned on the very members and non-members it is scored on, so it is an
  optimistic upper bound. `calibrated_balanced_accuracy` scores a threshold chosen elsewhere (e.g. on a
  reference model) instead.
* When several thresholds reach the best value, ``threshold`` is the largest of them (the most
  conservative rule, predicting the fewest members). The paper's loop keeps the smallest one; the
  accuracy is the same either way.
* When no threshold beats 0.5, the result is the 0.5 floor: ``advantage`` 0, ``threshold`` NULL and
  ``tp_at_best = fp_at_best = 0`` (the empty prediction, as if ``t = +inf``).
* Groups with ``P == 0`` or ``N == 0`` have NULL metrics; only ``n_members`` / ``n_nonmembers`` are set.
* ``auc`` is the probability that a random member outscores a random non-member, ties counting 1/2
  (scikit-learn's ``roc_auc_score``); ``auc_numerator2 = 2 * wins + ties`` over member/non-member pairs.
* ``tpr_at_fpr_0`` / ``_1e4`` / ``_1e3`` / ``_1e2`` are the best TPR over thresholds with FPR <= 0,
  0.01 %, 0.1 %, 1 % (``t = +inf`` gives TPR 0), the FPR bound compared in integers (``fp * 1000 <= N``).
  A level ``a`` that the non-members cannot resolve (``a * N < 1``: not one false positive allowed, so the
  number would silently be ``tpr_at_fpr_0``) is NULL; `low_fpr_note` says why.

Ties matter (float32 softmax saturates at exactly 1.0 for many samples), so the SQL first aggregates
per distinct score and only then accumulates over the (now unique) scores, in integer arithmetic up to
the final divisions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from robmia_db.errors import StoreError

METRIC_COLUMNS: tuple[str, ...] = (
    "balanced_accuracy",
    "auc",
    "tpr_at_fpr_0",
    "tpr_at_fpr_1e4",
    "tpr_at_fpr_1e3",
    "tpr_at_fpr_1e2",
    "advantage",
    "threshold",
    "n_members",
    "n_nonmembers",
    "tp_at_best",
    "fp_at_best",
    "auc_numerator2",
)

# (column name, FPR budget as numerator/denominator): FPR <= num/den  <=>  fp * den <= num * N.
_TPR_AT_FPR_LEVELS: tuple[tuple[str, int, int], ...] = (
    ("tpr_at_fpr_0", 0, 1),
    ("tpr_at_fpr_1e4", 1, 10000),
    ("tpr_at_fpr_1e3", 1, 1000),
    ("tpr_at_fpr_1e2", 1, 100),
)

_RESERVED_COLUMNS = frozenset({"score", "is_member"})


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _check_group_by(group_by: Sequence[str]) -> list[str]:
    names = list(group_by)
    if len(set(names)) != len(names):
        raise ValueError(f"group_by has duplicate columns: {names}")
    for name in names:
        if name in _RESERVED_COLUMNS or name.startswith("__"):
            raise ValueError(f"group_by column {name!r} clashes with a metrics column")
    return names


def _as_relation(source: str) -> str:
    stripped = source.strip()
    if not stripped:
        raise ValueError("metrics source is empty")
    if stripped.split(None, 1)[0].upper() in {"SELECT", "WITH", "FROM", "VALUES"}:
        return f"({stripped})"
    return stripped


def metrics_sql(source: str, group_by: Sequence[str]) -> str:
    """Builds the DuckDB query computing every metric in `METRIC_COLUMNS` per group.

    Args:
        source: A table/view name, a parenthesised subquery, or a bare SELECT, with columns
            ``(*group_by, score, is_member)``; ``score`` is cast to DOUBLE, ``is_member`` to BOOLEAN.
        group_by: Grouping columns (may be empty: then exactly one row comes back).

    Returns:
        One SELECT statement returning ``(*group_by, *METRIC_COLUMNS)``, one row per group.

    Raises:
        ValueError: if a grouping column is duplicated or clashes with ``score``/``is_member``/``__*``.
    """
    groups = [_quote(g) for g in _check_group_by(group_by)]
    g_select = "".join(f"{g}, " for g in groups)
    partition = f"PARTITION BY {', '.join(groups)}" if groups else ""
    group_clause = f"GROUP BY {', '.join(groups)}" if groups else ""
    per_score_group = f"GROUP BY {', '.join([*groups, '__score'])}"
    order_clause = f"ORDER BY {', '.join(groups)}" if groups else ""
    relation = _as_relation(source)
    low_mask = "CAST(18446744073709551615 AS HUGEINT)"
    packed_counts = "CAST(__pos AS HUGEINT) + (CAST(__neg AS HUGEINT) << 64)"
    # tp/P - fp/N scaled by P*N: comparing gains compares balanced accuracies, exactly.
    gain = "(CAST(__tp AS HUGEINT) * __N - CAST(__fp AS HUGEINT) * __P)"

    tpr_levels = ",\n        ".join(
        f"coalesce(max(__tp) FILTER (WHERE __fp * {den} <= {num} * __N), 0) AS __{name}"
        for name, num, den in _TPR_AT_FPR_LEVELS
    )
    # num * N >= den: the level allows at least one false positive (level 0 is always resolvable)
    tpr_outputs = ",\n    ".join(
        f"CASE WHEN __ok AND ({num} = 0 OR CAST(__N AS HUGEINT) * {num} >= {den}) "
        f"THEN CAST(__{name} AS DOUBLE) / __P END AS {name}"
        for name, num, den in _TPR_AT_FPR_LEVELS
    )
    # Per-distinct-score counts first: the cumulative window then runs over unique scores, so its
    # frame can never split a block of tied scores (a ROWS frame over raw tied rows would).
    # N - fp counts non-members strictly below the current score, giving the Mann-Whitney numerator
    # 2*wins + ties without any pairwise work.
    # Members and non-members are packed into the low and high 64 bits of one HUGEINT, so a single
    # cumulative window sum (the costly step) yields both tp and fp, exactly.
    # arg_max over (gain, score) picks the largest threshold among equally good ones.
    return f"""
WITH __clean AS (
    SELECT {g_select}
        CASE WHEN is_member IS NULL OR isnan(CAST(score AS DOUBLE)) THEN NULL
             ELSE CAST(score AS DOUBLE) END AS __score,
        CAST(is_member AS BOOLEAN) AS __member
    FROM {relation} AS __source
),
__per_score AS (
    SELECT {g_select}__score,
        count(*) FILTER (WHERE __score IS NOT NULL AND __member) AS __pos,
        count(*) FILTER (WHERE __score IS NOT NULL AND NOT __member) AS __neg
    FROM __clean
    {per_score_group}
),
__cumulative AS (
    SELECT {g_select}__score, __pos, __neg,
        CAST(__packed_cumulative & {low_mask} AS BIGINT) AS __tp,
        CAST(__packed_cumulative >> 64 AS BIGINT) AS __fp,
        CAST(__packed_total & {low_mask} AS BIGINT) AS __P,
        CAST(__packed_total >> 64 AS BIGINT) AS __N
    FROM (
        SELECT *,
            sum({packed_counts}) OVER __descending AS __packed_cumulative,
            sum({packed_counts}) OVER __whole AS __packed_total
        FROM __per_score
        WINDOW __descending AS ({partition} ORDER BY __score DESC NULLS LAST
                                RANGE BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW),
               __whole AS ({partition})
    ) AS __packed
),
__per_group AS (
    SELECT {g_select}
        coalesce(max(__P), 0) AS __P,
        coalesce(max(__N), 0) AS __N,
        arg_max({{'gain': {gain}, 'tp': __tp, 'fp': __fp, 'score': __score}}, ({gain}, __score))
            FILTER (WHERE __score IS NOT NULL) AS __best,
        CAST(sum(CAST(__pos AS HUGEINT) * (2 * (__N - __fp) + __neg)) AS BIGINT) AS __auc2,
        {tpr_levels}
    FROM __cumulative
    {group_clause}
),
__decided AS (
    SELECT *,
        __P > 0 AND __N > 0 AS __ok,
        __P > 0 AND __N > 0 AND __best.gain > 0 AS __beats_floor
    FROM __per_group
)
SELECT {g_select}
    CASE WHEN NOT __ok THEN NULL
         WHEN __beats_floor THEN CAST(0.5 AS DOUBLE) * (CAST(__best.tp AS DOUBLE) / __P
                                   + CAST(1 AS DOUBLE) - CAST(__best.fp AS DOUBLE) / __N)
         ELSE CAST(0.5 AS DOUBLE) END AS balanced_accuracy,
    CASE WHEN __ok THEN CAST(__auc2 AS DOUBLE) / (CAST(2 AS DOUBLE) * __P * __N) END AS auc,
    {tpr_outputs},
    CASE WHEN NOT __ok THEN NULL
         WHEN __beats_floor THEN CAST(__best.tp AS DOUBLE) / __P - CAST(__best.fp AS DOUBLE) / __N
         ELSE CAST(0 AS DOUBLE) END AS advantage,
    CASE WHEN __beats_floor THEN __best.score END AS threshold,
    __P AS n_members,
    __N AS n_nonmembers,
    CASE WHEN NOT __ok THEN NULL WHEN __beats_floor THEN __best.tp ELSE CAST(0 AS BIGINT) END AS tp_at_best,
    CASE WHEN NOT __ok THEN NULL WHEN __beats_floor THEN __best.fp ELSE CAST(0 AS BIGINT) END AS fp_at_best,
    CASE WHEN __ok THEN __auc2 END AS auc_numerator2
FROM __decided
{order_clause}
"""


def compute_metrics(con: duckdb.DuckDBPyConnection, source: str, group_by: Sequence[str]) -> pa.Table:
    """Runs `metrics_sql` on a connection and returns its rows as an Arrow table.

    Args:
        con: An open DuckDB connection that can see `source`.
        source: Relation name or subquery with columns ``(*group_by, score, is_member)``.
        group_by: Grouping columns (may be empty).

    Returns:
        Arrow table ``(*group_by, *METRIC_COLUMNS)``, one row per group, sorted by the group columns.

    Raises:
        StoreError: if DuckDB rejects the query (missing relation or column, wrong types).
    """
    sql = metrics_sql(source, group_by)
    try:
        return con.sql(sql).to_arrow_table()
    except duckdb.Error as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StoreError(f"metrics query over {source.strip()[:80]!r} failed: {first_line}") from exc


def compute_metrics_arrays(
    scores: Any,
    is_member: Any,
    groups: Mapping[str, Any] | None = None,
    threads: int | None = None,
) -> pa.Table:
    """Computes the metrics of plain arrays through DuckDB, on a private in-memory connection.

    Args:
        scores: Scores (any float dtype; NaN counts as missing), one per row.
        is_member: Booleans, one per row.
        groups: Optional mapping of grouping column name to one value per row.
        threads: DuckDB worker threads (DuckDB's default when None).

    Returns:
        Same as `compute_metrics`.
    """
    columns: dict[str, Any] = {name: np.asarray(values) for name, values in (groups or {}).items()}
    columns["score"] = np.asarray(scores, dtype=np.float64)
    columns["is_member"] = np.asarray(is_member, dtype=bool)
    table = pa.table(columns)
    con = duckdb.connect(":memory:")
    try:
        if threads is not None:
            con.execute(f"SET threads = {int(threads)}")
        con.register("__metrics_input", table)
        return compute_metrics(con, "__metrics_input", list(groups or {}))
    finally:
        con.close()


def _group_codes(table: pa.Table, group_by: Sequence[str]) -> tuple[np.ndarray, pa.Table]:
    """(code per row, one row per code of the group columns, sorted like the SQL's ORDER BY)."""
    if not group_by:
        return np.zeros(table.num_rows, dtype=np.int64), pa.table({})
    combined, n_combinations = np.zeros(table.num_rows, dtype=np.int64), 1
    for name in group_by:
        column = table.column(name).combine_chunks()
        if column.null_count:
            raise ValueError(f"group column {name!r} has NULLs")  # SQL would make them a group of their own
        encoded = column if pa.types.is_dictionary(column.type) else pc.dictionary_encode(column)
        rank = np.asarray(pc.rank(encoded.dictionary, tiebreaker="dense"), dtype=np.int64) - 1
        if n_combinations * len(rank) >= 1 << 62:  # renumber the combinations so far (order kept)
            uniques, combined = np.unique(combined, return_inverse=True)
            n_combinations = len(uniques)
        combined = combined * len(rank) + rank[encoded.indices.to_numpy(zero_copy_only=False)]
        n_combinations *= len(rank)
    if n_combinations <= 4 * table.num_rows + 1024:  # few combinations: a lookup table instead of a sort
        present = np.flatnonzero(np.bincount(combined, minlength=n_combinations))
        lookup = np.zeros(n_combinations, dtype=np.int64)
        lookup[present] = np.arange(len(present))
        codes = lookup[combined]
    else:
        present, codes = np.unique(combined, return_inverse=True)
    some_row = np.empty(len(present), dtype=np.int64)
    some_row[codes] = np.arange(table.num_rows)  # any row of a group holds its values
    groups = table.select(list(group_by)).take(some_row).combine_chunks()
    decoded = [c.cast(c.type.value_type) if pa.types.is_dictionary(c.type) else c for c in groups.columns]
    return codes.astype(np.int64, copy=False), pa.table(decoded, names=list(group_by))


def compute_metrics_table(table: pa.Table, group_by: Sequence[str]) -> pa.Table:
    """The rows of `compute_metrics` for an Arrow table held in memory, computed in numpy.

    Every number is the SQL's, bit for bit: the same integer counts, then the same float64 operations in
    the same order (a test compares both on tie-heavy groups). It skips DuckDB's per-row window and
    aggregation work, which dominated `score`'s write step; the SQL stays for relations in the store.

    Args:
        table: Columns ``(*group_by, score, is_member)``; NULL/NaN scores and NULL memberships are excluded.
        group_by: Grouping columns (may be empty: then exactly one row comes back).

    Returns:
        Same as `compute_metrics`.
    """
    group_by, codes, groups, n_groups, score_column, member_column = _grouped_columns(table, group_by)
    scores = score_column.to_numpy(zero_copy_only=False)
    members = member_column.fill_null(False).to_numpy(zero_copy_only=False)
    keep = ~np.isnan(scores)  # a NULL score reads as NaN
    if member_column.null_count:
        keep &= member_column.is_valid().to_numpy(zero_copy_only=False)
    columns = _grouped_metrics(scores[keep], members[keep], codes[keep], n_groups)
    return pa.table({**{name: groups.column(name) for name in group_by}, **columns})


def _grouped_columns(table: pa.Table, group_by: Sequence[str]):
    """Each row's group code, and the float64 score and bool is_member columns both table functions read."""
    group_by = _check_group_by(group_by)
    codes, groups = _group_codes(table, group_by)
    n_groups = groups.num_rows if group_by else 1
    score_column = table.column("score").combine_chunks().cast(pa.float64())
    member_column = table.column("is_member").combine_chunks().cast(pa.bool_())
    return group_by, codes, groups, n_groups, score_column, member_column


def decision_counts_table(table: pa.Table, group_by: Sequence[str], threshold: float) -> pa.Table:
    """Per group, the counts of the rule `member iff score >= threshold`: d_p, d_n (members and non-members,
    whatever their score), d_tp, d_fp, with SQL's semantics (`score >= t` is true for NaN in DuckDB, which
    orders NaN above every number, and false for NULL); rows with a NULL `is_member` count nowhere."""
    group_by, codes, groups, n_groups, score_column, member_column = _grouped_columns(table, group_by)
    scores = score_column.to_numpy(zero_copy_only=False)
    known = member_column.is_valid().to_numpy(zero_copy_only=False)
    members = member_column.fill_null(False).to_numpy(zero_copy_only=False)
    with np.errstate(invalid="ignore"):
        above = (scores >= threshold) | np.isnan(scores)
    if score_column.null_count:
        above &= score_column.is_valid().to_numpy(zero_copy_only=False)
    counts = {
        "d_p": members,
        "d_n": known & ~members,
        "d_tp": members & above,
        "d_fp": known & ~members & above,
    }
    columns = {name: pa.array(np.bincount(codes[rows], minlength=n_groups)) for name, rows in counts.items()}
    return pa.table({**{name: groups.column(name) for name in group_by}, **columns})


def _grouped_metrics(scores: np.ndarray, members: np.ndarray, codes: np.ndarray, n_groups: int) -> dict:
    """`METRIC_COLUMNS` as Arrow arrays for groups 0 .. n_groups - 1 (clean rows only: no NaN)."""
    # by group, then score descending: a radix sort of the codes, then one argsort per group (3-4x faster
    # than np.lexsort); the order within tied scores is immaterial, a block of ties is counted as one
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(n_groups + 1), side="left")
    negated = -scores[order]
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        if b - a > 1:
            order[a:b] = order[a:b][np.argsort(negated[a:b])]
    del negated
    scores, members, codes = scores[order], members[order], codes[order]
    n = len(scores)
    # blocks of one distinct score within a group (the SQL's per-score rows); != keeps -inf ties together
    first = np.ones(n, dtype=bool)
    first[1:] = (codes[1:] != codes[:-1]) | (scores[1:] != scores[:-1])
    start = np.flatnonzero(first)
    end = np.r_[start[1:], n] if n else start
    group = codes[start]
    cum_pos = np.r_[0, np.cumsum(members, dtype=np.int64)]
    cum_all = np.arange(n + 1, dtype=np.int64)
    positives = np.bincount(codes[members], minlength=n_groups).astype(np.int64)
    negatives = np.bincount(codes[~members], minlength=n_groups).astype(np.int64)
    if n and int(positives.max()) * int(negatives.max()) >= 1 << 61:
        raise ValueError("a group is too large for the int64 counts of the numpy metrics")
    row_start = np.searchsorted(codes, np.arange(n_groups), side="left")  # each group's first row
    base_pos, base_all = cum_pos[row_start][group], cum_all[row_start][group]
    tp = cum_pos[end] - base_pos  # members with score >= the block's score, within its group
    fp = (cum_all[end] - base_all) - tp
    pos = cum_pos[end] - cum_pos[start]
    neg = (end - start) - pos
    P, N = positives[group], negatives[group]
    gain = tp * N - fp * P  # tp/P - fp/N scaled by P*N: exact comparison of balanced accuracies
    has_blocks = np.zeros(n_groups, dtype=bool)
    has_blocks[group] = True
    block_start = np.searchsorted(group, np.flatnonzero(has_blocks), side="left")  # each group's first block

    def per_group(values: np.ndarray, reduce: np.ufunc, empty: int) -> np.ndarray:
        out = np.full(n_groups, empty, dtype=np.int64)
        if len(values):
            out[has_blocks] = reduce.reduceat(values, block_start)
        return out

    best_gain = per_group(gain, np.maximum, np.iinfo(np.int64).min)
    # the first block reaching its group's best gain: the largest such score (blocks descend by score)
    at_best = np.flatnonzero(gain == best_gain[group])
    best = at_best[np.r_[True, group[at_best][1:] != group[at_best][:-1]]] if len(at_best) else at_best
    best_tp = np.zeros(n_groups, dtype=np.int64)
    best_fp = np.zeros(n_groups, dtype=np.int64)
    threshold = np.zeros(n_groups)
    best_tp[group[best]], best_fp[group[best]], threshold[group[best]] = (
        tp[best],
        fp[best],
        scores[start[best]],
    )
    auc2 = per_group(pos * (2 * (N - fp) + neg), np.add, 0)
    ok = (positives > 0) & (negatives > 0)
    beats = ok & (best_gain > 0)
    Pf, Nf = positives.astype(np.float64), negatives.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        tpr_best, fpr_best = best_tp.astype(np.float64) / Pf, best_fp.astype(np.float64) / Nf
        columns = {
            "balanced_accuracy": (np.where(beats, 0.5 * (tpr_best + 1.0 - fpr_best), 0.5), ok),
            "auc": (auc2.astype(np.float64) / (2.0 * Pf * Nf), ok),
        }
        for name, num, den in _TPR_AT_FPR_LEVELS:
            allowed = fp * den <= num * N
            reached = per_group(np.where(allowed, tp, 0), np.maximum, 0)
            columns[name] = (reached.astype(np.float64) / Pf, ok & ((num == 0) | (negatives * num >= den)))
        columns["advantage"] = (np.where(beats, tpr_best - fpr_best, 0.0), ok)
    columns["threshold"] = (threshold, beats)
    columns["n_members"] = (positives, None)
    columns["n_nonmembers"] = (negatives, None)
    columns["tp_at_best"] = (np.where(beats, best_tp, 0), ok)
    columns["fp_at_best"] = (np.where(beats, best_fp, 0), ok)
    columns["auc_numerator2"] = (auc2, ok)
    return {
        name: pa.array(values, mask=None if valid is None else ~valid)
        for name, (values, valid) in columns.items()
    }


def _clean_arrays(scores: Any, is_member: Any) -> tuple[np.ndarray, np.ndarray]:
    score_array = np.asarray(scores, dtype=np.float64).ravel()
    member_array = np.asarray(is_member).ravel()
    if score_array.shape != member_array.shape:
        raise ValueError(f"scores ({score_array.size}) and is_member ({member_array.size}) differ in length")
    keep = ~np.isnan(score_array)
    return score_array[keep], member_array[keep].astype(bool)


def _descending_cumulative(scores: np.ndarray, members: np.ndarray) -> tuple[np.ndarray, ...]:
    """(distinct scores descending, tp, fp) with tp/fp = counts at score >= that value."""
    order = np.argsort(scores, kind="stable")[::-1]
    sorted_scores = scores[order]
    sorted_members = members[order]
    # compare neighbours, not np.diff: -inf - -inf is NaN and would split a block of tied -inf scores
    last_of_block = np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1])
    last_of_block = np.append(last_of_block, sorted_scores.size - 1)
    tp = np.cumsum(sorted_members, dtype=np.int64)[last_of_block]
    fp = np.cumsum(~sorted_members, dtype=np.int64)[last_of_block]
    return sorted_scores[last_of_block], tp, fp


def _auc_numerator2_by_midranks(scores: np.ndarray, members: np.ndarray) -> int:
    """2*U of Mann-Whitney from doubled mid-ranks: independent of the cumulative-count method."""
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    block_starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    block_ends = np.r_[block_starts[1:], sorted_scores.size]
    doubled_midrank_per_block = block_starts + 1 + block_ends  # 1-based ranks start+1 .. end
    block_sizes = block_ends - block_starts
    doubled_ranks = np.repeat(doubled_midrank_per_block, block_sizes)
    n_members = int(members.sum())
    doubled_rank_sum = int(doubled_ranks[members[order]].sum())
    return doubled_rank_sum - n_members * (n_members + 1)


def reference_metrics(scores: np.ndarray, is_member: np.ndarray) -> dict[str, float | int | None]:
    """Numpy reference of every metric in `METRIC_COLUMNS`, for one group (sort-based, no SQL).

    Args:
        scores: Scores, one per row; NaN rows are excluded.
        is_member: Booleans, one per row.

    Returns:
        Dict keyed by `METRIC_COLUMNS`; same conventions as the SQL (floor, ties, NULL -> None).
    """
    score_array, member_array = _clean_arrays(scores, is_member)
    n_members = int(member_array.sum())
    n_nonmembers = int(member_array.size - n_members)
    result: dict[str, float | int | None] = dict.fromkeys(METRIC_COLUMNS)
    result["n_members"] = n_members
    result["n_nonmembers"] = n_nonmembers
    if n_members == 0 or n_nonmembers == 0:
        return result

    distinct, tp, fp = _descending_cumulative(score_array, member_array)
    gain = tp * n_nonmembers - fp * n_members
    best = int(np.argmax(gain))  # first hit in descending order = largest threshold among ties
    if gain[best] > 0:
        best_tp, best_fp = int(tp[best]), int(fp[best])
        result["balanced_accuracy"] = 0.5 * (best_tp / n_members + 1.0 - best_fp / n_nonmembers)
        result["advantage"] = best_tp / n_members - best_fp / n_nonmembers
        result["threshold"] = float(distinct[best])
    else:
        best_tp = best_fp = 0
        result["balanced_accuracy"] = 0.5
        result["advantage"] = 0.0
    result["tp_at_best"] = best_tp
    result["fp_at_best"] = best_fp

    auc2 = _auc_numerator2_by_midranks(score_array, member_array)
    result["auc_numerator2"] = auc2
    result["auc"] = auc2 / (2.0 * n_members * n_nonmembers)
    for name, num, den in _TPR_AT_FPR_LEVELS:
        if num and n_nonmembers * num < den:
            continue  # unresolvable: stays None
        allowed = fp * den <= num * n_nonmembers
        result[name] = int(tp[allowed].max(initial=0)) / n_members
    return result


def low_fpr_note(n_nonmembers: int | None) -> str | None:
    """Why a TPR-at-FPR level is NULL: too few non-members to allow one false positive at that FPR."""
    if not n_nonmembers:
        return None
    missing = [
        f"{100 * num / den:g}% (needs {den // num:,})"
        for _, num, den in _TPR_AT_FPR_LEVELS
        if num and n_nonmembers * num < den
    ]
    if not missing:
        return None
    return f"{n_nonmembers:,} non-members cannot resolve FPR " + ", ".join(missing)


def paper_inference_accuracy(member_scores: Any, nonmember_scores: Any) -> float:
    """The paper's inference accuracy, with the arithmetic of its `inference_via_confidence` loop.

    The loop tries every value of ``sort(concat(members, non-members))`` as ``t`` and keeps the largest
    ``0.5 * (sum(c1 >= t) / len(c1) + 1 - sum(c2 >= t) / len(c2))`` above 0.5. Counting uses
    `np.searchsorted` instead of one pass per threshold; every float operation is the loop's, in its
    order, so the result is bit-identical. Scores are compared in their own dtype (float32 stays
    float32), as the paper did.

    Args:
        member_scores: Scores of the members (the paper's training set).
        nonmember_scores: Scores of the non-members (the paper's test set).

    Returns:
        The best balanced accuracy, never below 0.5.
    """
    c1 = np.asarray(member_scores).ravel()
    c2 = np.asarray(nonmember_scores).ravel()
    thresholds = np.sort(np.concatenate((c1, c2)))
    count1 = c1.size - np.searchsorted(np.sort(c1), thresholds, side="left")
    count2 = c2.size - np.searchsorted(np.sort(c2), thresholds, side="left")
    accuracies = 0.5 * (count1 / float(c1.shape[0]) + 1 - count2 / float(c2.shape[0]))
    return float(max(0.5, accuracies.max(initial=0.5)))


def calibrated_balanced_accuracy(threshold: float, scores: Any, is_member: Any) -> float:
    """Balanced accuracy of a threshold fixed in advance (e.g. calibrated on a reference model).

    Unlike the oracle metric there is no 0.5 floor: a badly calibrated threshold can score below 0.5.

    Args:
        threshold: Member iff ``score >= threshold``.
        scores: Scores, one per row; NaN rows are excluded.
        is_member: Booleans, one per row.

    Returns:
        ``0.5 * (TPR + 1 - FPR)``, or NaN when there are no members or no non-members.
    """
    score_array, member_array = _clean_arrays(scores, is_member)
    n_members = int(member_array.sum())
    n_nonmembers = int(member_array.size - n_members)
    if n_members == 0 or n_nonmembers == 0:
        return math.nan
    predicted = score_array >= threshold
    tp = int(np.count_nonzero(predicted & member_array))
    fp = int(np.count_nonzero(predicted & ~member_array))
    return 0.5 * (tp / n_members + 1.0 - fp / n_nonmembers)


def roc_points(scores: Any, is_member: Any, max_points: int = 5000) -> dict[str, np.ndarray]:
    """ROC curve for charts, one point per distinct threshold, thinned at log-spaced FPRs.

    The first point is ``(0, 0)`` at ``t = +inf``, the last is ``(1, 1)`` at the lowest score. When
    there are more than `max_points` points, the kept ones are, for each of ``max_points - 5`` FPR
    targets log-spaced over ``[1/N, 1]`` and for the FPR levels 0, 0.1% and 1% of `METRIC_COLUMNS`,
    the last point whose FPR does not exceed it (the best TPR at that FPR), plus both endpoints: the
    low-FPR region, where membership inference is judged, keeps its detail.

    Args:
        scores: Scores, one per row; NaN rows are excluded.
        is_member: Booleans, one per row.
        max_points: Upper bound on the number of returned points (at least 6).

    Returns:
        ``{"fpr", "tpr", "thresholds"}`` float64 arrays, FPR non-decreasing; empty arrays when there
        are no members or no non-members.
    """
    if max_points < 6:
        raise ValueError("max_points must be at least 6")
    score_array, member_array = _clean_arrays(scores, is_member)
    n_members = int(member_array.sum())
    n_nonmembers = int(member_array.size - n_members)
    if n_members == 0 or n_nonmembers == 0:
        empty = np.empty(0, dtype=np.float64)
        return {"fpr": empty, "tpr": empty.copy(), "thresholds": empty.copy()}
    distinct, tp, fp = _descending_cumulative(score_array, member_array)
    fpr = np.r_[0.0, fp / n_nonmembers]
    tpr = np.r_[0.0, tp / n_members]
    thresholds = np.r_[np.inf, distinct]
    if fpr.size > max_points:
        levels = [num / den for _, num, den in _TPR_AT_FPR_LEVELS]
        targets = np.r_[np.geomspace(1.0 / n_nonmembers, 1.0, max_points - 5), levels]
        at_targets = np.searchsorted(fpr, targets, side="right") - 1
        keep = np.unique(np.r_[0, at_targets, fpr.size - 1])
        fpr, tpr, thresholds = fpr[keep], tpr[keep], thresholds[keep]
    return {"fpr": fpr, "tpr": tpr, "thresholds": thresholds}
