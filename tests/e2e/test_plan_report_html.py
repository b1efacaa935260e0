"""`leanserve plan --html` from the real CLI, opened in headless Chromium: it loads with no console
error, its three charts are drawn in the dumped DOM (a bar per priced option, a line per API and one for
self-hosting), nothing is fetched from the network, and a screenshot is kept (under $LEANSERVE_ARTIFACTS
when set, else in pytest's tmp dir).

The calibration file does not exist, so every option uses its stated default efficiencies. Skips when
no Chromium is installed (``apt-get install -y chromium``) or smollm2-135m is not pulled (its GGUF
header gives the model's shape).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, require_model
from tests.e2e.test_bench_report_html import CHROMIUM, ChartCounter, chromium

pytestmark = pytest.mark.e2e

HARDWARE = ("l4", "cpu-local", "aws-c7i.large")
APIS = ("openai/gpt-4o-mini", "mine")


@pytest.fixture(scope="module")
def plan_page(tmp_path_factory) -> tuple[Path, dict]:
    require_model("smollm2-135m")
    tmp = tmp_path_factory.mktemp("plan")
    page, js = tmp / "plan.html", tmp / "plan.json"
    cmd = [sys.executable, "-m", "leanserve", "plan", "--model", "smollm2-135m", "--rate", "2",
           "--hardware", ",".join(HARDWARE), "--api", APIS[0], "--api-price", f"{APIS[1]}=0.1,0.4",
           "--calibration", str(tmp / "no-such-calibration.json"), "--html", str(page), "--json", str(js)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return page, json.loads(js.read_text())


def test_plan_uses_default_efficiencies(plan_page):
    _, plan = plan_page
    assert plan["calibration_file"] is None
    assert {p["hardware"] for p in plan["predictions"]} == set(HARDWARE)
    assert not any(p["calibrated"] for p in plan["predictions"])
    assert plan["best"] is not None and [a["api"] for a in plan["apis"]] == list(APIS)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not found: apt-get install -y chromium")
def test_plan_report_renders_every_chart_in_chromium(plan_page, tmp_path):
    page, plan = plan_page
    dom = chromium("--dump-dom", page.as_uri(), tmp=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    console_errors = [line for line in dom.stderr.splitlines()
                      if "CONSOLE" in line and ("Uncaught" in line or "Error" in line)]
    assert not console_errors, console_errors
    assert "<h1>leanserve plan: smollm2-135m</h1>" in dom.stdout

    counter = ChartCounter()
    counter.feed(dom.stdout)
    assert not counter.external, counter.external
    priced = [p for p in plan["predictions"] if p["cost_per_mtok"] is not None]
    rated = [p for p in plan["predictions"] if p["fits"] and p["max_rate"] > 0]
    assert priced and rated
    cost, rate, be = (counter.counts.get(n) for n in ("cost-per-hardware", "rate-per-hardware", "break-even"))
    assert cost and cost["svg"] == 1 and cost["bar"] == 2 * len(priced), cost and dict(cost)
    assert rate and rate["svg"] == 1 and rate["bar"] == len(rated), rate and dict(rate)
    assert be and be["svg"] == 1 and be["path"] == 1 + len(APIS), be and dict(be)  # self-hosting + each API
    for name in (*HARDWARE, *APIS):
        assert name in dom.stdout, name

    shot_dir = Path(os.environ.get("LEANSERVE_ARTIFACTS", tmp_path))
    shot_dir.mkdir(parents=True, exist_ok=True)
    shot = shot_dir / "plan-report.png"
    taken = chromium(f"--screenshot={shot}", "--window-size=1280,2200", page.as_uri(), tmp=tmp_path)
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert shot.is_file() and shot.stat().st_size > 20_000  # a blank page is a few kB


def test_plan_report_is_self_contained(plan_page):
    page, _ = plan_page
    text = page.read_text()
    assert "<script" not in text and "<link" not in text and "@import" not in text and "url(" not in text
    counter = ChartCounter()
    counter.feed(text)
    assert not counter.external
    assert {"cost-per-hardware", "rate-per-hardware", "break-even"} <= set(counter.counts)
