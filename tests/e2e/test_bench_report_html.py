"""The HTML report of a sweep, opened in headless Chromium: it loads with no error, every chart is
drawn (non-empty SVG elements per chart), nothing is fetched from the network, and a screenshot is
taken (kept under $LEANSERVE_ARTIFACTS when set, else in pytest's tmp dir).

Skips only when no Chromium is installed (``apt-get install -y chromium``; CI installs it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections import defaultdict
from html.parser import HTMLParser
from pathlib import Path

import pytest

from leanserve.bench.cli import main
from tests.stub_server import serve_in_subprocess

pytestmark = pytest.mark.e2e

CHROMIUM = next((p for p in (shutil.which("chromium"), "/usr/bin/chromium", shutil.which("chromium-browser"),
                             shutil.which("google-chrome")) if p and Path(p).exists()), None)
SWEEP_LINE_CHARTS = ("throughput-vs-load", "ttft-vs-load", "tpot-vs-load", "e2el-vs-load", "cost-vs-load")
CDF_CHARTS = ("ttft-cdf", "tpot-cdf", "itl-cdf", "e2el-cdf")


class ChartCounter(HTMLParser):
    """Counts drawn SVG elements inside each <figure class="chart" data-chart=NAME>."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str | None] = []  # chart name per open <figure>
        self.counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.external: list[str] = []

    @property
    def chart(self) -> str | None:
        return next((c for c in reversed(self.stack) if c), None)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        for key in ("src", "href"):
            if (a.get(key) or "").startswith(("http:", "https:", "//")):
                self.external.append(a[key] or "")
        if tag == "figure":
            self.stack.append(a.get("data-chart") if "chart" in (a.get("class") or "") else None)
            return
        chart = self.chart
        if chart is None:
            return
        if tag == "svg":
            self.counts[chart]["svg"] += 1
        elif tag == "path" and len(a.get("d") or "") > 10:
            self.counts[chart]["path"] += 1
        elif tag == "rect" and "bar" in (a.get("class") or "") and float(a.get("height") or 0) > 0:
            self.counts[chart]["bar"] += 1
        elif tag == "circle" and float(a.get("r") or 0) > 0:
            self.counts[chart]["circle"] += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "figure" and self.stack:
            self.stack.pop()


def chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    profile = tmp / "chromium-profile"
    profile.mkdir(exist_ok=True)
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def sweep_report(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("sweep")
    html, js = tmp / "sweep.html", tmp / "sweep.json"
    # At most 2 requests served at once: the ramp finds the knee at concurrency 2.
    # Past the knee throughput still creeps up a few % (no idle gap between queued requests), so the
    # growth threshold is 25%: doubling below the knee doubles throughput.
    with serve_in_subprocess("--ttft-ms", "50", "--itl-ms", "20", "--max-concurrency", "2") as url:
        rc = main(["--base-url", url, "--workload", "random", "--input-len", "16", "--num-prompts", "8",
                   "--output-len", "6", "--sweep", "--sweep-threshold", "0.25", "--sweep-rates", "0.5,0.8",
                   "--hardware", "cpu-local",
                   "--json", str(js), "--html", str(html), "--no-progress", "--quiet"])
    assert rc == 0
    return html, json.loads(js.read_text())


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not found: apt-get install -y chromium")
def test_sweep_report_renders_every_chart_in_chromium(sweep_report, tmp_path):
    html, result = sweep_report
    assert result["saturation"]["concurrency"] == 2
    n_runs = len(result["runs"])

    dom = chromium("--dump-dom", html.as_uri(), tmp=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    console_errors = [line for line in dom.stderr.splitlines()
                      if "CONSOLE" in line and ("Uncaught" in line or "Error" in line)]
    assert not console_errors, console_errors
    assert "<h1>leanserve bench sweep</h1>" in dom.stdout

    counter = ChartCounter()
    counter.feed(dom.stdout)
    assert not counter.external, counter.external
    for chart in SWEEP_LINE_CHARTS:
        c = counter.counts.get(chart)
        assert c and c["svg"] == 1, (chart, c)
        assert c["path"] >= 2, (chart, dict(c))  # one line per phase (ramp, rates) at least
        assert c["circle"] >= n_runs, (chart, dict(c))  # a point per run
    for chart in CDF_CHARTS:
        c = counter.counts.get(chart)
        assert c and c["svg"] == 1 and c["path"] == n_runs, (chart, c and dict(c))  # one CDF per run

    shot_dir = Path(os.environ.get("LEANSERVE_ARTIFACTS", tmp_path))
    shot_dir.mkdir(parents=True, exist_ok=True)
    shot = shot_dir / "bench-sweep-report.png"
    taken = chromium(f"--screenshot={shot}", "--window-size=1280,2000", html.as_uri(), tmp=tmp_path)
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert shot.is_file() and shot.stat().st_size > 20_000  # a blank page is a few kB


def test_sweep_report_is_self_contained(sweep_report):
    html, _ = sweep_report
    text = html.read_text()
    assert "<script" not in text  # charts are inline SVG, no JS needed
    counter = ChartCounter()
    counter.feed(text)
    assert not counter.external
    assert set(SWEEP_LINE_CHARTS + CDF_CHARTS) <= set(counter.counts)
