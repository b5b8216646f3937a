"""Runner layer: from a loaded dataset and a model's identity to its members and evaluated non-members.

Membership is decided here, once, from seeds in the identity, and recorded per (model, example) in the
store, so the paper's train/test scheme and populations of reference models on random halves both fit.
Numpy only, no torch (`check` imports it to test membership sizes); example ids are row indices of the
full loaded dataset.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from robmia_db.datasets import LoadedDataset, count_dataset
from robmia_db.errors import DatasetError, RobmiaError, SpecError

if TYPE_CHECKING:
    from robmia_db.spec.load import LoadedSpec


@dataclass
class MembershipSplit:
    member_ids: np.ndarray
    nonmember_ids: np.ndarray

    @property
    def evaluated_ids(self) -> np.ndarray:
        return np.concatenate([self.member_ids, self.nonmember_ids])

    @property
    def is_member(self) -> np.ndarray:
        return np.concatenate(
            [np.ones(len(self.member_ids), dtype=bool), np.zeros(len(self.nonmember_ids), dtype=bool)]
        )

    def table(self) -> pa.Table:
        return pa.table(
            {
                "example_id": pa.array(self.evaluated_ids.astype(np.int32)),
                "is_member": pa.array(self.is_member),
            }
        )


def _subset(ids: np.ndarray, size: int | None, rng: np.random.Generator, what: str) -> np.ndarray:
    if size is None:
        return ids
    if size > len(ids):
        raise DatasetError(f"{what}: asked for {size} examples but only {len(ids)} exist")
    return np.sort(rng.choice(ids, size=size, replace=False))


def split_membership(dataset: LoadedDataset, identity: dict[str, Any]) -> MembershipSplit:
    """Members and non-members of one model, reproducible from the identity's seeds alone."""
    return split_origin(dataset.origin_split, identity)


def split_origin(origin_split: np.ndarray, identity: dict[str, Any]) -> MembershipSplit:
    """`split_membership` from the examples' origin splits alone (all it depends on), so that `check` can
    apply the very same rule to split counts without loading any image."""
    data = identity["dataset"]
    membership = identity["membership"]
    seed = int(membership["split_seed"])
    origin = origin_split.astype(str)
    train_pool = np.flatnonzero(origin == "train")
    test_pool = np.flatnonzero(origin == "test")
    pool_rng = np.random.default_rng([seed, 0])
    train_pool = _subset(train_pool, data.get("n_train"), pool_rng, "data.n_train")
    test_pool = _subset(test_pool, data.get("n_test"), pool_rng, "data.n_test")

    if membership["scheme"] == "random_halves":
        population = np.sort(np.concatenate([train_pool, test_pool]))
        population = _subset(
            population, membership.get("population"), np.random.default_rng([seed, 1]), "population"
        )
        order = np.random.default_rng([seed, 2, int(membership["model_index"])]).permutation(len(population))
        half = len(population) // 2
        return MembershipSplit(np.sort(population[order[:half]]), np.sort(population[order[half:]]))

    rng = np.random.default_rng([seed, 3])
    n_members = membership.get("n_members")
    n_nonmembers = membership.get("n_nonmembers")
    if len(test_pool):
        members = _subset(train_pool, n_members, rng, "membership.n_members")
        nonmembers = _subset(test_pool, n_nonmembers, rng, "membership.n_nonmembers")
    else:
        # no official test split (digits): members are a seeded split of the pool, the rest are held out
        shuffled = rng.permutation(train_pool)
        count = n_members if n_members is not None else len(shuffled) // 2
        if count >= len(shuffled):
            raise DatasetError(
                f"membership.n_members: {count} leaves no non-members in the {len(shuffled)} examples"
            )
        members = np.sort(shuffled[:count])
        rest = np.sort(shuffled[count:])
        nonmembers = _subset(rest, n_nonmembers, rng, "membership.n_nonmembers")
    return MembershipSplit(members, nonmembers)


def examples_table(dataset: LoadedDataset, ids: np.ndarray) -> pa.Table:
    return pa.table(
        {
            "example_id": pa.array(ids.astype(np.int32)),
            "label": pa.array(dataset.y[ids].astype(np.int32)),
            "origin_split": pa.array(dataset.origin_split[ids].astype(str)),
        }
    )


@dataclass
class DataCheck:
    """What `check` found for one spec file: one line per dataset read and the errors `run` would raise."""

    path: Path
    lines: list[str] = field(default_factory=list)
    errors: list[SpecError] = field(default_factory=list)


def _spec_error(path: Path, key: str, exc: Exception) -> SpecError:
    message = str(exc)
    head = message.split(":", 1)[0]
    if re.fullmatch(
        r"[a-z_]+(\.[a-z_]+)+", head
    ):  # the message names its own key (membership.n_members: ...)
        return SpecError(path, None, message)
    return SpecError(path, key, message)


def check_data(loaded: list[LoadedSpec]) -> list[DataCheck]:
    """Count each spec's dataset (file headers or names; see `count_dataset`) and apply every model's
    membership rule to those counts, so `check` refuses what `run` would refuse, without loading images."""
    counted: dict[tuple, dict[str, int] | Exception] = {}
    checks = []
    for item in loaded:
        check = DataCheck(item.path)
        checks.append(check)
        sizes: dict[tuple, set[tuple[int, int]]] = {}
        for job in item.jobs:
            options = job.identity["dataset"].get("options") or {}
            key = (job.dataset, job.data_root, tuple(sorted(options.items())))
            if key not in counted:
                try:
                    counted[key] = count_dataset(job.dataset, job.data_root, **options)
                except RobmiaError as exc:
                    counted[key] = exc
            counts = counted[key]
            if isinstance(counts, Exception):
                check.errors.append(_spec_error(item.path, "data.dataset", counts))
                break
            origin = np.array(["train"] * counts.get("train", 0) + ["test"] * counts.get("test", 0))
            try:
                split = split_origin(origin, job.identity)
            except RobmiaError as exc:
                check.errors.append(_spec_error(item.path, "membership", exc))
                break
            sizes.setdefault(key, set()).add((len(split.member_ids), len(split.nonmember_ids)))
        for key, pairs in sizes.items():
            counts = counted[key]
            assert not isinstance(counts, Exception)
            splits = ", ".join(f"{n:,} {split}" for split, n in sorted(counts.items(), reverse=True))
            members = "; ".join(f"{m:,} members / {n:,} non-members" for m, n in sorted(pairs))
            check.lines.append(f"data: {key[0]} ({splits}): {members} per model")
    return checks
