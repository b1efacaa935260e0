"""The eval report opened in headless Chromium: it loads with no console error, fetches nothing, and
each task's quality-vs-cost chart has exactly one point (and one label) per configuration, placed
by cost and metric. A screenshot is kept under $LEANSERVE_ARTIFACTS when set.

The runs come from `leanserve eval` itself with a fake backend (tests/unit/test_eval_tasks.py), so
the page is the one users get. Skips only when no Chromium is installed (``apt-get install -y chromium``).
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from html.parser import HTMLParser
from pathlib import Path

import pytest

import leanserve.eval.cli as eval_cli
from leanserve.cli import main
from tests.e2e.test_bench_report_html import CHROMIUM, chromium
from tests.unit.test_eval_tasks import FakeBackend

pytestmark = pytest.mark.e2e

CONFIGS = (("base", 0.01), ("cheap", 0.004), ("pricey", 0.03))  # label, the fake's machine-seconds per token
TASKS = ("quiz", "docs")


class PointCounter(HTMLParser):
    """Per <figure class="chart" data-chart=NAME>: its circles (cx, cy, fill) and point labels."""

    def __init__(self) -> None:
        super().__init__()
        self.chart: str | None = None
        self.in_label = False
        self.points: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
        self.labels: dict[str, list[str]] = defaultdict(list)
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href"):
            if (a.get(key) or "").startswith(("http:", "https:", "//")):
                self.external.append(a[key])
        if tag == "figure" and "chart" in (a.get("class") or ""):
            self.chart = a.get("data-chart")
        elif self.chart and tag == "circle" and float(a.get("r") or 0) > 0:
            self.points[self.chart].append((float(a["cx"]), float(a["cy"]), a.get("fill")))
        elif self.chart and tag == "text" and a.get("class") == "point-label":
            self.in_label = True

    def handle_data(self, data):
        if self.in_label:
            self.labels[self.chart].append(data)

    def handle_endtag(self, tag):
        if tag == "text":
            self.in_label = False
        elif tag == "figure":
            self.chart = None


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, list[dict]]:
    tmp = tmp_path_factory.mktemp("eval-report")
    quiz = tmp / "quiz.jsonl"
    quiz.write_text('{"query": "Q", "choices": ["ab", "cccccccccc"], "gold": 1}\n'
                    '{"query": "R", "choices": ["xx", "yz"], "gold": 0}\n')
    docs = tmp / "docs.jsonl"
    docs.write_text('{"text": "aaaabbbbcccc"}\n{"text": "abcabcabc"}\n')
    results = []
    mp = pytest.MonkeyPatch()
    try:
        for label, seconds_per_token in CONFIGS:
            mp.setattr("tests.unit.test_eval_tasks.SECONDS_PER_TOKEN", seconds_per_token)
            mp.setattr(eval_cli, "make_backend", lambda args: FakeBackend(max_length=16))
            out = tmp / f"{label}.json"
            assert main(["eval", "--task-file", str(quiz), "--task-file", str(docs), "--save-items", "--quiet",
                         "--label", label, "--output", str(out)]) == 0
            results.append(json.loads(out.read_text()))
    finally:
        mp.undo()
    page = tmp / "report.html"
    assert main(["eval", "report", *(str(tmp / f"{label}.json") for label, _ in CONFIGS), "--html", str(page)]) == 0
    return page, results


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not found: apt-get install -y chromium")
def test_report_renders_one_point_per_configuration_in_chromium(report, tmp_path):
    page, results = report
    dom = chromium("--dump-dom", page.as_uri(), tmp=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    console_errors = [line for line in dom.stderr.splitlines()
                      if "CONSOLE" in line and ("Uncaught" in line or "Error" in line)]
    assert not console_errors, console_errors
    assert "<h1>leanserve eval report</h1>" in dom.stdout

    counter = PointCounter()
    counter.feed(dom.stdout)
    assert not counter.external, counter.external
    assert set(counter.points) == {f"quality-vs-cost-{t}" for t in TASKS}
    for task in TASKS:
        chart = f"quality-vs-cost-{task}"
        points = counter.points[chart]
        assert len(points) == len(CONFIGS), (chart, points)
        assert counter.labels[chart] == [label for label, _ in CONFIGS]
        assert len({fill for _, _, fill in points}) == len(CONFIGS)  # a colour each
        # x is $ per 1,000 items: the order of the configurations' prices
        costs = [r["tasks"][task]["cost"]["usd_per_1k_items"] for r in results]
        xs = [x for x, _, _ in points]
        assert sorted(range(3), key=xs.__getitem__) == sorted(range(3), key=costs.__getitem__)
    # the same quality everywhere (one fake model), so the points sit on one horizontal line
    assert len({round(y, 1) for _, y, _ in counter.points["quality-vs-cost-quiz"]}) == 1
    assert re.search(r"Paired comparison with base", dom.stdout)

    shot_dir = Path(os.environ.get("LEANSERVE_ARTIFACTS", tmp_path))
    shot_dir.mkdir(parents=True, exist_ok=True)
    shot = shot_dir / "eval-report.png"
    taken = chromium(f"--screenshot={shot}", "--window-size=1280,1800", page.as_uri(), tmp=tmp_path)
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert shot.is_file() and shot.stat().st_size > 20_000


def test_report_is_self_contained(report):
    page, _ = report
    text = page.read_text()
    assert "<script" not in text and "<link" not in text
    counter = PointCounter()
    counter.feed(text)
    assert not counter.external
    assert all(len(counter.points[f"quality-vs-cost-{t}"]) == len(CONFIGS) for t in TASKS)
