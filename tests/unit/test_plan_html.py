"""`leanserve plan --html` from a hand-built plan: the page parses, its three charts are drawn, every
user-given name is escaped, nothing is fetched, and a plan with no hardware meeting the targets (or no
API) says so instead of drawing the break-even chart."""

from __future__ import annotations

import copy
import html
import math
from html.parser import HTMLParser

import pytest

from leanserve.plan.html import html_report
from tests.e2e.test_bench_report_html import ChartCounter

VOID = {"meta", "br", "hr", "img", "input", "link", "col", "area", "base", "embed", "source", "track", "wbr"}
EVIL_API = "<b>x</b>"
EVIL_HW = "<i>gpu&co</i>"
EVIL_MODEL = "tiny<script>alert(1)</script>"


class Strict(HTMLParser):
    """Every element closed in order (SVG's self-closed ones included), the visible text collected."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        pass

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _prediction(hw: str, price: float, max_rate: float, fits: bool = True, reason: str = "",
                calibrated: bool = False) -> dict:
    tokens_per_request = 640
    p = {"hardware": hw, "configuration": "bf16 weights, bf16 KV, max 128 seqs, 512 tokens/step",
         "precision": "bf16 weights, bf16 KV", "calibrated": calibrated,
         "efficiency_source": ("calibrated 2026-12-01 on a test CPU" if calibrated
                               else "default gpu efficiencies (not measured)"),
         "price_per_hour": price, "fits": fits, "reason": reason, "memory_needed_gb": 1.3, "memory_gb": 24,
         "kv_cache_tokens": 1000, "max_rate": 0.0, "at_rate": {}, "instances": 0, "cost_per_mtok": None,
         "cost_per_mtok_output": None, "cost_per_mtok_full": None, "monthly_usd": None,
         "capacity_tokens_per_day": 0.0, "price_note": f"list price for {hw}, 2026-09-24"}
    if not fits or max_rate <= 0:
        return p
    rate = 2.0
    instances = max(1, math.ceil(rate / max_rate))
    p.update(max_rate=max_rate, instances=instances, monthly_usd=instances * price * 730,
             at_rate={"p90_ttft_ms": 120.0, "p90_tpot_ms": 20.0, "output_throughput": 256.0},
             cost_per_mtok=instances * price / (rate * tokens_per_request * 3600) * 1e6,
             cost_per_mtok_output=instances * price / (rate * 128 * 3600) * 1e6,
             cost_per_mtok_full=price / (max_rate * tokens_per_request * 3600) * 1e6,
             capacity_tokens_per_day=max_rate * tokens_per_request * 86400)
    return p


def _plan() -> dict:
    preds = [_prediction("aws-c7i.large", 0.09, 1.5, calibrated=True), _prediction(EVIL_HW, 0.8, 40.0),
             _prediction("tiny-gpu", 0.2, 0.0, fits=False, reason="needs 9.0 GB, tiny-gpu has 4 GB"),
             _prediction("slow-cpu", 0.05, 0.0, reason="cannot meet p90 TTFT <= 2000 ms even at a trickle")]
    best = preds[0]
    tokens_per_day = 2.0 * 640 * 86400
    apis = []
    for name, per_mtok in (("openai/gpt-4o-mini", 0.24), (EVIL_API, 0.16)):
        a = per_mtok / 1e6
        v1 = 24 * best["price_per_hour"] / a
        apis.append({"api": name, "api_source": "Pricing page (https://example.com/pricing)", "api_as_of": "2026-08-27",
                     "api_usd_per_mtok": per_mtok, "api_monthly_usd": tokens_per_day * a * 730 / 24,
                     "self_monthly_usd": best["monthly_usd"],
                     "monthly_saving_usd": tokens_per_day * a * 730 / 24 - best["monthly_usd"],
                     "ratio_api_to_self": tokens_per_day * a * 730 / 24 / best["monthly_usd"],
                     "first_wins_tokens_per_day": v1, "always_wins_tokens_per_day": v1})
    cap = best["capacity_tokens_per_day"]
    lo, hi = 5e4, 2e9
    curve = []
    for i in range(41):
        v = lo * (hi / lo) ** (i / 40)
        row = {"tokens_per_day": v, "self_usd_per_day": max(1, math.ceil(v / cap)) * 24 * best["price_per_hour"]}
        row.update({a["api"]: v * a["api_usd_per_mtok"] / 1e6 for a in apis})
        curve.append(row)
    return {"generated": "2026-12-07T11:00:00+00:00", "leanserve": "0.1.0",
            "model": {"name": EVIL_MODEL, "num_params": 134e6, "num_layers": 30, "kv_elements_per_token": 11520,
                      "file_format": "Q4_1", "max_context": 8192},
            "workload": {"source": "flags", "requests_per_s": 2.0, "mean_requests_per_s": 2.0,
                         "mean_input_tokens": 512.0, "mean_output_tokens": 128.0, "max_input_tokens": 512,
                         "max_output_tokens": 128, "samples": 1, "prefix_hit_rate": 0.0,
                         "tokens_per_day": tokens_per_day, "notes": ["a <note>"]},
            "targets": {"ttft_ms": 2000.0, "tpot_ms": 100.0, "percentile": 90.0,
                        "text": "p90 TTFT <= 2000 ms, p90 TPOT <= 100 ms"},
            "calibration_file": "/tmp/cal.json", "predictions": preds, "best": best, "apis": apis, "curve": curve}


def _parse(page: str) -> tuple[Strict, ChartCounter]:
    strict = Strict()
    strict.feed(page)
    strict.close()
    assert not strict.errors, strict.errors[:5]
    assert strict.stack == [], strict.stack
    counter = ChartCounter()
    counter.feed(page)
    assert not counter.external, counter.external
    return strict, counter


def test_page_draws_the_three_charts():
    plan = _plan()
    page = html_report(plan)
    strict, counter = _parse(page)
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page
    priced = [p for p in plan["predictions"] if p["cost_per_mtok"] is not None]
    assert len(priced) == 2
    cost = counter.counts["cost-per-hardware"]
    assert cost["svg"] == 1 and cost["bar"] == 2 * len(priced), dict(cost)  # planned traffic + full load
    rate = counter.counts["rate-per-hardware"]
    assert rate["svg"] == 1 and rate["bar"] == len(priced), dict(rate)
    be = counter.counts["break-even"]
    assert be["svg"] == 1 and be["path"] == 1 + len(plan["apis"]), dict(be)  # self-hosting + one per API
    assert be["circle"] >= 1  # the workload's own traffic on the self-hosting line
    text = "".join(strict.text)
    assert "this workload: 111M tokens/day" in text
    assert "does not fit: needs 9.0 GB, tiny-gpu has 4 GB" in text
    assert "cannot meet p90 TTFT <= 2000 ms even at a trickle" in text
    assert "calibrated 2026-12-01 on a test CPU (aws-c7i.large)" in text
    assert "default gpu efficiencies (not measured)" in text
    assert "list price for tiny-gpu, 2026-09-24" in text and "2026-08-27" in text
    assert "p90 TTFT <= 2000 ms, p90 TPOT <= 100 ms" in text


def test_every_name_is_escaped():
    page = html_report(_plan())
    for raw in (EVIL_API, EVIL_HW, EVIL_MODEL, "a <note>"):
        assert raw not in page
    for name in (EVIL_API, EVIL_HW, EVIL_MODEL, "aws-c7i.large", "tiny-gpu", "slow-cpu", "openai/gpt-4o-mini"):
        assert html.escape(name) in page, name
    strict, _ = _parse(page)
    assert EVIL_API in "".join(strict.text)  # shown as text, not markup


def test_no_hardware_meets_the_targets():
    plan = _plan()
    plan.update(best=None, apis=[], curve=[])
    page = html_report(plan)
    strict, counter = _parse(page)
    assert "break-even" not in counter.counts
    assert {"cost-per-hardware", "rate-per-hardware"} <= set(counter.counts)
    assert 'data-chart="break-even"' not in page
    text = " ".join("".join(strict.text).split())
    assert "No hardware meets the targets" in text
    assert "No break-even chart: no hardware meets the targets" in text


@pytest.mark.parametrize("change", ["no apis", "no fitting hardware"])
def test_degenerate_plans_render(change):
    plan = _plan()
    if change == "no apis":
        plan.update(apis=[], curve=[{k: v for k, v in r.items() if k in ("tokens_per_day", "self_usd_per_day")}
                                    for r in plan["curve"]])
    else:
        plan["predictions"] = [copy.deepcopy(plan["predictions"][2])]
        plan.update(best=None, apis=[], curve=[])
    page = html_report(plan)
    strict, counter = _parse(page)
    assert 'data-chart="break-even"' not in page
    text = " ".join("".join(strict.text).split())
    if change == "no apis":
        assert "no managed API to compare with" in text
        assert counter.counts["cost-per-hardware"]["bar"] == 4
    else:
        assert counter.counts["cost-per-hardware"]["bar"] == 0 and "does not fit" in text
