"""Python API for notebooks: open a store, run specs, score attacks, query to Arrow or pandas.

Imports the runner (and so torch) only inside `Store.run`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

DEFAULT_DB = "robmia.duckdb"


class Store:
    """A robmia-db store file. Every call opens the file briefly and closes it, so several notebooks,
    the CLI and a running `robmia-db run` can share it."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path or os.environ.get("ROBMIA_DB") or DEFAULT_DB)

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    def query(self, sql: str, params: dict[str, Any] | None = None) -> pa.Table:
        """Read-only SQL to an Arrow table."""
        from robmia_db.store.query import run_query

        return run_query(self.path, sql, params)

    def df(self, sql: str, params: dict[str, Any] | None = None):
        """Read-only SQL to a pandas DataFrame."""
        return self.query(sql, params).to_pandas()

    def models(self):
        return self.df("SELECT * EXCLUDE (config) FROM v_models ORDER BY experiment, model_name")

    def metrics(self):
        return self.df("SELECT * FROM v_metrics ORDER BY model_name, attack, perturbation")

    def run(self, *specs: str | Path, threads: int | None = None, device: str | None = None):
        """Train what the store lacks for these specs; returns the run summary (see `summary.failed`)."""
        from robmia_db.runner.executor import run_specs

        return run_specs(list(specs), self.path, threads=threads, device=device)

    def score(self, attacks: list[str] | None = None, force: bool = False, **kwargs: Any):
        from robmia_db.attacks.scoring import score_attacks

        return score_attacks(self.path, attacks, force=force, **kwargs)

    def import_outputs(self, path: str | Path, fmt: str, name: str | None = None, **kwargs: Any):
        from robmia_db.attacks.importers import import_outputs

        return import_outputs(self.path, path, fmt, name, **kwargs)

    def report(self, output: str | Path | None = None, **kwargs: Any) -> Path:
        from robmia_db.report import build_report

        return build_report(self.path, output, **kwargs)


def open_store(path: str | Path | None = None) -> Store:
    return Store(path)
