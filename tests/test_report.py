"""`robmia-db report`: page structure and numbers against the views and independent references (sklearn, numpy).

The store is the session's tiny trained store plus a second seed and a wider natural model (a width
sweep), scored by the real `score_attacks`. Numbers in the page are read back from data attributes and
compared with v_models / v_metrics and with scikit-learn's ROC on the per-sample rows.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import duckdb
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REPO, TrainedStore, merged, toml_dumps
from scipy import stats
from sklearn.metrics import roc_curve

from robmia_db.cli import main
from robmia_db.errors import StoreError
from robmia_db.report import build_report
from robmia_db.report.queries import HISTOGRAM_BINS, MAX_MODEL_CHARTS, ROC_CURVES_PER_MODEL

XSS_DESCRIPTION = "<script>document.body.setAttribute('data-pwned','1')</script> & friends"
XSS_MODEL_NAME = "<img src=x onerror=alert(1)></script><script>alert(2)</script>"

# --------------------------------------------------------------------------------------------- parsing


class Node:
    def __init__(self, tag: str, attrs: dict[str, str | None], parent: Node | None):
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Node] = []
        self.text_parts: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self.text_parts) + "".join(child.text for child in self.children)

    def iter(self):
        yield self
        for child in self.children:
            yield from child.iter()

    def find_all(self, tag: str | None = None, **attrs: str) -> list[Node]:
        found = []
        for node in self.iter():
            if tag is not None and node.tag != tag:
                continue
            if all(node.attrs.get(key.replace("_", "-")) == value for key, value in attrs.items()):
                found.append(node)
        return found

    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())


VOID = {"meta", "br", "img", "link", "input", "hr", "col", "source", "wbr"}


class TreeBuilder(HTMLParser):
    """A minimal DOM from the standard library's parser (script bodies arrive as one text chunk)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {}, None)
        self.current = self.root

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs), self.current)
        self.current.children.append(node)
        if tag not in VOID:
            self.current = node

    def handle_startendtag(self, tag, attrs):
        self.current.children.append(Node(tag, dict(attrs), self.current))

    def handle_endtag(self, tag):
        node = self.current
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.current = node.parent

    def handle_data(self, data):
        self.current.text_parts.append(data)


def parse(html: str) -> Node:
    builder = TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder.root


def chart_specs(root: Node) -> dict[str, dict]:
    """Chart container id -> its Vega-Lite spec, read from the JSON script the container points at."""
    scripts = {
        n.attrs.get("id"): n for n in root.find_all("script") if n.attrs.get("type") == "application/json"
    }
    specs = {}
    for box in root.find_all("div"):
        if "chart" in box.classes():
            specs[box.attrs["id"]] = json.loads(scripts[box.attrs["data-spec"]].text)
    return specs


def section(root: Node, name: str) -> Node:
    (found,) = root.find_all("section", data_section=name)
    return found


# ------------------------------------------------------------------------------------------ references


def best_balanced_accuracy(scores: np.ndarray, is_member: np.ndarray) -> float:
    """The paper's inference accuracy from scikit-learn's ROC (member iff score >= threshold)."""
    fpr, tpr, _ = roc_curve(is_member.astype(int), scores, drop_intermediate=False)
    return max(0.5, float(np.max(0.5 * (tpr + 1.0 - fpr))))


