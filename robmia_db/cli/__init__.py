"""CLI layer: `robmia-db` commands. Imports the other layers lazily, inside each command."""

from __future__ import annotations

from robmia_db.cli import core_cmd  # noqa: F401  (check, run, sql, models)
from robmia_db.cli.base import main

for _module in ("attacks_cmd", "report_cmd", "data_cmd", "stats_cmd", "store_cmd"):
    try:
        __import__(f"robmia_db.cli.{_module}")
    except ModuleNotFoundError as _exc:
        if _exc.name != f"robmia_db.cli.{_module}":
            raise

__all__ = ["main"]
