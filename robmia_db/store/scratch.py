"""Store layer: scratch folders that `score` keeps beside the store while it stages scores.

They are named `.<store file>.score-tmp<PID>-<random>/`; one whose process is gone was left by a killed
run. The next `score` and `gc` remove those (a live run's folder is never touched).
"""

from __future__ import annotations

import os
from pathlib import Path

SCORE_SCRATCH = ".score-tmp"


def score_scratch_prefix(db_path: str | Path) -> str:
    """The name prefix of a new scratch folder of this process (for `tempfile.mkdtemp`)."""
    return f".{Path(db_path).resolve().name}{SCORE_SCRATCH}{os.getpid()}-"


def score_scratch_folders(db_path: str | Path) -> list[Path]:
    """Scratch folders of score runs beside the store, alive or not."""
    real = Path(db_path).resolve()
    return sorted(p for p in real.parent.glob(f".{real.name}{SCORE_SCRATCH}*-*") if p.is_dir())


def stale_score_scratch(db_path: str | Path) -> list[Path]:
    """Scratch folders whose score run died (kill -9): their process is gone."""
    found = []
    for folder in score_scratch_folders(db_path):
        pid = folder.name.rsplit(SCORE_SCRATCH, 1)[1].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            found.append(folder)
    return found


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
