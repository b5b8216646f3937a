"""Store layer: read-only queries for users (`robmia-db sql`, the Python API) and result formatting."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from robmia_db.errors import StoreError, safe_text
from robmia_db.store.connection import reading


def run_query(
    db_path: str | Path, sql: str, params: dict[str, Any] | None = None, timeout_s: float | None = None
) -> pa.Table:
    """Run SQL on a read-only connection and return an Arrow table; SQL errors become one-line StoreErrors."""
    with reading(db_path, timeout_s=timeout_s) as con:
        try:
            relation = con.sql(sql, params=params) if params else con.sql(sql)
            if relation is None:
                return pa.table({})
            return relation.to_arrow_table()
        except duckdb.Error as exc:
            raise StoreError(f"query failed: {one_line_error(exc)}") from exc


def one_line_error(exc: BaseException) -> str:
    """DuckDB's message on one line, keeping its hints (`Did you mean "v_signals"?`, candidate columns) and
    turning its `LINE n:` + caret excerpt into `(line n, column c)`."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    parts: list[str] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        where = re.match(r"LINE (\d+): ", line)
        if where and index + 1 < len(lines) and lines[index + 1].lstrip().startswith("^"):
            if line[where.end() :].startswith("..."):  # DuckDB shows a window of a long line
                parts.append(f"(line {where.group(1)})")
            else:
                column = lines[index + 1].index("^") - where.end() + 1
                parts.append(f"(line {where.group(1)}, column {column})")
            index += 2
            continue
        parts.append(line.strip())
        index += 1
    return " ".join(parts) if parts else type(exc).__name__


def check_experiment(db_path: str | Path, experiment: str) -> None:
    """`--experiment NAME` that matches nothing is an error (a silent empty result reads as "no models")."""
    table = run_query(
        db_path,
        "SELECT experiment FROM v_experiments UNION SELECT experiment FROM v_models WHERE experiment IS NOT NULL",
    )
    known = sorted(str(v) for v in table.column("experiment").to_pylist() if v is not None)
    if experiment not in known:
        raise StoreError(
            f"--experiment {experiment}: no such experiment in {db_path} (experiments: {', '.join(known) or 'none'})"
        )


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        return f"{value:.6g}"
    if isinstance(value, list):
        inner = ", ".join(_cell(v) for v in value[:6])
        return f"[{inner}{', ...' if len(value) > 6 else ''}]"
    return safe_text(value)  # a name with terminal escapes is shown, never executed


def format_result(table: pa.Table, fmt: str, max_rows: int = 200) -> str:
    rows = table.to_pylist()
    columns = table.column_names
    if fmt == "json":
        return json.dumps(rows, default=str) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow(
                [json.dumps(v) if isinstance(v, list) else ("" if v is None else v) for v in row.values()]
            )
        return out.getvalue()
    if not columns:
        return "(no result)\n"
    shown = rows[:max_rows]
    cells = [[_cell(row[c]) for c in columns] for row in shown]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in cells:
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    footer = f"({len(rows)} row{'s' if len(rows) != 1 else ''}"
    footer += f", first {max_rows} shown)" if len(rows) > max_rows else ")"
    return "\n".join(lines + [footer]) + "\n"
