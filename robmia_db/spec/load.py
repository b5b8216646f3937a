"""Spec layer: read TOML files, validate them all, and expand sweeps into concrete jobs.

Imports `errors`, `spec.*` and the numpy-only `datasets` registry (for dataset names). Every error of every
file is collected and raised together as `SpecErrors`, before any work starts.
"""

from __future__ import annotations

import itertools
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from robmia_db.errors import SpecError, SpecErrors
from robmia_db.spec.defenses import DEFENSE_PARAMS, DefenseParams
from robmia_db.spec.identity import model_key, signal_key
from robmia_db.spec.models import ExperimentSpec

# expanding is ~0.5 ms a model: a runaway sweep is refused before seconds of silent work (and hours of runs)
MAX_MODELS_PER_SPEC = 20_000
MAX_SPEC_BYTES = 4 * 2**20


@dataclass
class PerturbationJob:
    """One perturbation to record for one model: its stored name, kind, eps and full settings."""

    name: str
    kind: str
    eps: float | None
    settings: dict[str, Any]
    signal_key: str


@dataclass
class ModelJob:
    """One model to train (or find in the store) and the perturbations to record for it."""

    model_key: str
    model_name: str
    experiment: str
    spec_path: str
    identity: dict[str, Any]
    dataset: str
    arch: str
    width: float
    defense: str
    eps: float | None
    seed: int
    model_index: int
    perturbations: list[PerturbationJob] = field(default_factory=list)
    runtime: dict[str, Any] = field(default_factory=dict)
    data_root: str | None = None
    spec_text: str | None = None  # the spec file's text, kept with the model it trains


@dataclass
class LoadedSpec:
    path: Path
    text: str
    spec: ExperimentSpec
    jobs: list[ModelJob]


def _dotted(loc: tuple[Any, ...], kinds: tuple[str, ...] = ("benign", "adversarial", "verified")) -> str:
    key = ""
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
        elif part in kinds and key.startswith("signals["):
            continue  # pydantic puts the union tag in the location; users never wrote it
        else:
            key += ("." if key else "") + str(part)
    return key


def _describe(error: dict[str, Any]) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    got = error.get("input")
    shown = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[
            kind
        ]
        bound = next(iter(ctx.values()))
        bound = f"{bound:g}" if isinstance(bound, float) else bound
        got_text = f" (got {got:g})" if isinstance(got, float) else shown
        return f"must be {op} {bound}{got_text}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}{shown}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"must be an integer{shown}"
    if kind in ("float_type", "float_parsing"):
        return f"must be a number{shown}"
    if kind == "finite_number":
        return f"must be a finite number{shown}"
    if kind in ("bool_type", "bool_parsing"):
        return f"must be true or false{shown}"
    if kind in ("string_type",):
        return f"must be a string{shown}"
    if kind in ("list_type",):
        return f"must be a list{shown}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"must be a table{shown}"
    if kind == "string_pattern_mismatch":
        return f"must be a name of letters, digits, '_', '.', '-'{shown}"
    if kind == "too_short":
        return "must not be empty"
    if kind == "union_tag_invalid":
        return f"kind must be one of {ctx.get('expected_tags')}{' (got ' + repr(ctx.get('tag')) + ')'}"
    if kind == "union_tag_not_found":
        return "needs a `kind` (benign, adversarial or verified)"
    message = str(error.get("msg", kind))
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    return message


def _scalar_index_dropped(loc: tuple[Any, ...], raw: Any) -> tuple[Any, ...]:
    """`eps = -0.03` is checked as the list [-0.03]; report it as `training.eps`, not `training.eps[0]`."""
    kept: list[Any] = []
    node = raw
    for part in loc:
        if isinstance(part, int) and not isinstance(node, list):
            continue
        kept.append(part)
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = None
    return tuple(kept)


