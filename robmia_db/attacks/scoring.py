"""Attacks layer: score attacks on every stored model, once per perturbation, cached by content.

A score is keyed by the attack's content key (name, normalised source, resolved params) and the signal keys
it was computed from (`inputs_key`): editing an attack re-scores it, new signals re-score what used them,
and nothing else re-runs. Attack code runs in a sandbox (`sandbox`) that never holds the target's labels;
everything one attack run produces is written in one transaction (`results`).

Attacks scored once with `--attack FILE` or `--param` keep their source in the store and are re-scored by
a plain `score` on models added later; a parameter variant is its own attack, `name[key=value]`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import duckdb

from robmia_db.attacks.definition import AttackDefinition, parse_attack
from robmia_db.attacks.fleet_disk import fleet_budget
from robmia_db.attacks.intervals import DEFAULT_RESAMPLES
from robmia_db.attacks.nested_calibration import DEFAULT_CALIBRATION_MODELS, NestedCalibration
from robmia_db.attacks.planning import (
    ScoreUnit,
    StoreState,
    plan_units,
    read_state,
    recipe_keys,
    reference_models,
    signal_keys_of,
)
from robmia_db.attacks.registry import AttackRegistry, load_registry
from robmia_db.attacks.relations import batches, close_relations, open_relations
from robmia_db.attacks.results import ScoreStage, write_results
from robmia_db.attacks.sandbox import (
    DEFAULT_MEMORY_LIMIT,
    DEFAULT_TIMEOUT_S,
    close_sandbox,
    open_sandbox,
    run_batch,
)
from robmia_db.errors import AttackDefinitionError, RobmiaError
from robmia_db.store.connection import reading

__all__ = ["AttackOutcome", "ScoreUnit", "StoreState", "reference_models", "score_attacks"]


@dataclass
class AttackOutcome:
    attack: AttackDefinition
    scored: int = 0
    cached: int = 0
    skipped: list[tuple[str, str | None, str]] = field(
        default_factory=list
    )  # model_name, perturbation, reason
    seconds: float = 0.0


class ScoreReporter(Protocol):
    def attack_started(self, attack: AttackDefinition, n_units: int) -> None: ...
    # after each scored batch: how many of the attack's units have their scores (nested calibration runs
    # not counted), for progress on long attacks; nothing is stored before `attack_finished`
    def units_scored(self, attack: AttackDefinition, done: int, total: int) -> None: ...
    def attack_finished(self, outcome: AttackOutcome) -> None: ...


class SilentScoreReporter:
    def attack_started(self, attack, n_units):
        pass

    def units_scored(self, attack, done, total):
        pass

    def attack_finished(self, outcome):
        pass


def _is_builtin_row(origin: str | None, source_path: str | None) -> bool:
    if origin is not None:
        return origin == "builtin"
    # stores scored before `origin` was recorded: built-ins live in robmia_db/attacks/builtin/
    parent = Path(source_path or "").parent
    return parent.name == "builtin" and parent.parent.name == "attacks"


def _stored_attacks(con: duckdb.DuckDBPyConnection, registry: AttackRegistry) -> list[AttackDefinition]:
    """The newest stored version of every attack the registry does not provide under its name.

    A variant of an attack the registry has (`confidence[temperature=2]`) runs the registry's current code
    with the stored parameters; a user attack runs its stored source (the file may be gone). Stored
    built-ins that no longer exist are not revived.
    """
    rows = con.execute(
        """SELECT name, coalesce(base_name, name), language, source, source_path, params, origin FROM attacks
           QUALIFY row_number() OVER (PARTITION BY name ORDER BY created_at DESC, attack_key) = 1
           ORDER BY name"""
    ).fetchall()
    found = []
    for name, base, language, source, source_path, params_json, origin in rows:
        if name in registry.attacks:
            continue
        params = json.loads(params_json or "{}")
        if base in registry.attacks:
            attack = registry.attacks[base]
        elif _is_builtin_row(origin, source_path):
            continue
        else:
            suffix = ".py" if language == "python" else ".sql"
            path = Path(source_path or base).with_name(f"{base}{suffix}")
            try:
                attack = parse_attack(path, origin=origin or "user", source=source)
            except AttackDefinitionError:
                continue
        try:
            variant = attack.with_params({k: v for k, v in params.items() if k in attack.params})
        except AttackDefinitionError:
            continue
        if variant.name == name:
            found.append(variant)
    return found


def _check_stored_clash(con: duckdb.DuckDBPyConnection, attack: AttackDefinition) -> None:
    """A user attack named like a stored attack from another file would silently replace its rows."""
    rows = con.execute(
        "SELECT DISTINCT source_path, origin FROM attacks WHERE name = ? AND attack_key <> ?",
        [attack.name, attack.attack_key],
    ).fetchall()
    mine = Path(attack.path).resolve()
    for source_path, origin in rows:
        if _is_builtin_row(origin, source_path) or Path(source_path or "").resolve() != mine:
            raise AttackDefinitionError(
                attack.path,
                f"is named {attack.name!r} like the stored attack from {source_path}; rename it, or pass "
                "--replace to replace that attack's scores",
            )


def _apply_params(selected: list[AttackDefinition], params: dict[str, Any]) -> list[AttackDefinition]:
    for key in params:
        if not any(key in a.params for a in selected):
            declared = sorted({f"{a.name}: {k}" for a in selected for k in a.params})
            raise AttackDefinitionError(
                None,
                f"--param {key}: no selected attack declares it (declared: {', '.join(declared) or 'none'})",
            )
    return [a.with_params({k: v for k, v in params.items() if k in a.params}) for a in selected]


def _model_filter(state: StoreState, models: list[str] | None, db_path: Path) -> set[str] | None:
    if not models:
        return None
    names = {row["model_name"]: key for key, row in state.models.items()}
    chosen = set()
    for item in models:
        if item in state.models:
            chosen.add(item)
        elif item in names:
            chosen.add(names[item])
        else:
            raise RobmiaError(f"--model {item}: no such completed model in {db_path} (see robmia-db models)")
    return chosen


# target rows one sandbox scores at most (several small models share one; a larger model is scored alone):
# what is held at once is one part's relations and its scores, whatever the size of the store
ROWS_PER_PART = 2_000_000


def _parts(
    attack: AttackDefinition, units: list[ScoreUnit], n_rows: dict[str, int]
) -> Iterator[list[ScoreUnit]]:
    """Units of one input group, in parts of at most ROWS_PER_PART target rows (one model at least).

    Reference attacks keep their group whole: each target's sandbox reads its fleet, which `read_relations`
    reads once per group (splitting the group would read the fleet again per part).
    """
    if attack.needs_reference:
        yield units
        return
    part: list[ScoreUnit] = []
    size = 0
    for unit in units:
        rows = n_rows.get(unit.signal_keys[0]) or 0
        if part and size + rows > ROWS_PER_PART:
            yield part
            part, size = [], 0
        part.append(unit)
        size += rows
    if part:
        yield part


def score_attacks(
    db_path: str | Path,
    attacks: list[str | Path] | None = None,
    attack_paths: list[str | Path] | None = None,
    params: dict[str, Any] | None = None,
    force: bool = False,
    models: list[str] | None = None,
    reporter: ScoreReporter | None = None,
    replace: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    memory_limit: str = DEFAULT_MEMORY_LIMIT,
    resamples: int = DEFAULT_RESAMPLES,
    calibration_models: int = DEFAULT_CALIBRATION_MODELS,
    fleet_memory: str | int | None = None,
) -> list[AttackOutcome]:
    """Score attacks (names or file paths; default: every registered and every stored attack) on every model.

    Only (attack, model, perturbation) triples whose attack source or input signals changed are computed,
    unless `force`. Attacks needing reference models are skipped, with the reason recorded, where none exist.
    `replace` lets a user attack take the name of a built-in or of a stored attack from another file.
    `resamples` bootstrap replicates give each metric's interval (0: none). `calibration_models`: how many
    references' nested leave-one-out scores calibrate a reference attack's target (0: none; see
    `nested_calibration`). `fleet_memory` (a size; default ROBMIA_FLEET_MEMORY, else half the available
    memory): a reference attack's fleet larger than this in memory is scored model by model from disk
    (`fleet_disk`), with the same scores.
    """
    db_path = Path(db_path)
    budget = fleet_budget(fleet_memory)
    reporter = reporter or SilentScoreReporter()
    registry = load_registry(list(attack_paths or []), replace=replace)
    selected: list[AttackDefinition] = []
    for item in attacks or []:
        path = Path(str(item))
        if str(item).endswith((".sql", ".py")) or path.exists():
            selected.extend(registry.add_path(path))
        else:
            selected.append(registry.get(str(item)))
    with reading(db_path) as con:
        if not attacks:
            selected = list(registry) + _stored_attacks(con, registry)
        if params:
            selected = _apply_params(selected, params)
        if not replace:
            for attack in selected:
                if attack.origin != "builtin":
                    _check_stored_clash(con, attack)
        state = read_state(con)
        n_rows = dict(con.execute("SELECT signal_key, n_rows FROM perturbations").fetchall())
        recorded_skips = {
            (r[0], r[1], r[2], r[3])
            for r in con.execute(
                "SELECT attack_key, model_key, perturbation, reason FROM attack_skips"
            ).fetchall()
        }
    references = reference_models(state)
    recipes = recipe_keys(state)
    names = {row["model_name"]: key for key, row in state.models.items()}
    key_names = {key: row["model_name"] for key, row in state.models.items()}
    model_filter = _model_filter(state, models, db_path)
    outcomes: list[AttackOutcome] = []
    for attack in selected:
        started = time.perf_counter()
        outcome = AttackOutcome(attack)
        units, skipped = plan_units(attack, state, references, model_filter)
        outcome.skipped = skipped
        inputs_keys: dict[tuple[str, str], str] = {}
        todo: list[ScoreUnit] = []
        attack_key = attack.attack_key
        for unit in units:
            ref_keys = [
                k for ref in unit.references for k in signal_keys_of(state, ref, list(unit.inputs.values()))
            ]
            # a reference attack's calibration depends on how many nested runs calibrate it
            key = unit.inputs_key(
                ref_keys + ([f"calibration-models:{calibration_models}"] if attack.needs_reference else [])
            )
            inputs_keys[(unit.model_key, unit.perturbation)] = key
            if not force and state.existing.get((attack_key, unit.model_key, unit.perturbation)) == key:
                outcome.cached += 1
            else:
                todo.append(unit)
        reporter.attack_started(attack, len(todo))
        nested = NestedCalibration(calibration_models if attack.needs_reference else 0)
        nonfinite: dict[tuple[str, str], int] = {}
        done = 0
        with ScoreStage(db_path) as stage:
            if todo:
                by_inputs: dict[tuple, list[ScoreUnit]] = {}
                for unit in todo:
                    by_inputs.setdefault(tuple(sorted(unit.inputs.items())), []).append(unit)
                for group in by_inputs.values():
                    nested.plan(group)
                    for part in _parts(attack, group, n_rows):
                        relations = open_relations(db_path, attack, part, budget)
                        try:
                            for batch, batch_relations in batches(attack, part, relations, nested.k):
                                sandbox = open_sandbox(batch_relations, memory_limit)
                                try:
                                    table, counts = run_batch(sandbox, attack, batch, key_names, timeout_s)
                                finally:
                                    close_sandbox(sandbox)
                                if batch[0].calibrates is not None:
                                    nested.add(batch[0], table, batch_relations.membership())
                                    continue
                                stage.add(table, batch)
                                nonfinite.update({(k, batch[0].perturbation): n for k, n in counts.items()})
                                done += len(batch)
                                reporter.units_scored(attack, done, len(todo))
                            nested.finish()
                        finally:
                            close_relations(relations)
                        del relations
            new_skips = {(attack_key, names[m], p, r) for m, p, r in skipped} - recorded_skips
            if todo or new_skips:
                write_results(
                    db_path, attack, todo, inputs_keys, stage, nonfinite, skipped, names,
                    time.perf_counter() - started,
                    set(model_filter) if model_filter is not None else set(state.models),
                    references, recipes, resamples, nested,
                )  # fmt: skip
        outcome.scored = len(todo)
        outcome.seconds = time.perf_counter() - started
        reporter.attack_finished(outcome)
        outcomes.append(outcome)
    return outcomes