def view_rows(db: Path, sql: str) -> list[dict]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.sql(sql).to_arrow_table().to_pylist()
    finally:
        con.close()


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def report_store(trained_store: TrainedStore, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Trained store + seed 1 + a width-2 natural model (with an HTML-laden description), scored."""
    from conftest import use_one_torch_thread

    use_one_torch_thread()
    from robmia_db.attacks.scoring import score_attacks
    from robmia_db.runner.executor import run_specs

    folder = tmp_path_factory.mktemp("report")
    db = trained_store.copy_to(folder / "store")
    seeds = folder / "seeds.toml"
    seeds.write_text(
        toml_dumps(merged(trained_store.spec, {"training": {"seeds": [0, 1]}})), encoding="utf-8"
    )
    wide = folder / "wide.toml"
    wide.write_text(
        toml_dumps(
            merged(
                trained_store.spec,
                {
                    "experiment": {"name": "tiny-wide", "description": XSS_DESCRIPTION},
                    "model": {"width": 2.0},
                    "training": {"defenses": ["natural"], "seeds": [0]},
                },
            )
        ),
        encoding="utf-8",
    )
    summary = run_specs([seeds, wide], db)
    assert not summary.failed
    score_attacks(db, attacks=["confidence", "loss", "adv_loss_gap"])
    # calibrated accuracy needs reference models this store lacks; one value shows the column appears
    con = duckdb.connect(str(db))
    con.execute(
        """UPDATE metrics SET calibrated_accuracy = 0.5321 WHERE attack_key = (SELECT attack_key FROM attacks
           WHERE name = 'loss') AND perturbation = 'benign' AND model_key = (SELECT min(model_key) FROM models)"""
    )
    con.close()
    return db


@pytest.fixture(scope="module")
def report_page(report_store: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Node]:
    path = build_report(report_store, output=tmp_path_factory.mktemp("page") / "report.html")
    html = path.read_text(encoding="utf-8")
    return path, html, parse(html)


# ------------------------------------------------------------------------------------------------ tests


def test_page_has_every_section_and_is_self_contained(report_page):
    _, html, root = report_page
    for name in (
        "overview",
        "paper-table",
        "leaderboard",
        "roc",
        "histograms",
        "gap",
        "sweeps",
        "provenance",
    ):
        assert section(root, name) is not None
    # nothing loads from anywhere: no element with a source, no stylesheet link, links only within the page
    assert not [
        n.tag for n in root.iter() if "src" in n.attrs or n.tag in ("link", "iframe", "object", "embed")
    ]
    assert all(n.attrs["href"].startswith("#") for n in root.iter() if "href" in n.attrs)
    (style,) = root.find_all("style")
    assert "url(" not in style.text and "@import" not in style.text
    assert re.search(r'http-equiv="Content-Security-Policy" content="default-src \'none\'', html)
    # the bundle is inlined exactly once
    assert html.count("vegaEmbed") >= 1
    bundles = [n for n in root.find_all("script") if "type" not in n.attrs and len(n.text) > 100_000]
    assert len(bundles) == 1


def test_every_chart_spec_is_valid_vega_lite_and_small(report_page, report_store):
    from altair.utils.schemapi import validate_jsonschema
    from altair.vegalite.v6.schema import load_schema

    _, _, root = report_page
    schema = load_schema()
    specs = chart_specs(root)
    # 3 configurations (natural w1, pgd_at, natural w2): ROC + histogram each, the gap chart, one sweep,
    # and one ROC per (dataset, attack) with every defense on it
    per_attack = len(view_rows(report_store, "SELECT DISTINCT dataset, attack FROM v_metrics"))
    assert per_attack >= 1
    assert len(specs) == 3 + 3 + 1 + 1 + per_attack
    for spec in specs.values():
        validate_jsonschema(spec, schema)
        for name, rows in spec.get("datasets", {}).items():
            assert len(rows) <= 5000, name


def test_paper_table_matches_views_and_sklearn(report_page, report_store):
    _, _, root = report_page
    models = {m["model_key"]: m for m in view_rows(report_store, "SELECT * FROM v_models")}
    signals = view_rows(
        report_store,
        "SELECT model_key, perturbation, kind, is_member, confidence FROM v_signals ORDER BY ALL",
    )
    (table,) = section(root, "paper-table").find_all("table", data_dataset="digits")
    rows = table.find_all("tr")[1:]
    assert [r.attrs["data-defense"] for r in rows] == ["natural", "natural", "pgd_at"]
    assert "width=2" in rows[1].text and "width=1" in rows[0].text
    checked = 0
    for row in rows:
        keys = row.attrs["data-models"].split()
        assert int(row.find_all("td", data_col="n_models")[0].text) == len(keys)
        references = {}
        for column in ("train_acc", "test_acc", "adv_train_acc", "adv_test_acc"):
            references[column] = [models[k][column] for k in keys]
        for column, perturbation in (("i_b", "benign"), ("i_a", "pgd")):
            references[column] = []
            for key in keys:
                rows_of = [s for s in signals if s["model_key"] == key and s["perturbation"] == perturbation]
                scores = np.array([s["confidence"] for s in rows_of], dtype=np.float64)
                members = np.array([s["is_member"] for s in rows_of])
                references[column].append(best_balanced_accuracy(scores, members))
        for column, values in references.items():
            (cell,) = row.find_all("td", data_col=column)
            assert float(cell.attrs["data-mean"]) == pytest.approx(np.mean(values), abs=1e-12)
            assert int(cell.attrs["data-n"]) == len(values)
            if len(values) > 1:
                assert float(cell.attrs["data-std"]) == pytest.approx(np.std(values, ddof=1), abs=1e-12)
                assert "±" in cell.text
            else:
                assert cell.attrs["data-std"] == ""
            assert cell.text.split("±")[0].split("[")[0].strip() == f"{100 * np.mean(values):.2f}"
            # issue 10: the 95 % interval, over the row's models (scipy's t) or the model's stored bootstrap one
            if len(values) > 1:
                low = high = np.mean(values)  # a zero spread (scipy would give NaN): the point itself
                if np.std(values) > 0:
                    low, high = stats.t.interval(
                        0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values)
                    )
                assert cell.attrs["data-ci-source"] == "models"
                assert float(cell.attrs["data-ci-low"]) == pytest.approx(low, abs=1e-6)
                assert float(cell.attrs["data-ci-high"]) == pytest.approx(high, abs=1e-6)
            elif column in ("i_b", "i_a"):
                assert cell.attrs["data-ci-source"] == "bootstrap"
                assert float(cell.attrs["data-ci-low"]) <= float(cell.attrs["data-mean"])
                assert f"[{100 * float(cell.attrs['data-ci-low']):.2f}, " in cell.text
            checked += 1
    assert checked == 3 * 6
    # no verified perturbation in this store: no verified columns
    assert not table.find_all("th", data_col="verified_train_acc")


def test_leaderboard_matches_v_metrics_and_marks_the_best(report_page, report_store):
    _, _, root = report_page
    metrics = view_rows(report_store, "SELECT * FROM v_metrics")
    tables = section(root, "leaderboard").find_all("table", **{"class": "leaderboard"})
    assert {t.attrs["data-model-key"] for t in tables} == {m["model_key"] for m in metrics}
    calibrated_seen = False
    for table in tables:
        key = table.attrs["data-model-key"]
        expected = {(m["attack"], m["perturbation"]): m for m in metrics if m["model_key"] == key}
        columns = [th.attrs.get("data-col") for th in table.find_all("th")]
        value_columns = [c for c in columns if c]
        rows = table.find_all("tr")[1:]
        assert len(rows) == len(expected)
        accuracies = []
        for row in rows:
            metric = expected[(row.attrs["data-attack"], row.attrs["data-perturbation"])]
            cells = row.find_all("td")[3:]
            assert len(cells) == len(value_columns)
            for column, cell in zip(value_columns, cells, strict=True):
                if metric[column] is None:
                    assert (
                        cell.attrs["data-value"] == "" and cell.text == "—" and "best" not in cell.classes()
                    )
                    continue
                assert float(cell.attrs["data-value"]) == metric[column]
                assert cell.text.split("★")[0].strip() == f"{100 * metric[column]:.2f}"
                best = max(m[column] for m in expected.values() if m[column] is not None)
                assert ("best" in cell.classes()) == (metric[column] == best)
            accuracies.append(metric["balanced_accuracy"])
        assert accuracies == sorted(accuracies, reverse=True)
        if "calibrated_accuracy" in value_columns:
            calibrated_seen = True
            assert any(m["calibrated_accuracy"] == 0.5321 for m in expected.values())
    assert calibrated_seen


def test_roc_points_are_vertices_of_sklearns_curve(report_page, report_store):
    _, _, root = report_page
    specs = chart_specs(root)
    scores = view_rows(
        report_store, "SELECT model_name, attack, perturbation, score, is_member FROM v_scores"
    )
    metrics = view_rows(report_store, "SELECT * FROM v_metrics")
    roc_specs = [s for s in specs.values() if "roc_points" in s.get("datasets", {})]
    assert len(roc_specs) == 3
    for spec in roc_specs:
        model = spec["title"]
        labels = {c["c"]: c["curve"] for c in spec["datasets"]["curves"]}
        top = sorted(
            (m for m in metrics if m["model_name"] == model),
            key=lambda m: (-m["balanced_accuracy"], -m["auc"], m["attack"], m["perturbation"]),
        )[:ROC_CURVES_PER_MODEL]
        assert len(labels) == len(top)
        for rank, m in enumerate(top, start=1):
            assert labels[rank - 1].startswith(f"{rank}. {m['attack']} on {m['perturbation']}")
            assert labels[rank - 1].endswith(f" · bal. acc. {100 * m['balanced_accuracy']:.2f}%")
        for index, metric in enumerate(top):
            rows = [
                r
                for r in scores
                if r["model_name"] == model
                and r["attack"] == metric["attack"]
                and r["perturbation"] == metric["perturbation"]
            ]
            fpr, tpr, _ = roc_curve(
                np.array([r["is_member"] for r in rows], dtype=int),
                np.array([r["score"] for r in rows]),
                drop_intermediate=False,
            )
            vertices = np.c_[fpr, tpr]
            points = [p for p in spec["datasets"]["roc_points"] if p["c"] == index]
            assert 10 < len(points) <= 5000
            for p in points:
                assert np.min(np.abs(vertices - [p["fpr"], p["tpr"]]).sum(axis=1)) < 1e-6
            # the curve ends at (1, 1) and is monotone
            assert points[-1]["fpr"] == 1.0 and points[-1]["tpr"] == 1.0
            assert all(a["fpr"] <= b["fpr"] and a["tpr"] <= b["tpr"] for a, b in zip(points, points[1:]))


def test_histograms_match_numpy(report_page, report_store):
    _, _, root = report_page
    specs = chart_specs(root)
    signals = view_rows(report_store, "SELECT model_name, kind, is_member, confidence, loss FROM v_signals")
    hist_specs = [s for s in specs.values() if "hist_bins" in s.get("datasets", {})]
    assert len(hist_specs) == 3
    for spec in hist_specs:
        model = spec["title"]
        bins = spec["datasets"]["hist_bins"]
        for kind in ("benign", "adversarial"):
            for group, member in (("members", True), ("non-members", False)):
                values = np.array(
                    [
                        s["confidence"]
                        for s in signals
                        if s["model_name"] == model and s["kind"] == kind and s["is_member"] is member
                    ],
                    dtype=np.float64,
                )
                reference, _ = np.histogram(values, bins=HISTOGRAM_BINS, range=(0.0, 1.0))
                shares = np.zeros(HISTOGRAM_BINS)
                for b in bins:
                    if b["signal"] == "confidence" and b["kind"] == kind and b["group"] == group:
                        shares[int(round(b["start"] * HISTOGRAM_BINS))] = b["share"]
                assert np.abs(shares - reference / values.size).sum() <= 2.0 / values.size + 1e-9
                # loss bins: [min, 99th percentile] of this kind alone (both groups), larger losses in
                # the last bin; numpy's histogram of the clipped losses is the reference
                kind_losses = np.array(
                    [s["loss"] for s in signals if s["model_name"] == model and s["kind"] == kind]
                )
                lo, hi = kind_losses.min(), np.quantile(kind_losses, 0.99)
                losses = np.array(
                    [s["loss"] for s in signals if s["model_name"] == model and s["kind"] == kind
                     and s["is_member"] is member]
                )  # fmt: skip
                reference, edges = np.histogram(np.clip(losses, lo, hi), bins=HISTOGRAM_BINS, range=(lo, hi))
                shares = np.zeros(HISTOGRAM_BINS)
                for b in bins:
                    if b["signal"] == "loss" and b["kind"] == kind and b["group"] == group:
                        index = int(round((b["start"] - lo) / (hi - lo) * HISTOGRAM_BINS))
                        assert b["start"] == pytest.approx(edges[index], abs=1e-5)
                        shares[index] = b["share"]
                assert shares.sum() == pytest.approx(1.0, abs=1e-5)
                assert np.abs(shares - reference / losses.size).sum() <= 2.0 / losses.size + 1e-5


def test_gap_and_sweep_charts_match_views(report_page, report_store):
    _, _, root = report_page
    specs = chart_specs(root)
    models = view_rows(report_store, "SELECT * FROM v_models ORDER BY model_name")
    metrics = view_rows(
        report_store, "SELECT * FROM v_metrics WHERE attack = 'confidence' AND perturbation = 'pgd'"
    )
    i_a = {m["model_name"]: m["balanced_accuracy"] for m in metrics}
    (gap,) = [s for s in specs.values() if "gap_models" in s.get("datasets", {})]
    points = {p["model"]: p for p in gap["datasets"]["gap_models"]}
    assert set(points) == {m["model_name"] for m in models}
    for m in models:
        assert points[m["model_name"]]["gap"] == pytest.approx(
            100 * (m["adv_train_acc"] - m["adv_test_acc"]), abs=1e-3
        )
        assert points[m["model_name"]]["inference"] == pytest.approx(100 * i_a[m["model_name"]], abs=1e-3)
    sweeps = [s for s in specs.values() if s.get("title", "").endswith("· width")]
    assert len(sweeps) == 1
    naturals = [m for m in models if m["defense"] == "natural"]
    for width in (1.0, 2.0):
        at = [m for m in naturals if m["width"] == width]
        for quantity, column in (("train acc", "train_acc"), ("adv-test acc", "adv_test_acc")):
            (point,) = [
                p
                for p in sweeps[0]["datasets"]["sweep_points"]
                if p["value"] == width and p["quantity"] == quantity
            ]
            assert point["mean"] == pytest.approx(100 * np.mean([m[column] for m in at]), abs=1e-3)


def test_overview_and_provenance(report_page, report_store):
    _, _, root = report_page
    overview = section(root, "overview")
    assert overview.find_all("dd", data_count="models")[0].text.startswith("5 (5 completed")
    assert {n.attrs["data-experiment"] for n in overview.find_all("tr") if "data-experiment" in n.attrs} == {
        "tiny",
        "tiny-wide",
    }
    attacks = {n.attrs["data-attack"] for n in overview.find_all("tr") if "data-attack" in n.attrs}
    assert attacks == {"confidence", "loss", "adv_loss_gap"}
    provenance = section(root, "provenance")
    specs = {n.attrs["data-experiment"]: n.text for n in provenance.find_all("pre")}
    stored = {r["experiment"]: r["spec_text"] for r in view_rows(report_store, "SELECT * FROM v_experiments")}
    assert specs == stored
    commit = view_rows(report_store, "SELECT DISTINCT git_commit FROM v_models")[0]["git_commit"]
    assert (commit or "unknown") in provenance.text


def test_user_text_is_escaped_everywhere(report_store, tmp_path):
    db = tmp_path / "xss.duckdb"
    db.write_bytes(report_store.read_bytes())
    con = duckdb.connect(str(db))
    con.execute("UPDATE models SET model_name = ? WHERE defense = 'pgd_at' AND seed = 0", [XSS_MODEL_NAME])
    con.execute("UPDATE attacks SET title = ? WHERE name = 'loss'", ["<b onmouseover=alert(3)>loss</b>"])
    con.execute(
        "UPDATE experiments SET spec_text = spec_text || ? WHERE name = 'tiny'",
        ["\n# </pre></script><script>alert(4)</script>"],
    )
    con.close()
    html = build_report(db, output=tmp_path / "xss.html").read_text(encoding="utf-8")
    root = parse(html)
    # only our two scripts run; everything else is JSON data
    runnable = [n for n in root.find_all("script") if n.attrs.get("type") != "application/json"]
    assert len(runnable) == 2
    assert not [n for n in root.iter() if any(name.startswith("on") for name in n.attrs)]
    assert not root.find_all("img") and not root.find_all("b")
    # shown as text
    assert XSS_MODEL_NAME in section(root, "leaderboard").text
    assert XSS_DESCRIPTION in section(root, "overview").text
    assert "</pre></script><script>alert(4)</script>" in section(root, "provenance").text
    # inside chart JSON, `<` is escaped so no `</script>` can end the data block early
    specs = chart_specs(root)
    assert any(s.get("title") == XSS_MODEL_NAME for s in specs.values())
    for script in root.find_all("script"):
        if script.attrs.get("type") == "application/json":
            assert "<" not in script.text


def test_attack_descriptions_and_package_versions_when_the_views_have_them(report_store, tmp_path):
    """The report shows attack descriptions (v_attacks) and package versions (v_models.package_versions)."""
    db = tmp_path / "views.duckdb"
    db.write_bytes(report_store.read_bytes())
    con = duckdb.connect(str(db))
    con.execute("UPDATE attacks SET description = ? WHERE name = 'loss'", ["<i>lower</i> loss = member"])
    versions = json.loads(con.execute("SELECT any_value(package_versions) FROM models").fetchone()[0])
    con.close()
    root = parse(build_report(db, output=tmp_path / "v.html").read_text(encoding="utf-8"))
    (row,) = section(root, "overview").find_all("tr", data_attack="loss")
    assert "<i>lower</i> loss = member" in row.text and not row.find_all("i")
    (table,) = section(root, "provenance").find_all("table", **{"class": "packages"})
    for name, version in versions.items():
        assert f"{name} {version}" in table.text


def test_experiment_filter_default_output_and_cli(report_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(main, ["report", "--db", str(report_store), "--experiment", "tiny-wide"])
    assert result.exit_code == 0, result.output
    expected = Path("reports") / f"{report_store.stem}-tiny-wide.html"
    assert result.output.strip() == str(expected)
    root = parse(expected.read_text(encoding="utf-8"))
    assert section(root, "overview").find_all("dd", data_count="models")[0].text.startswith("1 (")
    (row,) = section(root, "paper-table").find_all("tr", data_defense="natural")
    assert len(row.attrs["data-models"].split()) == 1
    # no sweep in one model: a sentence instead of a chart
    assert "No sweep" in section(root, "sweeps").text and not section(root, "sweeps").find_all("div")

    result = runner.invoke(main, ["report", "--db", str(report_store)])
    assert result.exit_code == 0 and result.output.strip() == str(
        Path("reports") / f"{report_store.stem}.html"
    )

    result = runner.invoke(main, ["report", "--db", str(report_store), "--experiment", "nope"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: --experiment nope: no such experiment in {report_store} (experiments: tiny, tiny-wide)"
    ]
    result = runner.invoke(main, ["report", "--db", str(tmp_path / "missing.duckdb")])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert result.output.startswith("Error: no store at")
    assert "Example: robmia-db report" in runner.invoke(main, ["report", "--help"]).output
    with pytest.raises(StoreError):
        build_report(tmp_path / "missing.duckdb")


def test_attack_filters_choose_what_the_page_shows(report_store, tmp_path):
    runner = CliRunner()
    scored = {m["attack"] for m in view_rows(report_store, "SELECT DISTINCT attack FROM v_metrics")}
    assert scored == {"confidence", "loss", "adv_loss_gap"}

    def shown(*args: str) -> tuple[set[str], set[str]]:
        page = tmp_path / "f.html"
        result = runner.invoke(main, ["report", "--db", str(report_store), "-o", str(page), *args])
        assert result.exit_code == 0, result.output
        root = parse(page.read_text(encoding="utf-8"))
        left_out = [n for n in section(root, "overview").find_all("dd") if "data-left-out" in n.attrs]
        paper_note = "is left out of this report" in section(root, "paper-table").text
        assert paper_note == (left_out != [] and "confidence" in left_out[0].attrs["data-left-out"].split())
        rows = section(root, "leaderboard").find_all("tr")
        in_boards = {r.attrs["data-attack"] for r in rows if "data-attack" in r.attrs}
        specs = chart_specs(root).values()
        curves = {
            label["curve"].split(". ", 1)[1].split(" on ")[0]
            for spec in specs
            if "roc_points" in spec.get("datasets", {})
            for label in spec["datasets"]["curves"]
        }
        per_attack = {
            spec["title"].split(" · ")[0] for spec in specs if "attack_roc_points" in spec.get("datasets", {})
        }
        return in_boards, curves, per_attack

    for args, expected in [
        ((), scored),
        (("--attack", "loss", "--attack", "confidence"), {"loss", "confidence"}),
        (("--exclude-attack", "loss"), {"confidence", "adv_loss_gap"}),
        (("--attack", "adv_loss_gap"), {"adv_loss_gap"}),
        (("--exclude-attack", "confidence"), {"loss", "adv_loss_gap"}),
    ]:
        boards, curves, per_attack = shown(*args)
        assert boards == expected, args
        assert curves and curves <= expected, args
        assert per_attack == expected, args
    for args, message in [
        (
            ("--attack", "nope"),
            f"Error: --attack nope: not scored on these models in {report_store} "
            "(scored attacks: adv_loss_gap, confidence, loss)",
        ),
        (
            ("--exclude-attack", "loss", "--exclude-attack", "lss"),
            f"Error: --exclude-attack lss: not scored on these models in {report_store} "
            "(scored attacks: adv_loss_gap, confidence, loss)",
        ),
        (
            ("--attack", "loss", "--exclude-attack", "loss"),
            "Error: --attack / --exclude-attack leave no attack to report",
        ),
    ]:
        result = runner.invoke(
            main, ["report", "--db", str(report_store), "-o", str(tmp_path / "x.html"), *args]
        )
        assert result.exit_code == 1
        assert result.output.strip().splitlines() == [message]
    assert not (tmp_path / "x.html").exists()


def test_static_export_writes_each_chart(report_store, tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "report",
            "--db",
            str(report_store),
            "--experiment",
            "tiny-wide",
            "-o",
            str(tmp_path / "w.html"),
            "--static",
            "svg",
        ],
    )
    assert result.exit_code == 0, result.output
    root = parse((tmp_path / "w.html").read_text(encoding="utf-8"))
    names = sorted(box.attrs["data-name"] for box in root.find_all("div") if "chart" in box.classes())
    files = sorted(p.stem for p in (tmp_path / "w-charts").glob("*.svg"))
    per_attack = view_rows(
        report_store,
        "SELECT DISTINCT dataset, attack FROM v_metrics WHERE model_name IN "
        "(SELECT model_name FROM v_models WHERE experiment = 'tiny-wide')",
    )
    # ROC, histogram, gap, and one ROC per attack with every defense on it
    assert files == names and len(names) == 3 + len(per_attack)
    for path in (tmp_path / "w-charts").glob("*.svg"):
        text = path.read_text(encoding="utf-8")
        assert text.startswith("<svg") and "<path" in text
    page = build_report(report_store, output=tmp_path / "p.html", experiment="tiny-wide", static="png")
    pngs = sorted((page.parent / "p-charts").glob("*.png"))
    assert len(pngs) == 3 + len(per_attack) and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    with pytest.raises(ValueError):
        build_report(report_store, output=tmp_path / "q.html", static="gif")


def test_store_without_scores_says_so(trained_store: TrainedStore, tmp_path):
    root = parse(build_report(trained_store.db, output=tmp_path / "r.html").read_text(encoding="utf-8"))
    for name, sentence in (
        ("leaderboard", "No attack metrics"),
        ("roc", "No per-sample attack scores"),
        ("gap", "no gap to plot"),
        ("sweeps", "No sweep"),
    ):
        assert sentence in section(root, name).text
        assert not section(root, name).find_all("div")
    assert "has not been scored" in section(root, "paper-table").text
    # histograms need only signals, so they are drawn
    assert len(section(root, "histograms").find_all("div")) >= 2


def _synthetic_module():
    path = REPO / "benchmarks" / "bench_report.py"
    spec = importlib.util.spec_from_file_location("bench_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_large_store_stays_small_and_caps_charts(tmp_path, monkeypatch):
    from robmia_db.report import queries as report_queries

    bench = _synthetic_module()
    db = tmp_path / "synthetic.duckdb"
    bench.make_synthetic_store(db, n_models=40, n_attacks=3, n_examples=300)
    html = build_report(db, output=tmp_path / "s.html").read_text(encoding="utf-8")
    assert len(html.encode()) < 5_000_000
    root = parse(html)
    specs = chart_specs(root)
    # 20 configurations (4 defenses x 5 widths), one ROC and one histogram chart each
    assert len([s for s in specs.values() if "roc_points" in s.get("datasets", {})]) == 20 <= MAX_MODEL_CHARTS
    assert len([s for s in specs.values() if "hist_bins" in s.get("datasets", {})]) == 20
    for spec in specs.values():
        assert sum(len(rows) for rows in spec.get("datasets", {}).values()) <= 5000
    # verified signals: the verified columns and I_V appear in the paper table
    (table,) = section(root, "paper-table").find_all("table")
    assert {th.attrs.get("data-col") for th in table.find_all("th")} >= {"verified_train_acc", "i_v"}
    # 4 defenses x 5 widths x 2 seeds: each row pools 2 seeds
    rows = table.find_all("tr")[1:]
    assert len(rows) == 20 and all(r.find_all("td", data_col="n_models")[0].text == "2" for r in rows)
    assert len([s for s in specs.values() if s.get("title", "").endswith("· width")]) == 4

    monkeypatch.setattr(report_queries, "MAX_MODEL_CHARTS", 6)
    root = parse(build_report(db, output=tmp_path / "t.html").read_text(encoding="utf-8"))
    assert len([s for s in chart_specs(root).values() if "roc_points" in s.get("datasets", {})]) == 6
    assert "Showing the first 6 of 20 configurations" in section(root, "roc").text


def test_report_layer_never_imports_torch(report_store, tmp_path):
    code = (
        "import sys\n"
        "from robmia_db.report import build_report\n"
        f"build_report({str(report_store)!r}, output={str(tmp_path / 'x.html')!r})\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "x.html").stat().st_size > 500_000
