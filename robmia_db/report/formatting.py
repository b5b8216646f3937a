"""How the page writes values: percentages, durations, times, eps budgets, full-precision data attributes."""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from typing import Any


def percent(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{100 * value:.{digits}f}"


def seconds(value: Any) -> str:
    if value is None:
        return "—"
    if value < 60:
        return f"{value:.1f} s"
    if value < 3600:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.2f} h"


def when(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return str(value)


def raw(value: Any) -> str:
    """Full-precision value for data attributes (tests and scripts read these, people read the cell)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return repr(float(value))


def fmt_param(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        # budgets are usually k/255 (8/255 reads better than 0.0313725)
        steps = value * 255
        if 0 < value < 1 and round(value, 4) != value and abs(steps - round(steps)) < 1e-6:
            return f"{round(steps)}/255"
        return f"{value:g}"
    return str(value)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:80] or "chart"
