"""Test-only hooks: deterministic crash and pause points for the reliability tests. Imports nothing of ours.

Nothing here does anything unless a `ROBMIA_TEST_*` variable is set, which only the test suite does:
- `ROBMIA_TEST_KILL_AT=<point>`: the process kills itself with SIGKILL at that point (a `kill -9` that lands
  exactly inside a crash window, which a timer-based kill would hit only by luck);
- `ROBMIA_TEST_WAIT_AT=<point>:<file>`: at that point, touch `<file>.reached` and wait until `<file>` exists
  (so a test can start a competing reader at a known moment);
- `ROBMIA_TEST_FAIL_AT=<point>`: raise OSError(ENOSPC) at that point (a full disk, without a tiny tmpfs);
- `ROBMIA_TEST_STAGE_ROWS=<n>`: `score` stages at most n score rows in memory before it writes them to
  Parquet files (so a test of a small store can reach the files a large one writes).
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path


def kill_point(name: str) -> None:
    if os.environ.get("ROBMIA_TEST_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def wait_point(name: str, limit_s: float = 120.0) -> None:
    value = os.environ.get("ROBMIA_TEST_WAIT_AT", "")
    point, _, file = value.partition(":")
    if point != name or not file:
        return
    Path(file + ".reached").touch()
    deadline = time.monotonic() + limit_s
    while not Path(file).exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def fail_point(name: str) -> None:
    if os.environ.get("ROBMIA_TEST_FAIL_AT") == name:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def stage_rows_in_memory(default: int) -> int:
    value = os.environ.get("ROBMIA_TEST_STAGE_ROWS")
    return default if value is None else int(value)
