"""Faults for the Ray executor tests: defenses that fail, installed in the test process and, through Ray's
`worker_process_setup_hook`, in every Ray worker (they are real registrations, used by the real runner).

- `exploding` raises at training step 3: a model that fails for its own reasons.
- `killed_once` trains like `natural` but SIGKILLs its own worker process at step KILL_STEP the first
  time (a flag file in $ROBMIA_TEST_FLAGS remembers it): a worker lost mid-model, which Ray retries.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

KILL_STEP = 20  # in the third epoch of a 200-member, batch-32 model (7 steps per epoch)


def kill_flag() -> Path:
    return Path(os.environ["ROBMIA_TEST_FLAGS"]) / "killed_once"


def register() -> dict:
    """Add the two defenses to the registries; returns what was added (to remove it again)."""
    import torch.nn.functional as F

    from robmia_db.runner.defenses import DEFENSES, Defense
    from robmia_db.spec.defenses import DEFENSE_PARAMS, NaturalParams

    class ExplodingParams(NaturalParams):
        """No parameters, like natural training."""

    class KilledOnceParams(NaturalParams):
        """No parameters, like natural training."""

    class Exploding(Defense):
        name = "exploding"

        def loss(self, model, x, y, progress):
            if progress.step == 3:
                raise RuntimeError("exploded at step 3")
            return F.cross_entropy(model(x), y)

    class KilledOnce(Defense):
        name = "killed_once"

        def loss(self, model, x, y, progress):
            if progress.step == KILL_STEP and not kill_flag().exists():
                kill_flag().touch()
                os.kill(os.getpid(), signal.SIGKILL)
            return F.cross_entropy(model(x), y)

    added = {"exploding": (ExplodingParams, Exploding), "killed_once": (KilledOnceParams, KilledOnce)}
    for name, (params, defense) in added.items():
        DEFENSE_PARAMS[name] = params
        DEFENSES[name] = defense
    return added


def unregister(added: dict) -> None:
    from robmia_db.runner.defenses import DEFENSES
    from robmia_db.spec.defenses import DEFENSE_PARAMS

    for name in added:
        DEFENSE_PARAMS.pop(name, None)
        DEFENSES.pop(name, None)


def setup_worker() -> None:
    """Ray's worker_process_setup_hook: the defenses, and a partial checkpoint after every epoch."""
    register()
    from robmia_db.runner import training

    training.PARTIAL_SAVE_INTERVAL_S = -1.0
