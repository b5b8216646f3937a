"""Python API for notebooks: open a store, run specs, score attacks, query to Arrow or pandas.

Imports the runner (and so torch) only inside `Store.run`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

    from robmia_db.store.tables import Attack, Experiment, Model, Perturbation

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

    def _rows(self, cls, where: str = "", params: list | None = None, order: str = "") -> list:
        from robmia_db.store.connection import reading
        from robmia_db.store.tables import read_table

        with reading(self.path) as con:
            return read_table(con, cls, f"{where} {order}".strip(), params)

    def models(self, experiment: str | None = None) -> list[Model]:
        """The stored models as typed rows (`tables.Model`; `config` and `package_versions` as dicts).

        Accuracies and other joined columns are in the `v_models` view: `store.df("SELECT * FROM v_models")`.
        """
        from robmia_db.store.tables import Model

        where, params = ("WHERE experiment = ?", [experiment]) if experiment else ("", [])
        return self._rows(Model, where, params, "ORDER BY experiment, model_name, model_key")

    def experiments(self) -> list[Experiment]:
        """The stored experiments as typed rows (`tables.Experiment`), with their latest spec text."""
        from robmia_db.store.tables import Experiment

        return self._rows(Experiment, order="ORDER BY name")

    def perturbations(self, model_key: str | None = None) -> list[Perturbation]:
        """Each model's stored perturbations as typed rows (`tables.Perturbation`)."""
        from robmia_db.store.tables import Perturbation

        where, params = ("WHERE model_key = ?", [model_key]) if model_key else ("", [])
        return self._rows(Perturbation, where, params, "ORDER BY model_key, name")

    def attacks(self) -> list[Attack]:
        """Every scored attack version as typed rows (`tables.Attack`: name, source, resolved params)."""
        from robmia_db.store.tables import Attack

        return self._rows(Attack, order="ORDER BY name, created_at")

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
