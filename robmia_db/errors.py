"""Typed errors shared by every layer; imports nothing of ours.

The CLI turns any RobmiaError into one line `Error: ...` and exit code 1; `--debug` re-raises.
"""

from __future__ import annotations

import re
from pathlib import Path

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def safe_text(text: object) -> str:
    """Text with terminal control characters (escape sequences) shown as `\\x1b`, never executed."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


class RobmiaError(Exception):
    """Base class of every error a user can cause (bad input, missing data, locked store)."""


class SpecError(RobmiaError):
    """One problem in one spec file, located by a dotted key (`training.eps`)."""

    def __init__(self, path: str | Path | None, key: str | None, message: str):
        self.path = str(path) if path is not None else None
        self.key = key
        self.message = message
        super().__init__(self.format())

    def format(self) -> str:
        parts = [p for p in (self.path, self.key) if p]
        return ": ".join([*parts, self.message])


class SpecErrors(RobmiaError):
    """Every problem found across every given spec file, reported together before any work."""

    def __init__(self, errors: list[SpecError]):
        self.errors = errors
        super().__init__("\n".join(e.format() for e in errors))


class DatasetError(RobmiaError):
    """A dataset is missing, malformed or unknown; the message says which files to put where."""


class ModelDefinitionError(RobmiaError):
    """An architecture or layer the runner or the bound engine cannot handle."""


class AttackDefinitionError(RobmiaError):
    """An attack file is malformed; the message names the file."""

    def __init__(self, path: str | Path | None, message: str):
        self.path = str(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path else message)


class MissingSignalError(RobmiaError):
    """An attack needs a perturbation or signal the store does not hold."""


class StoreError(RobmiaError):
    """The store is unusable: wrong schema version, not a robmia-db file, bad query."""


class UnfinishedStoreError(StoreError):
    """The store file exists but its creation was interrupted; a write command finishes it."""


class StoreLockedError(StoreError):
    """Another process holds the store (or its run lock); the message names the holder."""


class ImportDataError(RobmiaError):
    """External per-sample outputs failed validation; nothing was imported."""


class CheckpointError(RobmiaError):
    """A model's checkpoint is missing, or is not the file the store recorded for it."""


class TrainingDivergedError(RobmiaError):
    """A model's loss or signals went NaN or infinite; the message names the epoch or perturbation."""
