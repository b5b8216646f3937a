"""Spec layer: the reference of every spec key, generated from the pydantic field descriptions."""

from __future__ import annotations

from typing import Any, get_args

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from robmia_db.spec.defenses import DEFENSE_PARAMS
from robmia_db.spec.models import AdversarialSignal, BenignSignal, ExperimentSpec, VerifiedSignal


def _model_class(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_class(arg)
        if found is not None:
            return found
    return None


def _lines(model: type[BaseModel], prefix: str) -> list[str]:
    lines: list[str] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        nested = _model_class(field.annotation)
        if nested is not None and name not in ("signals",):
            lines.extend(_lines(nested, f"{key}."))
            continue
        default = (
            field.get_default(call_default_factory=True)
            if field.default is not PydanticUndefined or field.default_factory
            else None
        )
        if isinstance(default, BaseModel):
            default = default.model_dump()
        if isinstance(default, list) and default and isinstance(default[0], BaseModel):
            default = [item.model_dump() for item in default]
        shown = "required" if field.is_required() else f"default {default!r}"
        lines.append(f"{key}  ({shown})")
        if field.description:
            lines.append(f"    {field.description}")
    return lines


def explain() -> str:
    """Every key of a spec with its default and meaning, then each signal kind and defense's parameters."""
    out = ["# spec keys", *_lines(ExperimentSpec, "")]
    for signal in (BenignSignal, AdversarialSignal, VerifiedSignal):
        kind = get_args(signal.model_fields["kind"].annotation)[0]
        out += ["", f"# [[signals]] kind = {kind!r}", *_lines(signal, "signals[].")]
    for name, params in sorted(DEFENSE_PARAMS.items()):
        summary = f": {params.summary}" if getattr(params, "summary", "") else ""
        out += [
            "",
            f"# [defense.{name}]{summary}",
            *(_lines(params, f"defense.{name}.") or ["    (no parameters)"]),
        ]
    return "\n".join(out) + "\n"
