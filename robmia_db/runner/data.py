"""Runner layer: from a loaded dataset and a model's identity to its members and evaluated non-members.

Membership is decided here, once, from seeds in the identity, and recorded per (model, example) in the
store, so the paper's train/test scheme and populations of reference models on random halves both fit.
Numpy only; example ids are row indices of the full loaded dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from robmia_db.datasets import LoadedDataset
from robmia_db.errors import DatasetError


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
    data = identity["dataset"]
    membership = identity["membership"]
    seed = int(membership["split_seed"])
    origin = dataset.origin_split.astype(str)
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