def _validation_errors(
    path: Path, exc: ValidationError, prefix: str = "", raw: Any = None
) -> list[SpecError]:
    errors = []
    seen = set()

    def base(loc: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(
            p for p in loc if not (isinstance(p, str) and (p.startswith("literal[") or p in ("float", "int")))
        )

    auto_locs = {
        base(e["loc"]) for e in exc.errors() if any(str(p).startswith("literal['auto'") for p in e["loc"])
    }
    for error in exc.errors():
        loc = error["loc"]
        accepts_auto = base(loc) in auto_locs
        # a union of float | "auto" reports each member's failure; report the first only
        if (
            len(loc) > 0
            and isinstance(loc[-1], str)
            and (loc[-1].startswith("literal[") or loc[-1] in ("float", "int"))
        ):
            loc = loc[:-1]
        if raw is not None:
            loc = _scalar_index_dropped(tuple(loc), raw)
        key = prefix + _dotted(tuple(loc))
        if key in seen:
            continue
        seen.add(key)
        message = _describe(error)
        if accepts_auto and message.startswith("must be a number"):
            message = message.replace("must be a number", 'must be a number or "auto"', 1)
        if message.startswith("signals: "):
            key, message = "signals", message[len("signals: ") :]
        if key in ("data", "data.dataset") and error["type"] == "missing":
            # there is no default dataset: a forgotten [data] section must not silently train on digits
            from robmia_db.datasets import dataset_names

            key = "data.dataset"
            message = f'required: name the dataset, e.g. [data] dataset = "digits" (known: {", ".join(dataset_names())})'
        errors.append(SpecError(path, key or None, message))
    return errors


def read_spec(path: str | Path) -> tuple[str, ExperimentSpec | None, list[SpecError]]:
    """Parse and validate one file, returning every error found in it instead of raising."""
    path = Path(path)
    if not path.exists():
        return "", None, [SpecError(path, None, "file not found")]
    if path.is_dir():
        return "", None, [SpecError(path, None, "is a folder, not a spec file")]
    if not path.is_file():  # /dev/zero would be read forever, a FIFO would block until a writer came
        return "", None, [SpecError(path, None, "is not a regular file (a device, pipe or socket)")]
    if path.stat().st_size > MAX_SPEC_BYTES:
        return "", None, [SpecError(path, None, f"is larger than {MAX_SPEC_BYTES // 2**20} MiB: not a spec")]
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return "", None, [SpecError(path, None, f"cannot read: {exc}")]
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return text, None, [SpecError(path, None, f"invalid TOML: {exc}")]
    defense_errors = _defense_errors(path, raw.get("defense")) + _dataset_errors(path, raw.get("data"))
    try:
        spec = ExperimentSpec.model_validate(raw)
    except ValidationError as exc:
        return text, None, _validation_errors(path, exc, raw=raw) + defense_errors
    errors = _semantic_errors(path, spec) + defense_errors
    return text, (None if errors else spec), errors


def _dataset_errors(path: Path, data: Any) -> list[SpecError]:
    from robmia_db.datasets import dataset_names

    name = data.get("dataset") if isinstance(data, dict) else None
    if isinstance(name, str) and name not in dataset_names():
        return [
            SpecError(path, "data.dataset", f"unknown dataset {name!r} (known: {', '.join(dataset_names())})")
        ]
    return []


def _defense_errors(path: Path, sections: Any) -> list[SpecError]:
    """Per-defense parameters, checked even when the rest of the file has errors (all errors at once)."""
    errors: list[SpecError] = []
    if not isinstance(sections, dict):
        return errors
    for name, params in sections.items():
        if name not in DEFENSE_PARAMS:
            known = ", ".join(sorted(DEFENSE_PARAMS))
            errors.append(SpecError(path, f"defense.{name}", f"unknown defense (known: {known})"))
            continue
        if not isinstance(params, dict):
            continue  # the schema reports it as "must be a table"
        try:
            DEFENSE_PARAMS[name].model_validate(params)
        except ValidationError as exc:
            errors.extend(_validation_errors(path, exc, prefix=f"defense.{name}.", raw=params))
    return errors


def _semantic_errors(path: Path, spec: ExperimentSpec) -> list[SpecError]:

    errors: list[SpecError] = []
    membership = spec.membership
    if membership.scheme == "train_test" and membership.n_models != 1:
        errors.append(
            SpecError(path, "membership.n_models", "only random_halves trains a population of models")
        )
    if membership.scheme == "random_halves" and (membership.n_members or membership.n_nonmembers):
        errors.append(
            SpecError(
                path, "membership.n_members", "random_halves takes population, not n_members/n_nonmembers"
            )
        )
    errors += _mlp_hidden_errors(path, spec) + _attack_name_errors(path, spec)
    planned = planned_models(spec)
    if planned > MAX_MODELS_PER_SPEC:
        errors.append(
            SpecError(
                path,
                "training",
                f"the sweep expands to {planned:,} models, more than {MAX_MODELS_PER_SPEC:,} per spec: "
                "narrow it or split it across specs",
            )
        )
    for index, schedule_milestone in enumerate(spec.training.lr_schedule.milestones):
        if schedule_milestone > spec.training.epochs:
            errors.append(
                SpecError(
                    path,
                    f"training.lr_schedule.milestones[{index}]",
                    f"must be <= training.epochs ({spec.training.epochs}) (got {schedule_milestone})",
                )
            )
    return errors


def planned_models(spec: ExperimentSpec) -> int:
    """How many models the sweep expands to, counted before expanding it (natural ignores eps: an upper bound)."""
    n_models = spec.membership.n_models if spec.membership.scheme == "random_halves" else 1
    return (
        len(spec.model.width)
        * len(spec.training.defenses)
        * len(spec.training.eps)
        * len(spec.training.seeds)
    ) * n_models


def _mlp_hidden_errors(path: Path, spec: ExperimentSpec) -> list[SpecError]:
    """`hidden = [-5]` used to become one unit silently; the sizes are checked here, before any torch."""
    hidden = spec.model.options.get("hidden")
    if spec.model.arch != "mlp" or hidden is None:
        return []
    if not isinstance(hidden, list) or not hidden:
        return [
            SpecError(
                path, "model.options.hidden", f"must be a non-empty list of layer sizes (got {hidden!r})"
            )
        ]
    for index, size in enumerate(hidden):
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 1_000_000:
            return [
                SpecError(
                    path,
                    f"model.options.hidden[{index}]",
                    f"must be an integer in [1, 1000000] (got {size!r})",
                )
            ]
    return []


def _known_attack_names(spec_path: Path, paths: list[str]) -> set[str] | None:
    """Attack names by file stem (an attack's name is its file's stem), without executing any attack file.

    None when an installed plugin adds attacks: their names are known only by running the plugin.
    """
    from importlib import metadata

    if list(metadata.entry_points(group="robmia_db.attacks")):
        return None
    folders = [Path(__file__).resolve().parents[1] / "attacks" / "builtin"]
    names: set[str] = set()
    for raw in paths:
        path = spec_path.parent / raw
        if path.is_dir():
            folders.append(path)
        elif path.suffix in (".sql", ".py"):
            names.add(path.stem)
    for folder in folders:
        names |= {
            p.stem for p in folder.iterdir() if p.suffix in (".sql", ".py") and not p.name.startswith("_")
        }
    return names


def _attack_name_errors(path: Path, spec: ExperimentSpec) -> list[SpecError]:
    if not spec.attacks.names:
        return []
    known = _known_attack_names(path, spec.attacks.paths)
    if known is None:
        return []
    return [
        SpecError(
            path, f"attacks.names[{index}]", f"unknown attack {name!r} (known: {', '.join(sorted(known))})"
        )
        for index, name in enumerate(spec.attacks.names)
        if name not in known
    ]


def defense_params(spec: ExperimentSpec, defense: str) -> DefenseParams:
    return DEFENSE_PARAMS[defense].model_validate(spec.defense.get(defense, {}))


def _resolve_eps(value: float | str, training_eps: float) -> float:
    return float(training_eps) if value == "auto" else float(value)


def perturbation_settings(signal: Any, training_eps: float) -> tuple[str, float | None, dict[str, Any]]:
    """Full settings of one perturbation with "auto" resolved: what its signal key hashes."""
    if signal.kind == "benign":
        return "benign", None, {"kind": "benign", "dtype": "float32", "temperature": 1.0}
    if signal.kind == "adversarial":
        eps = _resolve_eps(signal.eps, training_eps)
        step = 2.5 * eps / signal.steps if signal.step_size == "auto" else float(signal.step_size)
        settings = {
            "kind": "adversarial",
            "attack": "pgd_linf",
            "eps": eps,
            "steps": signal.steps,
            "step_size": round(step, 12),
            "random_start": signal.random_start,
            "clip": [0.0, 1.0],
            "dtype": "float32",
            "temperature": 1.0,
        }
        if signal.random_start:
            settings["seed"] = signal.seed
        return "adversarial", eps, settings
    eps = _resolve_eps(signal.eps, training_eps)
    settings = {
        "kind": "verified",
        "method": signal.method,
        "eps": eps,
        "clip": [0.0, 1.0],
        "dtype": "float32",
    }
    return "verified", eps, settings


def expand_jobs(path: Path, spec: ExperimentSpec) -> list[ModelJob]:
    """Expand the sweep (defenses x eps x seeds x widths x population members) into model jobs.

    Jobs that train the same model (natural training ignores eps) are merged: one model, every
    perturbation its duplicates asked for.
    """
    training = spec.training
    data = spec.data
    membership = spec.membership
    n_models = membership.n_models if membership.scheme == "random_halves" else 1
    several_widths = len(spec.model.width) > 1
    several_eps = len(training.eps) > 1
    jobs: dict[str, ModelJob] = {}
    for width, defense, eps, seed, index in itertools.product(
        spec.model.width, training.defenses, training.eps, training.seeds, range(n_models)
    ):
        params = defense_params(spec, defense)
        uses_eps = params.uses_eps
        identity = {
            "dataset": {
                "name": data.dataset,
                "n_train": data.n_train,
                "n_test": data.n_test,
                "options": data.options,
            },
            "membership": {
                "scheme": membership.scheme,
                "split_seed": data.split_seed,
                "n_members": membership.n_members,
                "n_nonmembers": membership.n_nonmembers,
                "population": membership.population,
                "model_index": index if membership.scheme == "random_halves" else None,
            },
            "model": {"arch": spec.model.arch, "width": width, "options": spec.model.options},
            "training": {
                "defense": defense,
                "eps": eps if uses_eps else None,
                "params": params.resolved(eps if uses_eps else None),
                "epochs": training.epochs,
                "batch_size": training.batch_size,
                "optimizer": training.optimizer.model_dump(),
                "lr_schedule": training.lr_schedule.model_dump(),
                "seed": seed,
            },
        }
        key = model_key(identity)
        name_parts = [defense]
        if uses_eps:
            name_parts.append(f"eps{eps:g}")
        if several_widths:
            name_parts.append(f"w{width:g}")
        name_parts.append(f"s{seed}")
        if n_models > 1:
            name_parts.append(f"m{index}")
        job = jobs.get(key)
        if job is None:
            job = ModelJob(
                model_key=key,
                model_name=f"{spec.experiment.name}/{'-'.join(name_parts)}",
                experiment=spec.experiment.name,
                spec_path=str(path),
                identity=identity,
                dataset=data.dataset,
                arch=spec.model.arch,
                width=width,
                defense=defense,
                eps=eps if uses_eps else None,
                seed=seed,
                model_index=index,
                runtime=spec.runtime.model_dump(),
                data_root=data.root,
            )
            jobs[key] = job
        for signal in spec.signals:
            kind, p_eps, settings = perturbation_settings(signal, eps)
            name = signal.name
            if several_eps and getattr(signal, "eps", None) == "auto" and not uses_eps:
                name = f"{signal.name}@{eps:g}"  # one natural model, evaluated at every swept eps
            skey = signal_key(key, settings)
            if all(p.signal_key != skey for p in job.perturbations):
                job.perturbations.append(PerturbationJob(name, kind, p_eps, settings, skey))
    return list(jobs.values())


def load_specs(paths: list[str | Path]) -> list[LoadedSpec]:
    """Validate every file, then expand each; raise SpecErrors listing every problem of every file."""
    if not paths:
        raise SpecErrors([SpecError(None, None, "no spec files given")])
    errors: list[SpecError] = []
    loaded: list[LoadedSpec] = []
    for raw_path in paths:
        path = Path(raw_path)
        text, spec, file_errors = read_spec(path)
        errors.extend(file_errors)
        if spec is not None and not file_errors:
            loaded.append(LoadedSpec(path, text, spec, expand_jobs(path, spec)))
    names: dict[str, Path] = {}
    for item in loaded:
        other = names.setdefault(item.spec.experiment.name, item.path)
        if other != item.path:
            errors.append(
                SpecError(
                    item.path, "experiment.name", f"{item.spec.experiment.name!r} is also the name in {other}"
                )
            )
    if errors:
        raise SpecErrors(errors)
    return loaded
