"""Store layer: `robmia-db export`, one Parquet file per public view, for tools that do not read DuckDB.

Each view is streamed by DuckDB's own `COPY (SELECT ...) TO` (per-sample views can hold tens of millions
of rows; nothing passes through Python), into a temporary file renamed into place when complete, so an
interrupted export never leaves a truncated file under a view's name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from robmia_db.errors import StoreError
from robmia_db.store.connection import reading
from robmia_db.store.schema import PUBLIC_VIEWS


@dataclass
class ExportedView:
    view: str
    path: Path
    rows: int
    bytes: int


def _select_list(con, view: str) -> str:
    columns = con.execute(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ? "
        "ORDER BY ordinal_position",
        [view],
    ).fetchall()
    # Parquet has no 128-bit integer: DuckDB would write HUGEINT as DOUBLE and round the exact AUC
    # numerators; DECIMAL(38, 0) keeps every digit
    return ", ".join(
        f'CAST("{name}" AS DECIMAL(38, 0)) AS "{name}"' if kind == "HUGEINT" else f'"{name}"'
        for name, kind in columns
    )


def export_views(
    db_path: str | Path, out_dir: str | Path, views: list[str] | tuple[str, ...] | None = None
) -> list[ExportedView]:
    """Write `<out_dir>/<view>.parquet` for each public view (all by default); returns what was written."""
    out_dir = Path(out_dir)
    chosen = list(views) if views else list(PUBLIC_VIEWS)
    unknown = [v for v in chosen if v not in PUBLIC_VIEWS]
    if unknown:
        raise StoreError(f"export: unknown view(s) {', '.join(unknown)} (known: {', '.join(PUBLIC_VIEWS)})")
    if out_dir.exists() and not out_dir.is_dir():
        raise StoreError(f"export: {out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with reading(db_path) as con:
        for view in chosen:
            target = out_dir / f"{view}.parquet"
            tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
            quoted = str(tmp).replace("'", "''")
            try:
                rows = con.execute(
                    f"COPY (SELECT {_select_list(con, view)} FROM {view}) TO '{quoted}' "
                    "(FORMAT parquet, COMPRESSION zstd)"
                ).fetchall()[0][0]
            except Exception as exc:
                tmp.unlink(missing_ok=True)
                raise StoreError(f"export: {view}: {str(exc).splitlines()[0]}") from exc
            os.replace(tmp, target)
            written.append(ExportedView(view, target, int(rows), target.stat().st_size))
    return written
