"""Report layer: the paper table and the attack leaderboard with 95 % intervals, as CSV or LaTeX (booktabs).

Intervals, as on the page: a configuration with several seeds gets the Student t interval of the mean over
its seeds; a single model gets the stratified bootstrap interval of its metric (v_metrics ``*_ci_*``). The
``interval`` column says which. Values are percentages with two decimals in LaTeX, full precision in CSV.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from robmia_db.errors import RobmiaError
from robmia_db.report.intervals import bootstrap_intervals, cell_interval
from robmia_db.report.queries import ReportData, collect_report_data
from robmia_db.report.tables import PAPER_COLUMNS, paper_tables, paper_values

LEADERBOARD_METRICS = (
    ("balanced_accuracy", "balanced acc."),
    ("auc", "AUC"),
    ("tpr_at_fpr_1e3", "TPR@0.1%FPR"),
    ("tpr_at_fpr_1e2", "TPR@1%FPR"),
)


def paper_rows(data: ReportData) -> list[dict[str, Any]]:
    """One row per dataset x configuration: each paper column's mean, sd, interval and its source."""
    values = paper_values(data)
    bootstrap = bootstrap_intervals(data)
    out = []
    for table in paper_tables(data, values):
        for row in table["rows"]:
            record: dict[str, Any] = {
                "dataset": table["dataset"], "defense": row["defense"], "detail": row["detail"],
                "n_models": row["n_models"], "n_seeds": row["n_seeds"],
            }  # fmt: skip
            for column, _ in PAPER_COLUMNS:
                cell = row["cells"][column]
                mean = None if cell is None else cell["mean"]
                sd = None if cell is None else cell["std"]
                low, high, source = cell_interval(cell, column, row["model_keys"], bootstrap)
                record |= {
                    column: mean, f"{column}_sd": sd, f"{column}_ci_low": low, f"{column}_ci_high": high,
                    f"{column}_interval": source,
                }  # fmt: skip
            out.append(record)
    return out


def leaderboard_rows(data: ReportData) -> list[dict[str, Any]]:
    names = {m["model_key"]: m for m in data.models}
    rows = []
    for r in data.metrics:
        model = names[r["model_key"]]
        record = {
            "dataset": model["dataset"], "model_name": r["model_name"], "defense": model["defense"],
            "eps": model["eps"], "seed": model["seed"], "attack": r["attack"], "perturbation": r["perturbation"],
            "kind": r["kind"],
        }  # fmt: skip
        for metric, _ in LEADERBOARD_METRICS:
            record[metric] = r[metric]
            record[f"{metric}_ci_low"] = r.get(f"{metric}_ci_low")
            record[f"{metric}_ci_high"] = r.get(f"{metric}_ci_high")
        record["advantage"] = r["advantage"]
        rows.append(record)
    return rows


def _csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as handle:
        if not rows:
            handle.write("")
            return
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
    "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}  # fmt: skip


def latex_escape(text: Any) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def _pct(value: Any) -> str:
    return "--" if value is None or not math.isfinite(float(value)) else f"{100 * float(value):.2f}"


def _cell(value: Any, low: Any, high: Any) -> str:
    if value is None:
        return "--"
    if low is None or high is None:
        return _pct(value)
    return f"{_pct(value)} {{\\scriptsize [{_pct(low)}, {_pct(high)}]}}"


def _latex_table(
    header: list[str], body: list[list[str]], caption: str, groups: list[int], n_left: int
) -> str:
    spec = "l" * n_left + "r" * (len(header) - n_left)
    lines = [
        "% requires \\usepackage{booktabs}",
        "\\begin{table}[t]",
        "\\centering",
        f"\\caption{{{caption}}}",
        f"\\begin{{tabular}}{{{spec}}}",
        "\\toprule",
        " & ".join(header) + " \\\\",
        "\\midrule",
    ]
    for i, row in enumerate(body):
        if i in groups and i:
            lines.append("\\midrule")
        lines.append(" & ".join(row) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
    return "\n".join(lines)


def paper_latex(rows: list[dict[str, Any]]) -> str:
    columns = [c for c, _ in PAPER_COLUMNS if any(r[c] is not None for r in rows)]
    labels = {
        c: latex_escape(label.replace("<sub>", "_").replace("</sub>", "")) for c, label in PAPER_COLUMNS
    }
    labels |= {"i_b": "$I_B$", "i_a": "$I_A$", "i_v": "$I_V$"}
    header = ["dataset", "defense", "models"] + [labels[c] for c in columns]
    body, groups, last = [], [], None
    for r in rows:
        if r["dataset"] != last:
            groups.append(len(body))
            last = r["dataset"]
        name = r["defense"] + (f" ({r['detail']})" if r["detail"] else "")
        body.append(
            [latex_escape(r["dataset"]), latex_escape(name), str(r["n_models"])]
            + [_cell(r[c], r[f"{c}_ci_low"], r[f"{c}_ci_high"]) for c in columns]
        )
    caption = (
        "Accuracies and inference accuracies (\\%) of the confidence attack, with 95\\% intervals: over the "
        "configuration's models (its seeds, or a fleet's models; Student t) where it has several, else the "
        "stratified bootstrap over examples."
    )
    return _latex_table(header, body, caption, groups, n_left=2)


def leaderboard_latex(rows: list[dict[str, Any]]) -> str:
    header = ["model", "attack", "perturbation"] + [latex_escape(label) for _, label in LEADERBOARD_METRICS]
    body = [
        [latex_escape(r["model_name"]), latex_escape(r["attack"]), latex_escape(r["perturbation"])]
        + [_cell(r[m], r[f"{m}_ci_low"], r[f"{m}_ci_high"]) for m, _ in LEADERBOARD_METRICS]
        for r in rows
    ]
    groups = [i for i, r in enumerate(rows) if i == 0 or r["model_name"] != rows[i - 1]["model_name"]]
    caption = "Every attack and perturbation (\\%), with stratified bootstrap 95\\% intervals over examples."
    return _latex_table(header, body, caption, groups, n_left=3)


def export_tables(
    db_path: str | Path,
    fmt: str,
    output_dir: str | Path,
    experiment: str | None = None,
    attacks: list[str] | None = None,
    exclude_attacks: list[str] | None = None,
) -> list[Path]:
    """Write paper_table and leaderboard as ``.csv`` or ``.tex`` into `output_dir`; returns the paths."""
    if fmt not in ("csv", "latex"):
        raise RobmiaError(f"--tables must be csv or latex (got {fmt!r})")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise RobmiaError(f"-o {out}: with --tables, -o is a folder, and this is a file")
    data = collect_report_data(db_path, experiment, attacks, exclude_attacks)
    paper, board = paper_rows(data), leaderboard_rows(data)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        paths = [out / "paper_table.csv", out / "leaderboard.csv"]
        _csv(paths[0], paper)
        _csv(paths[1], board)
    else:
        paths = [out / "paper_table.tex", out / "leaderboard.tex"]
        paths[0].write_text(paper_latex(paper))
        paths[1].write_text(leaderboard_latex(board))
    return paths
