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
