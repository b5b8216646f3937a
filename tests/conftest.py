"""Shared fixtures: a TOML spec writer, a clean environment, and one real store trained once per session.

The session store is built by running a tiny spec (digits, a one-hidden-layer MLP, natural and PGD-AT,
benign and PGD signals) through the real runner; read-only tests share it, tests that change a store
copy it first. torch is imported lazily, only by the fixtures and tests that train or recompute.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
DELETE = object()  # an override value that removes the key from the base spec

# 200 members / 200 non-members, 30 epochs at lr 0.01: about a second per model on one core, and enough
# for a clear gap between natural and PGD-AT accuracy under the eps 0.1 PGD.
TINY_SPEC: dict[str, Any] = {
    "experiment": {"name": "tiny", "description": "digits MLP: natural vs PGD-AT"},
    "data": {"dataset": "digits", "split_seed": 0},
    "membership": {"scheme": "train_test", "n_members": 200, "n_nonmembers": 200},
    "model": {"arch": "mlp", "width": 1.0, "options": {"hidden": [64]}},
    "training": {
        "defenses": ["natural", "pgd_at"],
        "eps": 0.1,
        "seeds": [0],
        "epochs": 30,
        "batch_size": 32,
        "optimizer": {"name": "adam", "lr": 0.01},
    },
    "defense": {"pgd_at": {"steps": 5}},
    "signals": [
        {"kind": "benign", "name": "benign"},
        {"kind": "adversarial", "name": "pgd", "eps": "auto", "steps": 20},
    ],
    "attacks": {"names": ["loss"]},
    "runtime": {"device": "cpu", "threads": 1},
}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items() if v is not None) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def toml_dumps(data: dict[str, Any], prefix: str = "") -> str:
    """A minimal TOML writer for specs: scalars and lists inline, dicts as tables, lists of dicts as [[x]]."""
    lines: list[str] = []
    tables: list[tuple[str, Any]] = []
    for key, value in data.items():
        if value is None:
            continue
        if isinstance(value, dict) or _is_table_array(value):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    text = "\n".join(lines) + ("\n" if lines else "")
    for key, value in tables:
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            text += f"\n[{name}]\n" + toml_dumps(value, prefix=name + ".")
        else:
            for item in value:
                text += f"\n[[{name}]]\n" + toml_dumps(item, prefix=name + ".")
    return text


def merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `overrides` into a copy of `base`; dict values merge, anything else replaces, DELETE removes."""
    result = copy.deepcopy(base)
    for key, value in overrides.items():
        if value is DELETE:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


SpecWriter = Callable[..., Path]


@pytest.fixture
def write_spec(tmp_path: Path) -> SpecWriter:
    """`write_spec(overrides=None, name="spec.toml", base=TINY_SPEC)` -> path of a TOML file in tmp_path."""

    def write(
        overrides: dict[str, Any] | None = None, name: str = "spec.toml", base: dict | None = None
    ) -> Path:
        spec = merged(TINY_SPEC if base is None else base, overrides or {})
        path = tmp_path / name
        path.write_text(toml_dumps(spec), encoding="utf-8")
        return path

    return write


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may see (or leak) a store or data root chosen by the environment."""
    monkeypatch.delenv("ROBMIA_DB", raising=False)
    monkeypatch.delenv("ROBMIA_DATA", raising=False)


def use_one_torch_thread() -> None:
    """Called by the tests that import torch: 2 shared cores, and one thread keeps results reproducible."""
    import torch

    torch.set_num_threads(1)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ROBMIA_DB", "ROBMIA_DATA")}
    env.update(extra)
    return env


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """The CLI's failure contract: exit 1, no traceback, exactly one `Error: ` line holding every needle."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def robmia(*args: str, timeout: float = 120, **popen: Any) -> subprocess.CompletedProcess:
    """Run the real CLI in a fresh interpreter (`python -m robmia_db ...`)."""
    return subprocess.run(
        [sys.executable, "-m", "robmia_db", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env(),
        **popen,
    )


@dataclass
class TrainedStore:
    db: Path
    spec_path: Path
    spec: dict[str, Any]
    actions: dict[str, str]

    def copy_to(self, folder: Path) -> Path:
        """A private copy (store file and checkpoints) for tests that write."""
        from robmia_db.store.connection import checkpoint_dir

        folder.mkdir(parents=True, exist_ok=True)
        target = folder / self.db.name
        shutil.copy2(self.db, target)
        shutil.copytree(checkpoint_dir(self.db), checkpoint_dir(target))
        return target


@pytest.fixture(scope="session")
def trained_store(tmp_path_factory: pytest.TempPathFactory) -> TrainedStore:
    """The tiny spec run once into a real store; read-only for the tests that share it."""
    use_one_torch_thread()
    from robmia_db.runner.executor import run_specs

    folder = tmp_path_factory.mktemp("trained")
    spec_path = folder / "tiny.toml"
    spec_path.write_text(toml_dumps(TINY_SPEC), encoding="utf-8")
    db = folder / "store.duckdb"
    summary = run_specs([spec_path], db)
    assert not summary.failed, [o.error for o in summary.failed]
    return TrainedStore(
        db, spec_path, copy.deepcopy(TINY_SPEC), {o.job.model_name: o.action for o in summary.outcomes}
    )
