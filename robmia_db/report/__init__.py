"""Report layer: a self-contained offline HTML comparison of defenses, attacks and signals (no torch, no runner)."""

from __future__ import annotations

from robmia_db.report.build import build_report, collect_report_data, default_output, render_report

__all__ = ["build_report", "collect_report_data", "default_output", "render_report"]
