"""Report layer: Altair charts as Vega-Lite dicts, the inlined Vega bundle and static export; imports altair, vl_convert.

Every chart takes already aggregated records (ROC points thinned in SQL, histogram bins counted in SQL),
so no chart ever carries per-sample rows. Specs are built with `validate=False` because schema
validation costs ~20 ms per chart; tests validate every spec against the Vega-Lite schema instead.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import altair as alt

# Altair refuses more than 5,000 rows per chart (docs conventions §7); our builders stay below it.
MAX_CHART_ROWS = 5000
VEGA_LITE_VERSION = "6.4"  # the bundle must match the schema Altair writes (altair 6 -> Vega-Lite 6.4)
KIND_ORDER = ["benign", "adversarial", "verified"]
MEMBER_COLORS = {"members": "#d62728", "non-members": "#1f77b4"}

_bundle_cache: str | None = None


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "robmia-db"


def vega_bundle() -> str:
    """The vega + vega-lite + vega-embed bundle that sets `window.vegaEmbed`, safe inside `<script>`.

    Building it takes ~5 s (vl-convert starts a JavaScript engine), so it is cached in memory and on
    disk under `$XDG_CACHE_HOME/robmia-db/`, keyed by the vl-convert and Vega-Lite versions.

    Returns:
        The JavaScript source, with any `</script` sequence escaped.
    """
    global _bundle_cache
    if _bundle_cache is not None:
        return _bundle_cache
    import vl_convert

    versions = f"{vl_convert.__version__}-vl{VEGA_LITE_VERSION}-embed{vl_convert.get_vega_embed_version()}"
    cache_path = _cache_dir() / f"vega-bundle-{versions}.js"
    bundle: str | None = None
    with contextlib.suppress(OSError):
        bundle = cache_path.read_text(encoding="utf-8")
    if not bundle:
        bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE_VERSION)
        with contextlib.suppress(OSError):
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(
                "w", encoding="utf-8", dir=cache_path.parent, delete=False, suffix=".tmp"
            ) as handle:
                handle.write(bundle)
            os.replace(handle.name, cache_path)
    # An HTML parser ends a script at the first `</script`, wherever it appears in the JavaScript.
    _bundle_cache = bundle.replace("</script", "<\\/script").replace("</SCRIPT", "<\\/SCRIPT")
    return _bundle_cache


def _finish(chart: alt.TopLevelMixin) -> dict[str, Any]:
    return (
        chart.configure_view(stroke="#ddd")
        .configure_axis(labelFontSize=11, titleFontSize=11)
        .to_dict(validate=False)
    )


def _with_data(
    skeleton: dict[str, Any], title: str, datasets: dict[str, Sequence[dict[str, Any]]]
) -> dict[str, Any]:
    # Altair walks, copies and partly validates every inline value (~0.5 s per 1,000-row chart), so the
    # skeletons use named data and the rows are attached to the finished dict as top-level `datasets`.
    for name, records in datasets.items():
        if len(records) > MAX_CHART_ROWS:
            raise ValueError(f"{name}: {len(records)} rows exceeds the {MAX_CHART_ROWS}-row chart limit")
    spec = copy.deepcopy(skeleton)
    if title:
        spec["title"] = title
    spec["datasets"] = {name: list(records) for name, records in datasets.items()}
    return spec


def _decades(low: float) -> list[float]:
    """Powers of ten from the one at or below `low` up to 1, the readable ticks of a log axis."""
    exponent = math.floor(math.log10(low)) if low > 0 else -4
    return [10.0**e for e in range(exponent, 1)]


@functools.lru_cache(maxsize=64)
def _roc_skeleton(min_fpr: float, points_name: str = "roc_points") -> dict[str, Any]:
    domain = [min_fpr, 1.0]
    ticks = _decades(min_fpr)

    def axis(title: str) -> alt.Axis:
        return alt.Axis(title=title, values=ticks, format="~g", gridOpacity=0.6)

    chance = alt.Chart(alt.NamedData(name="chance")).mark_line(color="#999", strokeDash=[4, 4], strokeWidth=1)
    chance = chance.encode(x=alt.X("fpr:Q"), y=alt.Y("tpr:Q"))
    curves = (
        alt.Chart(alt.NamedData(name=points_name))
        # points carry a curve number; the label is looked up so it is not repeated on every point
        .transform_lookup(
            lookup="c", from_=alt.LookupData(data=alt.NamedData(name="curves"), key="c", fields=["curve"])
        )
        .mark_line(strokeWidth=1.6, interpolate="step-after")
        .encode(
            x=alt.X(
                "fpr:Q",
                axis=axis("false positive rate"),
                scale=alt.Scale(type="log", domain=domain, clamp=True),
            ),
            y=alt.Y(
                "tpr:Q",
                axis=axis("true positive rate"),
                scale=alt.Scale(type="log", domain=domain, clamp=True),
            ),
            color=alt.Color(
                "curve:N", title=None, legend=alt.Legend(orient="bottom", columns=1, labelLimit=320)
            ),
            tooltip=[
                alt.Tooltip("curve:N"),
                alt.Tooltip("fpr:Q", format=".4g"),
                alt.Tooltip("tpr:Q", format=".4g"),
            ],
        )
    )
    return _finish(alt.layer(chance, curves).properties(width=300, height=260))


def roc_chart(
    points: Sequence[dict[str, Any]],
    curves: Sequence[str],
    min_fpr: float,
    title: str,
    points_name: str = "roc_points",
) -> dict[str, Any]:
    """ROC curves on log-log axes with the chance diagonal.

    Args:
        points: Records ``{"c", "fpr", "tpr"}`` with fpr, tpr > 0 (log axes cannot show 0); ``c`` is the
            index of the point's curve in `curves`.
        curves: Curve labels.
        min_fpr: Left end of both axes, normally 1 / (number of non-members).
        title: Chart title.
        points_name: Name of the points dataset (per-model and per-attack charts differ by it).

    Returns:
        A Vega-Lite spec.
    """
    chance = [{"fpr": min_fpr, "tpr": min_fpr}, {"fpr": 1.0, "tpr": 1.0}]
    labels = [{"c": index, "curve": label} for index, label in enumerate(curves)]
    return _with_data(
        _roc_skeleton(float(min_fpr), points_name),
        title,
        {points_name: points, "chance": chance, "curves": labels},
    )


@functools.lru_cache(maxsize=16)
def _histogram_skeleton(kinds: tuple[str, ...]) -> dict[str, Any]:
    order = [k for k in KIND_ORDER if k in kinds] + [k for k in kinds if k not in KIND_ORDER]
    base = (
        alt.Chart()
        .mark_bar(opacity=0.55, binSpacing=0)
        .encode(
            x=alt.X("start:Q", title=None, bin="binned"),
            x2="end:Q",
            y=alt.Y("share:Q", title="share of group", stack=None),
            color=alt.Color(
                "group:N",
                title=None,
                scale=alt.Scale(domain=list(MEMBER_COLORS), range=list(MEMBER_COLORS.values())),
                legend=alt.Legend(orient="top"),
            ),
            tooltip=[
                alt.Tooltip("group:N"),
                alt.Tooltip("start:Q", format=".4g"),
                alt.Tooltip("end:Q", format=".4g"),
                alt.Tooltip("share:Q", format=".3f"),
            ],
        )
        .properties(width=200, height=110)
    )
    chart = alt.FacetChart(
        data=alt.NamedData(name="hist_bins"),
        spec=base,
        facet=alt.FacetMapping(
            row=alt.FacetFieldDef(field="signal", type="nominal", title=None, sort=["confidence", "loss"]),
            column=alt.FacetFieldDef(field="kind", type="nominal", title=None, sort=order),
        ),
    ).resolve_scale(x="independent", y="independent")
    return _finish(chart)


def histogram_chart(bins: Sequence[dict[str, Any]], title: str, kinds: Sequence[str]) -> dict[str, Any]:
    """Member vs non-member histograms: one row per signal (confidence, loss), one column per kind.

    Args:
        bins: Records ``{"signal", "kind", "group", "start", "end", "share"}``; share is the fraction of
            the group's rows in the bin.
        title: Chart title.
        kinds: Perturbation kinds present, for the column order.

    Returns:
        A Vega-Lite spec.
    """
    return _with_data(_histogram_skeleton(tuple(kinds)), title, {"hist_bins": bins})


def gap_chart(points: Sequence[dict[str, Any]], y_title: str) -> dict[str, Any]:
    """Robustness generalization gap against inference accuracy, one point per model.

    Args:
        points: Records ``{"model", "dataset", "defense", "gap", "inference"}``, both in percent.
        y_title: Title of the inference-accuracy axis (which attack and inputs).

    Returns:
        A Vega-Lite spec.
    """
    chart = (
        alt.Chart(alt.NamedData(name="gap_models"))
        .mark_point(size=70, filled=True, opacity=0.8)
        .encode(
            x=alt.X("gap:Q", title="robustness generalization gap: adv. train − adv. test accuracy (%)"),
            y=alt.Y("inference:Q", title=y_title, scale=alt.Scale(zero=False)),
            color=alt.Color("defense:N", title="defense"),
            shape=alt.Shape("dataset:N", title="dataset"),
            tooltip=[
                alt.Tooltip("model:N"),
                alt.Tooltip("gap:Q", format=".2f"),
                alt.Tooltip("inference:Q", format=".2f"),
            ],
        )
        .properties(width=520, height=320)
    )
    return _with_data(_finish(chart), "", {"gap_models": points})


@functools.lru_cache(maxsize=64)
def _sweep_skeleton(parameter: str, settings: tuple[float, ...], log_x: bool) -> dict[str, Any]:
    # Ticks at the swept values only; a "nice" log domain would run to the next decade and crowd labels.
    domain = [min(settings), max(settings)]
    x_scale = (
        alt.Scale(type="log", domain=domain, nice=False) if log_x else alt.Scale(domain=domain, nice=False)
    )
    x = alt.X("value:Q", title=parameter, scale=x_scale, axis=alt.Axis(values=list(settings), format="~g"))
    line = (
        alt.Chart()
        .mark_line(point=True)
        .encode(
            x=x,
            y=alt.Y("mean:Q", title="%", scale=alt.Scale(zero=False)),
            color=alt.Color("quantity:N", title=None),
            tooltip=[
                alt.Tooltip("quantity:N"),
                alt.Tooltip("value:Q", title=parameter),
                alt.Tooltip("mean:Q", format=".2f"),
                alt.Tooltip("low:Q", format=".2f", title="95% low"),
                alt.Tooltip("high:Q", format=".2f", title="95% high"),
            ],
        )
    )
    # 95 % intervals (over seeds, or the bootstrap of a single model). A point without one gets a bar of
    # length 0 at its mean: a panel whose points all lack intervals would otherwise give the y scale an
    # infinite extent (Vega warns in the console and the panel's scale breaks).
    bars = (
        alt.Chart()
        .transform_calculate(
            bar_low="isValid(datum.low) ? datum.low : datum.mean",
            bar_high="isValid(datum.high) ? datum.high : datum.mean",
        )
        .mark_rule(opacity=0.6)
        .encode(x=x, y="bar_low:Q", y2="bar_high:Q", color="quantity:N")
    )
    base = alt.layer(line, bars).properties(width=260, height=200)
    chart = alt.FacetChart(
        data=alt.NamedData(name="sweep_points"),
        spec=base,
        facet=alt.FacetMapping(
            column=alt.FacetFieldDef(
                field="group", type="nominal", title=None, sort=["accuracy", "inference"]
            )
        ),
    ).resolve_scale(y="independent")
    return _finish(chart)


def sweep_chart(points: Sequence[dict[str, Any]], parameter: str, title: str, log_x: bool) -> dict[str, Any]:
    """Accuracies and inference accuracies against one swept parameter (means over seeds).

    Args:
        points: Records ``{"value", "quantity", "mean", "low", "high", "group"}`` (percent; low / high
            the 95 % interval or None; group says accuracy or inference, for the two panels).
        parameter: Name of the swept parameter, the x axis title.
        title: Chart title.
        log_x: Use a log x axis (for parameters spanning decades).

    Returns:
        A Vega-Lite spec.
    """
    settings = tuple(sorted({float(p["value"]) for p in points}))
    return _with_data(_sweep_skeleton(parameter, settings, log_x), title, {"sweep_points": points})


def export_static(spec: dict[str, Any], path: Path, fmt: str) -> Path:
    """Write one chart as PNG or SVG through vl-convert (no browser).

    Args:
        spec: A Vega-Lite spec from this module.
        path: Output file; its suffix is replaced by `fmt`.
        fmt: ``"png"`` or ``"svg"``.

    Returns:
        The written path.
    """
    import vl_convert

    target = path.with_suffix(f".{fmt}")
    if fmt == "svg":
        target.write_text(vl_convert.vegalite_to_svg(spec, vl_version=VEGA_LITE_VERSION), encoding="utf-8")
    elif fmt == "png":
        target.write_bytes(vl_convert.vegalite_to_png(spec, vl_version=VEGA_LITE_VERSION, scale=2))
    else:
        raise ValueError(f"static format must be png or svg, not {fmt!r}")
    return target
