"""Spec layer: content keys. What training depends on makes `model_key`; a perturbation's settings make its `signal_key`.

Names, descriptions, attack lists, runtime settings and report settings never enter a key, so editing them
never retrains (conventions section 3).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

# Bump when a change to the training code changes what a given config trains: old models stay queryable
# but new runs train afresh under new keys.
TRAINING_CODE_VERSION = 1
# Bump when signal extraction (PGD, softmax, bounds) changes what a given perturbation records.
SIGNAL_CODE_VERSION = 1


def canonical_json(value: Any) -> str:
    """Key-sorted, whitespace-free JSON with floats normalised, so equal configs hash equally."""
    return json.dumps(_normalise(value), sort_keys=True, separators=(",", ":"))


def _normalise(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else float(repr(value))
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        return {str(k): _normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    raise TypeError(f"cannot hash {type(value).__name__} in a key")


def content_key(value: Any, length: int = 16) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:length]


def model_key(identity: dict[str, Any]) -> str:
    return content_key({"model": identity, "training_code_version": TRAINING_CODE_VERSION})


def signal_key(model_key_value: str, settings: dict[str, Any]) -> str:
    return content_key(
        {"model_key": model_key_value, "perturbation": settings, "signal_code_version": SIGNAL_CODE_VERSION}
    )


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def _shown(value: Any) -> str:
    return json.dumps(_normalise(value), separators=(",", ":")) if not isinstance(value, str) else value


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two models' identities, one `dotted.key old -> new` per leaf.

    Shown wherever one name maps to two model keys (an edited spec rerun under the same name), so that
    the user sees why a second model appeared; an empty list means only the training code version differs.
    """
    before, after = _flatten(_normalise(old)), _flatten(_normalise(new))
    lines = []
    for key in sorted(set(before) | set(after)):
        if key not in after:
            lines.append(f"{key} {_shown(before[key])} -> (absent)")
        elif key not in before:
            lines.append(f"{key} (absent) -> {_shown(after[key])}")
        elif before[key] != after[key]:
            lines.append(f"{key} {_shown(before[key])} -> {_shown(after[key])}")
    return lines
