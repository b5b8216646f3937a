"""Report rendering: collect the data, shape tables and figures, render one self-contained HTML page.

`build_report` is the entry point. Queries live in `queries`, table shaping in `tables`, chart shaping in
`figures`, the Vega-Lite specs in `charts` and the page in `templates/report.html.j2`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from robmia_db.report import charts, figures, queries, tables
from robmia_db.report.figures import ChartSlot
from robmia_db.report.formatting import fmt_param, percent, raw, seconds, slug, when
from robmia_db.report.intervals import annotate_paper_tables
from robmia_db.report.queries import PAPER_ATTACK, ReportData, collect_report_data

STATIC_FORMATS = ("png", "svg")
OPEN_LEADERBOARD_MODELS = 6  # leaderboards of small stores start expanded


def _environment():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("robmia_db.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    # Compact JSON; NaN is not JSON and would break JSON.parse in the page, so refuse it loudly.
    env.policies["json.dumps_kwargs"] = {"sort_keys": False, "separators": (",", ":"), "allow_nan": False}
    env.filters.update(percent=percent, seconds=seconds, when=when, raw=raw, param=fmt_param)
    return env


def render_report(data: ReportData) -> tuple[str, list[ChartSlot]]:
    """Render the page from collected data.

    Args:
        data: From `collect_report_data`.

    Returns:
        The HTML text and the charts it embeds (for static export).
    """
    chart_list = figures.ChartList()
    values = tables.paper_values(data)
    paper_tables = tables.paper_tables(data, values)
    annotate_paper_tables(data, paper_tables)  # issue 10: 95 % intervals beside each value
    leaderboards = tables.leaderboards(data)
    roc = figures.roc_charts(data, chart_list)
    attack_roc = figures.attack_roc_charts(data, chart_list)
    histograms = figures.histogram_charts(data, chart_list)
    gap = figures.gap_chart(data, values, chart_list)
    sweeps, n_sweeps = figures.sweeps(data, values, chart_list)
    completed = sum(1 for m in data.models if m["status"] == "completed")
    context = {
        "title": f"robmia-db report: {data.experiment or data.db_path.stem}",
        "data": data,
        "store_name": data.db_path.name,
        "overview": tables.overview(data),
        "paper_tables": paper_tables,
        "paper_attack": PAPER_ATTACK,
        "has_paper_metrics": any(row["attack"] == PAPER_ATTACK for row in data.metrics),
        "leaderboards": leaderboards,
        "open_leaderboards": len(leaderboards) <= OPEN_LEADERBOARD_MODELS,
        "roc": roc,
        "attack_roc": attack_roc,
        "histograms": histograms,
        "charted_models": len(data.chart_models),
        "n_configurations": len(
            {queries.configuration(m) for m in data.models if m["status"] == "completed"}
        ),
        "n_completed": completed,
        "max_model_charts": queries.MAX_MODEL_CHARTS,
        "gap": gap,
        "sweeps": sweeps,
        "n_sweeps": n_sweeps,
        "timings": tables.timings(data),
        "bundle": charts.vega_bundle(),
        "n_charts": len(chart_list.slots),
        "histogram_bins": queries.HISTOGRAM_BINS,
        "roc_buckets": queries.ROC_FPR_BUCKETS,
        "roc_per_model": queries.ROC_CURVES_PER_MODEL,
        "version": _robmia_version(),
    }
    html = _environment().get_template("report.html.j2").render(**context)
    return html, chart_list.slots


def _robmia_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("robmia-db")
    except metadata.PackageNotFoundError:
        return "unknown"


def default_output(db_path: str | Path, experiment: str | None = None) -> Path:
    """`reports/<store stem>.html` (with `-<experiment>` when the report is for one experiment)."""
    stem = Path(db_path).stem
    if experiment:
        stem += f"-{slug(experiment)}"
    return Path("reports") / f"{stem}.html"


def build_report(
    db_path: str | Path,
    output: str | Path | None = None,
    experiment: str | None = None,
    static: str | None = None,
    attacks: Sequence[str] | None = None,
    exclude_attacks: Sequence[str] | None = None,
) -> Path:
    """Write the self-contained HTML report of a store.

    Args:
        db_path: The store file.
        output: Page to write; default `reports/<store stem>.html`.
        experiment: Only this experiment's models; None for all.
        static: ``"png"`` or ``"svg"`` to also write every chart as a file in `<page stem>-charts/`.
        attacks: Only these attacks; None for every scored attack.
        exclude_attacks: Leave these attacks out (an unknown name is an error).

    Returns:
        The path of the written page.

    Raises:
        StoreError: if the store is missing or unusable, or has no experiment of that name.
        ValueError: if `static` is not None, ``"png"`` or ``"svg"``.
    """
    if static is not None and static not in STATIC_FORMATS:
        raise ValueError(f"static must be one of {STATIC_FORMATS}, not {static!r}")
    data = collect_report_data(db_path, experiment, attacks=attacks, exclude_attacks=exclude_attacks)
    html, slots = render_report(data)
    path = Path(output) if output is not None else default_output(db_path, experiment)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    if static:
        folder = path.with_name(path.stem + "-charts")
        folder.mkdir(exist_ok=True)
        for slot in slots:
            charts.export_static(slot.spec, folder / slot.name, static)
    return path
