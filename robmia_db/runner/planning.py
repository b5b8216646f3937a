"""Runner layer: what a run will do, decided before any training.

Every job's dataset, membership rule and architecture are checked first (`preflight`); the store's state
then gives each model its action (train, add signals, skip), with `--retrain` and the size confirmation on
top; a stored model whose name a spec now gives to another key is reported, with what differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from robmia_db.datasets import LoadedDataset, load_dataset
from robmia_db.errors import RobmiaError, SpecError, SpecErrors, UnfinishedStoreError
from robmia_db.runner.data import split_membership
from robmia_db.runner.models import build_model
from robmia_db.spec import LoadedSpec, ModelJob
from robmia_db.spec.identity import config_differences
from robmia_db.store import ingest
from robmia_db.store.connection import writing


class DatasetCache:
    """Each dataset is read once per run, whatever the number of models that use it."""

    def __init__(self) -> None:
        self._cache: dict[tuple, LoadedDataset] = {}
        self._checksums: dict[int, str] = {}

    def checksum(self, dataset: LoadedDataset) -> str:
        """sha256 of what was read, once per dataset per run (recorded with every model trained on it)."""
        if id(dataset) not in self._checksums:
            self._checksums[id(dataset)] = dataset.checksum()
        return self._checksums[id(dataset)]

    def get(self, job: ModelJob) -> LoadedDataset:
        options = job.identity["dataset"].get("options") or {}
        key = (job.dataset, job.data_root, tuple(sorted(options.items())))
        if key not in self._cache:
            self._cache[key] = load_dataset(job.dataset, job.data_root, **options)
        return self._cache[key]


def _located(path: Path, key: str, exc: Exception) -> SpecError:
    """A SpecError under `key`, unless the message already names its own dotted key."""
    message = str(exc)
    head = message.split(":", 1)[0]
    top = key.split(".")[0]
    # a dotted key of this section (`data.root`), not a path that merely starts with its name (`data/x.npz`)
    if (head == top or head.startswith((top + ".", top + "["))) and " " not in head:
        return SpecError(path, None, message)
    return SpecError(path, key, message)


def preflight(loaded: list[LoadedSpec], datasets: DatasetCache) -> None:
    """Check what validation of the TOML alone cannot: data present, architectures build, bounds apply."""
    errors: list[SpecError] = []
    for item in loaded:
        seen: set[tuple] = set()
        for job in item.jobs:
            try:
                dataset = datasets.get(job)
            except RobmiaError as exc:
                errors.append(SpecError(item.path, "data.dataset", str(exc)))
                break
            try:
                split_membership(dataset, job.identity)
            except RobmiaError as exc:
                errors.append(_located(item.path, "membership", exc))
                break
            arch_key = (job.arch, job.width)
            if arch_key in seen:
                continue
            seen.add(arch_key)
            try:
                with torch.device("meta"):
                    model = build_model(
                        job.arch,
                        dataset.input_shape,
                        dataset.n_classes,
                        job.width,
                        job.identity["model"]["options"],
                    )
            except RobmiaError as exc:
                errors.append(_located(item.path, "model", exc))
                continue
            except TypeError as exc:
                errors.append(_located(item.path, "model.options", exc))
                continue
            if any(p.kind == "verified" for p in job.perturbations):
                try:
                    from robmia_db.runner import bounds

                    bounds.check_supported(model)
                except RobmiaError as exc:
                    errors.append(SpecError(item.path, "signals", f"verified signals: {exc}"))
    if errors:
        raise SpecErrors(errors)


def plan_actions(jobs: list[ModelJob], existing: dict[str, dict[str, Any]]) -> dict[str, str]:
    actions = {}
    for job in jobs:
        state = existing.get(job.model_key)
        if state is None or state["status"] != "completed":
            actions[job.model_key] = "train"
        elif any(p.signal_key not in state["signal_keys"] for p in job.perturbations):
            actions[job.model_key] = "signals"
        else:
            actions[job.model_key] = "skip"
    return actions


@dataclass
class NameChange:
    """A name that now maps to a different model key than a stored model of that name (an edited spec)."""

    model_name: str
    model_key: str
    stored_key: str
    differences: list[str]

    def describe(self) -> str:
        what = "; ".join(self.differences) or "the same settings (the training code version differs)"
        return (
            f"{self.model_name} now names model {self.model_key}; the stored model {self.stored_key} keeps "
            f"that name too. Differences: {what}"
        )


def stored_state(
    db_path: Path, jobs: list[ModelJob], write: bool = False
) -> tuple[dict[str, dict[str, Any]], list[NameChange]]:
    """What the store holds of these jobs, and stored models whose name a job now gives another key.

    `write` (under the run lock) also finishes a store whose creation was interrupted; without it such a
    store holds nothing yet."""
    if not db_path.exists():
        return {}, []
    from robmia_db.store.connection import reading

    try:
        with (writing if write else reading)(db_path) as con:
            existing = ingest.existing_models(con, [job.model_key for job in jobs])
            clashes = ingest.same_name_models(con, [(job.model_name, job.model_key) for job in jobs])
    except UnfinishedStoreError:
        return {}, []
    identities = {job.model_key: job.identity for job in jobs}
    changes = [
        NameChange(name, new, old, config_differences(config, identities[new]))
        for name, new, old, config in clashes
    ]
    return existing, changes


def training_epochs(jobs: list[ModelJob], actions: dict[str, str]) -> int:
    """The plan's cost in training epochs (each over its model's members), shown before a run starts."""
    return sum(
        int(job.identity["training"]["epochs"]) for job in jobs if actions.get(job.model_key) == "train"
    )


def confirm_size(jobs: list[ModelJob], actions: dict[str, str], limit: int | None) -> None:
    to_train = sum(1 for action in actions.values() if action == "train")
    if limit is not None and to_train > limit:
        raise RobmiaError(
            f"{to_train:,} models to train ({training_epochs(jobs, actions):,} training epochs), more than "
            f"{limit:,}: rerun with --yes to train them all, or narrow the sweep (see `robmia-db check --expand`)"
        )


def retrain_keys(jobs: list[ModelJob], wanted: list[str]) -> set[str]:
    keys: set[str] = set()
    for name in wanted:
        matches = {job.model_key for job in jobs if name in (job.model_key, job.model_name)}
        if not matches:
            raise RobmiaError(f"--retrain {name}: no model of the given specs has this key or name")
        keys |= matches
    return keys


def plan_run(jobs, existing, retrain) -> dict[str, str]:
    actions = plan_actions(jobs, existing)
    actions.update({key: "train" for key in retrain})
    return actions
