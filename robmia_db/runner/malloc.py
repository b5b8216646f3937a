"""Runner layer: the glibc malloc setting every run (and each Ray worker) takes at its start.

Measured in benchmarks/bench_malloc.py: with glibc's defaults a training step faults thousands of pages in
again each time; with the setting, freed memory stays in the process (README, Reliability).
"""

from __future__ import annotations

import os
import platform
import sys

# glibc's defaults hand freed heap memory back to the system (above a 128 KiB trim threshold, raised
# dynamically up to 64 MiB) and map blocks above 128 KiB-32 MiB afresh, so a training step that allocates
# some MB of activations faults every page in again on the next step (about 1 us per 4 KiB page here).
# 1 GiB for both keeps freed memory in the process instead: the resident size stays at its peak.
_MALLOC_THRESHOLD = 1 << 30
_MALLOC_ENVIRONMENT = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> bool:
    """Set glibc's trim and mmap thresholds to 1 GiB once for this process (True when set).

    Not done where the user set glibc's malloc tuning in the environment (it wins), nor off glibc (e.g. macOS,
    musl), nor with ROBMIA_MALLOC=default. Measured in benchmarks/bench_malloc.py (README benchmarks).
    """
    if (
        os.environ.get("ROBMIA_MALLOC", "") == "default"
        or any(name in os.environ for name in _MALLOC_ENVIRONMENT)
        or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")
    ):
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    # Setting either one also switches off the dynamic thresholds (glibc raises them after large frees).
    return bool(mallopt(m_trim_threshold, _MALLOC_THRESHOLD)) and bool(
        mallopt(m_mmap_threshold, _MALLOC_THRESHOLD)
    )
