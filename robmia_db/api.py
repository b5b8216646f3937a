"""Python API for notebooks: open a store, run specs with progress, score attacks, query to Arrow or pandas.

Imports the runner (and so torch) only inside `Store.run`. Results have short `repr`s and `.to_df()`.
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

    from robmia_db.store.tables import Attack, Experiment, Model, Perturbation

DEFAULT_DB = "robmia.duckdb"


@dataclass(frozen=True)
class ProgressEvent:
    """One step of `Store.run`, as given to a `progress=` callback (the runner's progress snapshot).

    Attributes:
        event: "plan", "started", "resumed" (from a partial checkpoint), "epoch", "signals" or "finished".
        model_name: the model concerned (None for "plan").
        action: for "started" / "finished": "train", "signals" (perturbations added) or "failed".
        epoch: for "epoch" / "resumed", the epoch reached.
        perturbation: for "signals", the perturbation whose signals are being recorded.
        error: for a failed model, its error.
        total, done, running, queued, failed: models of the run with work to do, by state.
        elapsed_s: seconds since the run started; eta_s: estimated seconds left (None while unknown),
            from measured epoch rates or stored timings of similar models.
        models: per model: model_name, model_key, phase, epoch, epochs, resumed_from_epoch, signals_done,
            signals_total, loss.
    """

    event: str
    model_name: str | None = None
    action: str | None = None
    epoch: int | None = None
    perturbation: str | None = None
    error: str | None = None
    total: int = 0
    done: int = 0
    running: int = 0
    queued: int = 0
    failed: int = 0
    elapsed_s: float = 0.0
    eta_s: float | None = None
    models: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_snapshot(cls, event: str, snapshot: dict[str, Any]) -> ProgressEvent:
        known = {f for f in cls.__dataclass_fields__ if f != "event"}
        return cls(event, **{k: v for k, v in snapshot.items() if k in known})


class RunResult:
    """What `Store.run` did: one outcome per model; `failed` lists the failures, `to_df()` all of them."""

    def __init__(self, summary: Any):
        self.summary = summary
        self.outcomes = summary.outcomes
        self.failed = summary.failed

    def __repr__(self) -> str:
        counts = Counter(outcome.action for outcome in self.outcomes)
        parts = [f"{counts[a]} {word}" for a, word in _ACTION_WORDS if counts[a]]
        n = len(self.outcomes)
        return f"RunResult({n} model{'' if n == 1 else 's'}: {', '.join(parts) or 'none'}; store {self.summary.db_path})"

    def to_df(self) -> pd.DataFrame:
        """One row per model: name, key, action, seconds, error and the accuracies measured in this run."""
        import pandas as pd

        rows = []
        for outcome in self.outcomes:
            rows.append(
                {
                    "model_name": outcome.job.model_name,
                    "model_key": outcome.job.model_key,
                    "action": outcome.action,
                    "seconds": outcome.seconds,
                    "error": outcome.error,
                    **outcome.accuracies,
                }
            )
        return pd.DataFrame(rows)


_ACTION_WORDS = (
    ("train", "trained"),
    ("signals", "given new signals"),
    ("skip", "already stored"),
    ("failed", "failed"),
)


class ScoreResult:
    """What `Store.score` did per attack: scored, cached and skipped (attack, model, perturbation) units."""

    def __init__(self, outcomes: list[Any]):
        self.outcomes = outcomes

    def __repr__(self) -> str:
        scored = sum(o.scored for o in self.outcomes)
        cached = sum(o.cached for o in self.outcomes)
        skipped = sum(len(o.skipped) for o in self.outcomes)
        return (
            f"ScoreResult({len(self.outcomes)} attacks: {scored} scored, {cached} cached, {skipped} skipped; "
            "metrics in Store.metrics())"
        )

    def to_df(self) -> pd.DataFrame:
        """One row per attack: name, scored, cached, skipped, seconds and the skip reasons."""
        import pandas as pd

        return pd.DataFrame(
            [
                {
                    "attack": o.attack.name,
                    "scored": o.scored,
                    "cached": o.cached,
                    "skipped": len(o.skipped),
                    "seconds": o.seconds,
                    "skip_reasons": sorted({reason for _, _, reason in o.skipped}),
                }
                for o in self.outcomes
            ]
        )


class ImportedModel:
    """A model written by `Store.import_outputs`; `to_df()` is its `v_models` row."""

    def __init__(self, store: Store, record: Any):
        self.store = store
        self.record = record
        self.model_key: str = record.model_key
        self.model_name: str = record.model_name

    def __repr__(self) -> str:
        record = self.record
        if getattr(record, "action", None) == "already stored":  # the same arrays, under another name
            return (
                f"ImportedModel(already stored as {record.stored_name!r}, key {self.model_key}; "
                f"nothing imported, not renamed to {self.model_name!r})"
            )
        return (
            f"ImportedModel({self.model_name!r}, key {self.model_key}, "
            f"{record.n_members:,} members / {record.n_nonmembers:,} non-members)"
        )

    def to_df(self) -> pd.DataFrame:
        return self.store.df("SELECT * FROM v_models WHERE model_key = $key", {"key": self.model_key})


class Store:
    """A robmia-db store file. Every call opens the file briefly and closes it, so several notebooks,
    the CLI and a running `robmia-db run` can share it."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path or os.environ.get("ROBMIA_DB") or DEFAULT_DB)

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    def query(self, sql: str, params: dict[str, Any] | None = None) -> pa.Table:
        """Read-only SQL to an Arrow table (`$name` placeholders take `params`)."""
        from robmia_db.store.query import run_query

        return run_query(self.path, sql, params)

    def df(self, sql: str, params: dict[str, Any] | None = None) -> pd.DataFrame:
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

    def metrics(self) -> pd.DataFrame:
        """`v_metrics`, by model, attack and perturbation."""
        return self.df("SELECT * FROM v_metrics ORDER BY model_name, attack, perturbation")

    def run(
        self,
        *specs: str | Path,
        progress: bool | Callable[[ProgressEvent], Any] = True,
        threads: int | None = None,
        device: str | None = None,
        dry_run: bool = False,
        executor: str = "local",
        ray_options: dict[str, Any] | None = None,
    ) -> RunResult:
        """Train what the store lacks for these specs and record their signals (as `robmia-db run`).

        Args:
            *specs: spec files.
            progress: True shows the CLI's progress (per model, epoch and perturbation, with an ETA; rich
                renders it in Jupyter too); False is silent; a callable receives a `ProgressEvent` at every
                step.
            threads: torch threads (default: the spec's, else 1).
            device: "auto", "cpu" or "cuda" (default: the spec's runtime.device).
            dry_run: only plan: report what would be trained, train nothing.
            executor: "local" (one model after the other here) or "ray" (one Ray task per model).
            ray_options: for executor="ray", fields of `runner.executor.RayOptions` (address,
                cpus_per_model, gpus_per_model, max_parallel, max_retries, handoff, num_cpus).

        Returns:
            A `RunResult`; `result.failed` lists models that failed (recorded as failed in the store).

        Raises:
            SpecErrors: a spec is invalid or its data is missing; nothing is trained then.
        """
        from robmia_db.errors import RobmiaError
        from robmia_db.runner.executor import RayOptions, run_specs

        options = None
        if ray_options is not None:
            known = set(RayOptions.__dataclass_fields__)
            unknown = sorted(set(ray_options) - known)
            if unknown:
                raise RobmiaError(
                    f"ray_options: unknown {', '.join(unknown)} (known: {', '.join(sorted(known))})"
                )
            options = RayOptions(**ray_options)
        run = functools.partial(
            run_specs, list(specs), self.path, threads=threads, device=device, dry_run=dry_run,
            executor=executor, ray_options=options,
        )  # fmt: skip
        if callable(progress):
            return RunResult(
                run(progress=lambda event, snapshot: progress(ProgressEvent.from_snapshot(event, snapshot)))
            )
        if not progress:
            return RunResult(run())
        from robmia_db.cli.progress import RichReporter

        with RichReporter() as reporter:
            return RunResult(run(reporter=reporter))

    def score(
        self,
        attacks: Sequence[str | Path] | None = None,
        *,
        params: dict[str, Any] | None = None,
        force: bool = False,
        models: Sequence[str] | None = None,
        attack_paths: Sequence[str | Path] | None = None,
        calibration_models: int = 8,
        fleet_memory: str | int | None = None,
    ) -> ScoreResult:
        """Score attacks on every stored model, once per perturbation (as `robmia-db score`).

        Args:
            attacks: attack names or `.sql` / `.py` files; None scores every registered attack.
            params: parameter overrides, e.g. {"floor": 1e-6} (as `--param floor=1e-6`).
            force: recompute even where the cached scores are current.
            models: only these models (keys or names); None for all.
            attack_paths: extra folders of user attacks (as `--attacks DIR`).
            calibration_models: references rescored per target of a reference attack to calibrate its
                threshold by nested leave-one-out (as `--calibration-models`; 0: none).
            fleet_memory: memory a reference attack's fleet may take (as `--fleet-memory`, e.g. "8GB";
                None: $ROBMIA_FLEET_MEMORY, else half the available memory); a larger fleet is scored
                model by model from disk, with the same scores.

        Returns:
            A `ScoreResult`; the numbers are in `Store.metrics()`.
        """
        from robmia_db.attacks.scoring import score_attacks

        outcomes = score_attacks(
            self.path,
            list(attacks) if attacks is not None else None,
            attack_paths=list(attack_paths) if attack_paths is not None else None,
            params=params,
            force=force,
            models=list(models) if models is not None else None,
            calibration_models=calibration_models,
            fleet_memory=fleet_memory,
        )
        return ScoreResult(outcomes)

    def import_outputs(
        self,
        path: str | Path,
        fmt: str,
        name: str | None = None,
        *,
        experiment: str = "imported",
        dataset: str | None = None,
        defense: str | None = None,
    ) -> ImportedModel:
        """Import per-sample outputs made elsewhere as one model (as `robmia-db import`).

        Args:
            path: the file.
            fmt: "ccs2019" (the paper authors' npz) or "npz" (the generic layout in the README).
            name: model name (default: the file's stem).
            experiment: experiment to file the model under.
            dataset: dataset name to record (e.g. "yale").
            defense: defense name to record (e.g. "pgd_at").

        Returns:
            An `ImportedModel`.
        """
        from robmia_db.attacks.importers import import_outputs

        record = import_outputs(
            self.path, path, fmt, name, experiment=experiment, dataset=dataset, defense=defense
        )
        return ImportedModel(self, record)

    def report(
        self,
        output: str | Path | None = None,
        *,
        experiment: str | None = None,
        attacks: Sequence[str] | None = None,
        exclude_attacks: Sequence[str] | None = None,
        static: str | None = None,
    ) -> Path:
        """Write the offline HTML report (as `robmia-db report`) and return its path.

        Args:
            output: page to write (default `reports/<store name>.html`).
            experiment: only this experiment's models.
            attacks: only these attacks.
            exclude_attacks: leave these attacks out.
            static: "png" or "svg" to also write each chart beside the page.
        """
        from robmia_db.report import build_report

        return build_report(
            self.path,
            output,
            experiment=experiment,
            static=static,
            attacks=list(attacks) if attacks is not None else None,
            exclude_attacks=list(exclude_attacks) if exclude_attacks is not None else None,
        )


def open_store(path: str | Path | None = None) -> Store:
    """The store at `path` (default `$ROBMIA_DB`, else `./robmia.duckdb`); nothing is opened until a call."""
    return Store(path)
