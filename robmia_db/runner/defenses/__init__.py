"""Runner layer: training objectives behind one registry, keyed like `spec.defenses.DEFENSE_PARAMS`.

A defense turns a batch into a loss; the executor owns the loop, optimizer and schedule. Each defense keeps
its own eps / weight schedule, as its original method defines it (defenses.md section 6, risk 3).
"""

from __future__ import annotations

from robmia_db.runner.defenses import empirical, verifiable  # noqa: F401  (registers the defenses)
from robmia_db.runner.defenses.base import DEFENSES, Defense, TrainProgress, build_defense, register_defense

__all__ = ["DEFENSES", "Defense", "TrainProgress", "build_defense", "register_defense"]
