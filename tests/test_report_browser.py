"""The report in a real browser: headless Chromium, network off, every chart drawn, no console output.

Needs the Debian package `chromium`; skipped (with that reason) where it is not installed. The store is
synthetic (rows written straight into the real tables by benchmarks/bench_report.py) so that every chart
type appears: ROC, histograms with benign/adversarial/verified columns, the gap scatter and width sweeps.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import duckdb
import pytest
from test_report import REPO, chart_specs, parse

from robmia_db.report import build_report

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser") if shutil.which(name)), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)"
)

PAYLOAD = "<script>document.body.setAttribute('data-pwned','1')</script>"


def _synthetic_store(path: Path) -> Path:
    spec = importlib.util.spec_from_file_location("bench_report", REPO / "benchmarks" / "bench_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.make_synthetic_store(path, n_models=12, n_attacks=3, n_examples=400)
    con = duckdb.connect(str(path))
    # user text in a model name (chart titles and tooltips) and in the spec text
    con.execute(
        "UPDATE models SET model_name = ? WHERE model_key = (SELECT min(model_key) FROM models)", [PAYLOAD]
    )
    con.execute("UPDATE experiments SET spec_text = spec_text || ?", [f"# {PAYLOAD}\n"])
    con.close()
    return path


def _chromium(url: str, user_data: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            f"--user-data-dir={user_data}",
            # network off: every request goes to a dead proxy and no host name resolves
            "--proxy-server=127.0.0.1:9",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=20000",
            *extra,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_every_chart_draws_offline_with_a_clean_console(tmp_path):
    db = _synthetic_store(tmp_path / "synthetic.duckdb")
    page = build_report(db, output=tmp_path / "report.html")
    charts = chart_specs(parse(page.read_text(encoding="utf-8")))
    assert len(charts) >= 12 + 12 + 1 + 4  # ROC and histogram per configuration, the gap chart, sweeps

    result = _chromium(page.as_uri(), tmp_path / "profile", "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    # Chromium logs every console message (log, warn, error, uncaught exceptions, CSP violations) as CONSOLE
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []

    dom = parse(result.stdout)
    (body,) = dom.find_all("body")
    assert body.attrs.get("data-charts-done") == "1", "the chart script did not finish"
    assert body.attrs.get("data-charts-failed") == "0"
    assert body.attrs.get("data-charts-drawn") == str(len(charts))
    assert "data-js-errors" not in body.attrs
    assert "data-pwned" not in body.attrs, "injected markup ran"
    boxes = [node for node in dom.iter() if node.tag == "div" and "chart" in node.classes()]
    assert {box.attrs["id"] for box in boxes} == set(charts)
    for box in boxes:
        drawn = [n for n in box.iter() if n.tag in ("svg", "canvas")]
        assert drawn, f"{box.attrs['id']} has no svg or canvas"
        assert box.attrs.get("data-drawn") == "1"
    # the payload is visible as text (chart titles are SVG text)
    assert PAYLOAD in dom.find_all("section", data_section="provenance")[0].text
    assert any(PAYLOAD in box.text for box in boxes)
