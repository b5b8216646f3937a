"""Store layer: the DuckDB file (schema, migrations, ingest, views). May import `spec` and `errors`; never torch."""

from __future__ import annotations

from robmia_db.store.connection import checkpoint_dir, connect, reading, run_lock, writing
from robmia_db.store.query import format_result, run_query
from robmia_db.store.schema import PUBLIC_VIEWS, SCHEMA_VERSION

__all__ = [
    "PUBLIC_VIEWS",
    "SCHEMA_VERSION",
    "checkpoint_dir",
    "connect",
    "format_result",
    "reading",
    "run_lock",
    "run_query",
    "writing",
]
