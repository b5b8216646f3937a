"""Attacks layer: `calibrated_accuracy` for attacks that read reference models, by nested leave-one-out.

The calibrated threshold of a target T is the threshold best on reference models' own scores. For an
attack that reads reference models, a reference R's stored scores were computed with T among R's
references, T's membership included, so a threshold tuned on them would carry T's labels into T's number.
Here each calibration reference R of T is scored again with the fleet minus R and minus T (nested
leave-one-out): nothing of T reaches the threshold, and R's scores are computed from M - 2 references where
T's own came from M - 1 (the same attack, one reference fewer).

Rescoring every reference for every target costs M - 1 extra attack runs per target, so a target is
calibrated on `k` of its references (`score --calibration-models`, default 8), chosen by a hash of the two
model keys: a fixed choice that depends on neither model's labels.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from robmia_db.attacks.metrics import reference_metrics
from robmia_db.attacks.planning import ScoreUnit

DEFAULT_CALIBRATION_MODELS = 8
OFF_NOTE = (
    "not computed: nested leave-one-out calibration was switched off (score --calibration-models 0); "
    "see decision_accuracy"
)
TOO_FEW_NOTE = (
    "not computed: nested leave-one-out needs two reference models or more (a reference rescored without "
    "this model would have none); see decision_accuracy"
)
CHANCE_NOTE = "no threshold beats chance on the reference models' nested leave-one-out scores"


def calibration_models(unit: ScoreUnit, k: int) -> list[str]:
    """The (at most k) references of `unit` whose nested scores calibrate it: a fixed, label-free choice."""
    if k <= 0 or len(unit.references) < 2:  # a reference rescored without T needs one model left
        return []

    def rank(reference: str) -> str:
        return hashlib.sha256(f"{unit.model_key}\0{reference}".encode()).hexdigest()

    return sorted(sorted(unit.references, key=rank)[:k])


def calibration_units(unit: ScoreUnit, k: int) -> list[ScoreUnit]:
    """One unit per calibration reference R of `unit`: R as the target, the fleet minus R and minus T as its
    references."""
    return [
        replace(
            unit,
            model_key=reference,
            signal_keys=[],
            references=[r for r in unit.references if r != reference],
            calibrates=unit.model_key,
        )
        for reference in calibration_models(unit, k)
    ]


@dataclass
class NestedCalibration:
    """Pools each target's calibration references' nested scores with their own membership, one
    (target, perturbation) at a time, and keeps only the threshold found on them."""

    k: int
    thresholds: dict[tuple[str, str], tuple[float | None, int | None, str | None]] = field(
        default_factory=dict
    )
    _open: tuple[str, str] | None = None
    _scores: list[np.ndarray] = field(default_factory=list)
    _members: list[np.ndarray] = field(default_factory=list)
    _models: int = 0

    def plan(self, units: list[ScoreUnit]) -> None:
        """Record why the targets that cannot be calibrated are not (before their runs)."""
        for unit in units:
            if self.k and not calibration_models(unit, self.k):
                self.thresholds[(unit.model_key, unit.perturbation)] = (None, None, TOO_FEW_NOTE)

    def add(self, unit: ScoreUnit, scores: pa.Table, reference_rows: pa.Table) -> None:
        """`scores` of calibration unit `unit` (model_key, example_id, score), labelled from the reference
        rows of its model (the fleet's rows, which hold the references' membership)."""
        key = (str(unit.calibrates), unit.perturbation)
        if key != self._open:
            self.finish()
            self._open = key
        mine = reference_rows.filter(
            pc.and_(
                pc.equal(reference_rows["model_key"], unit.model_key),
                pc.equal(reference_rows["perturbation"], unit.perturbation),
            )
        )
        ids = mine["example_id"].to_numpy(zero_copy_only=False)
        members = mine["is_member"].to_numpy(zero_copy_only=False).astype(bool)
        order = np.argsort(ids, kind="stable")
        ids, members = ids[order], members[order]
        scored_ids = scores["example_id"].to_numpy(zero_copy_only=False)
        position = np.searchsorted(ids, scored_ids)
        if (
            len(ids) == 0
            or np.any(position >= len(ids))
            or np.any(ids[np.minimum(position, len(ids) - 1)] != scored_ids)
        ):
            raise AssertionError(f"calibration scores of {unit.model_key} name examples it does not have")
        self._scores.append(scores["score"].to_numpy(zero_copy_only=False).astype(np.float64))
        self._members.append(members[position])
        self._models += 1

    def finish(self) -> None:
        """Turn the open target's pooled scores into its threshold."""
        if self._open is None:
            return
        threshold: float | None = None
        note: str | None = None
        found = reference_metrics(np.concatenate(self._scores), np.concatenate(self._members))["threshold"]
        if found is None:
            note = CHANCE_NOTE
        else:
            threshold = float(found)
        self.thresholds[self._open] = (threshold, self._models, note)
        self._open, self._scores, self._members, self._models = None, [], [], 0
