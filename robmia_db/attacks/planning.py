"""Attacks layer: what to score. Reads the store's state, finds each model's reference models (its fleet
minus itself) and plans one unit per (attack, model, perturbation).

Reference models share the training recipe (everything but the seed) and differ in their membership draw;
the membership of a target never reaches the rows an attack sees for it (see `sandbox`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import duckdb

from robmia_db.attacks.definition import KIND_NEEDS, AttackDefinition
from robmia_db.spec.identity import canonical_json

NO_REFERENCES = (
    "needs reference models (same dataset and training recipe, independent membership, "
    "e.g. membership.scheme = 'random_halves'); none in the store"
)


@dataclass
class ScoreUnit:
    """One (attack, model, perturbation) to score, with the perturbations of other kinds it reads."""

    model_key: str
    perturbation: str
    inputs: dict[str, str]  # need kind -> perturbation name ("signal" for single-signal attacks)
    signal_keys: list[str]
    references: list[str] = field(default_factory=list)
    # set on a nested leave-one-out calibration run: the target whose threshold these scores calibrate
    calibrates: str | None = None

    def inputs_key(self, reference_signal_keys: list[str]) -> str:
        payload = json.dumps(
            {"signals": sorted(self.signal_keys), "references": sorted(reference_signal_keys)}
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class StoreState:
    models: dict[str, dict[str, Any]]
    perturbations: dict[str, list[dict[str, Any]]]  # model_key -> rows (name, kind, signal_key, eps)
    existing: dict[tuple[str, str, str], str]  # (attack_key, model_key, perturbation) -> inputs_key


def read_state(con: duckdb.DuckDBPyConnection) -> StoreState:
    models = {
        row["model_key"]: row
        for row in con.sql(
            "SELECT model_key, model_name, dataset, config, status FROM v_models WHERE status = 'completed'"
        )
        .to_arrow_table()
        .to_pylist()
    }
    perturbations: dict[str, list[dict[str, Any]]] = {}
    for row in (
        con.sql(
            "SELECT model_key, perturbation, kind, signal_key, eps FROM v_perturbations "
            "ORDER BY model_key, perturbation"
        )
        .to_arrow_table()
        .to_pylist()
    ):
        perturbations.setdefault(row["model_key"], []).append(row)
    existing = {
        (r[0], r[1], r[2]): r[3]
        for r in con.execute("SELECT attack_key, model_key, perturbation, inputs_key FROM metrics").fetchall()
    }
    return StoreState(models, perturbations, existing)


def recipe_and_membership(config_json: str | None) -> tuple[str | None, str | None]:
    """Reference models share the training recipe (all but the seed) and differ in membership."""
    if not config_json:
        return None, None
    config = json.loads(config_json)
    if config and "imported_from" in config:
        # imported outputs: same dataset and defense label, a different membership draw
        recipe = config.get("recipe")
        if not recipe or not recipe.get("dataset"):
            return None, None
        return canonical_json({"imported": recipe}), config.get("membership_sha256")
    if not config or "training" not in config:
        return None, None
    membership = config.get("membership", {})
    training = {k: v for k, v in config["training"].items() if k != "seed"}
    recipe = {
        "dataset": config.get("dataset"),
        "model": config.get("model"),
        "training": training,
        "scheme": membership.get("scheme"),
        "population": membership.get("population"),
    }
    return canonical_json(recipe), canonical_json(membership)


def recipe_keys(state: StoreState) -> dict[str, str]:
    """model_key -> a short hash of its training recipe (models without one are left out): the fleets."""
    keys = {}
    for key, row in state.models.items():
        recipe, _ = recipe_and_membership(row["config"])
        if recipe is not None:
            keys[key] = hashlib.sha256(recipe.encode()).hexdigest()[:16]
    return keys


def reference_models(state: StoreState) -> dict[str, list[str]]:
    """For each model, the other stored models trained the same way on an independent membership draw."""
    keys = {key: recipe_and_membership(row["config"]) for key, row in state.models.items()}
    references: dict[str, list[str]] = {}
    for key, (recipe, membership) in keys.items():
        references[key] = sorted(
            other
            for other, (other_recipe, other_membership) in keys.items()
            if other != key
            and recipe is not None
            and other_recipe == recipe
            and other_membership != membership
        )
    return references


def plan_units(
    attack: AttackDefinition, state: StoreState, references: dict[str, list[str]], model_keys: set[str] | None
) -> tuple[list[ScoreUnit], list[tuple[str, str | None, str]]]:
    units: list[ScoreUnit] = []
    skipped: list[tuple[str, str | None, str]] = []
    for model_key, model in sorted(state.models.items(), key=lambda kv: kv[1]["model_name"]):
        if model_keys is not None and model_key not in model_keys:
            continue
        rows = state.perturbations.get(model_key, [])
        by_kind: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_kind.setdefault(row["kind"], []).append(row)
        target_kind = attack.signal_kind
        if target_kind is None:
            candidates = rows
        else:
            missing = [k for k in attack.needs if k in KIND_NEEDS and k not in by_kind]
            if missing:
                skipped.append((model["model_name"], None, f"needs {missing[0]} signals; the model has none"))
                continue
            candidates = by_kind[target_kind]
        for row in candidates:
            inputs = {"signal": row["perturbation"]} if target_kind is None else {}
            signal_keys = [row["signal_key"]]
            for kind in attack.needs:
                if kind in KIND_NEEDS:
                    chosen = row if kind == target_kind else by_kind[kind][0]
                    inputs[kind] = chosen["perturbation"]
                    if chosen is not row:
                        signal_keys.append(chosen["signal_key"])
            unit = ScoreUnit(model_key, row["perturbation"], inputs, signal_keys)
            if attack.needs_reference:
                unit.references = [
                    ref
                    for ref in references.get(model_key, [])
                    if all(
                        any(p["perturbation"] == name for p in state.perturbations.get(ref, []))
                        for name in inputs.values()
                    )
                ]
                if not unit.references:
                    skipped.append((model["model_name"], row["perturbation"], NO_REFERENCES))
                    continue
            units.append(unit)
    return units, skipped


def signal_keys_of(state: StoreState, model_key: str, names: list[str]) -> list[str]:
    return [p["signal_key"] for p in state.perturbations.get(model_key, []) if p["perturbation"] in names]
