"""Report layer: the 95 % interval shown beside a value (page, sweep charts, exported tables).

A value averaged over several seeds gets the Student t interval of the mean over its seeds; a single model's
inference accuracy gets its stratified bootstrap interval over examples (v_metrics ``*_ci_*``, computed
when the attack was scored); anything else gets none.
"""

from __future__ import annotations

import math
from typing import Any

from robmia_db.report.queries import KINDS, PAPER_ATTACK, ReportData

# Student t 0.975 quantiles for 1..30 degrees of freedom (scipy); beyond, the normal 1.96 (within 2.3 %).
_T975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157,
         2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922,
         2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831,
         2.048407, 2.045230, 2.042272)  # fmt: skip
INFERENCE_COLUMNS = dict(zip(("i_b", "i_a", "i_v"), KINDS, strict=True))


def t_interval(mean: float, sd: float | None, n: int) -> tuple[float | None, float | None]:
    """95 % Student t interval of a mean over n values with sample sd; (None, None) for n < 2."""
    if n < 2 or sd is None:
        return None, None
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.959963984540054
    half = t * sd / math.sqrt(n)
    return mean - half, mean + half


def bootstrap_intervals(data: ReportData) -> dict[tuple[str, str], tuple[Any, Any]]:
    """(model_key, paper column) -> the stored bootstrap interval of the paper attack's accuracy."""
    stored = {
        (r["model_key"], r["perturbation"]): (
            r.get("balanced_accuracy_ci_low"),
            r.get("balanced_accuracy_ci_high"),
        )
        for r in data.metrics
        if r["attack"] == PAPER_ATTACK
    }
    out = {}
    for (model_key, kind), perturbation in data.primary.items():
        for column, column_kind in INFERENCE_COLUMNS.items():
            if column_kind == kind and (model_key, perturbation) in stored:
                out[(model_key, column)] = stored[(model_key, perturbation)]
    return out


def cell_interval(
    cell: dict[str, Any] | None, column: str, model_keys: list[str], bootstrap: dict[tuple[str, str], tuple]
) -> tuple[Any, Any, str]:
    """(low, high, source) for one table cell: 'models' (Student t over the row's models: seeds or a fleet's
    models), 'bootstrap' or '' (none)."""
    if cell is None:
        return None, None, ""
    if cell["n"] > 1:
        low, high = t_interval(cell["mean"], cell["std"], cell["n"])
        return low, high, "models"
    if len(model_keys) == 1 and column in INFERENCE_COLUMNS:
        low, high = bootstrap.get((model_keys[0], column), (None, None))
        if low is not None:
            return low, high, "bootstrap"
    return None, None, ""


def annotate_paper_tables(data: ReportData, tables: list[dict[str, Any]]) -> None:
    """Adds ``ci_low``, ``ci_high``, ``ci_source`` to every non-empty cell of the paper tables."""
    bootstrap = bootstrap_intervals(data)
    for table in tables:
        for row in table["rows"]:
            for column, cell in row["cells"].items():
                if cell is not None:
                    low, high, source = cell_interval(cell, column, row["model_keys"], bootstrap)
                    cell.update(ci_low=low, ci_high=high, ci_source=source)
