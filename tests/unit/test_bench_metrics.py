"""Metric math on hand-made records: exact values, no server."""

from __future__ import annotations

import math

import numpy as np
import pytest

from leanserve.bench.metrics import RequestRecord, compute_metrics, meets_slos, parse_goodput


def rec(i: int, ttft: float, e2el: float, out: int, itl: list[float] | None = None, inp: int = 10,
        success: bool = True, **kw) -> RequestRecord:
    return RequestRecord(request_id=str(i), success=success, ttft_s=ttft if success else None,
                         e2el_s=e2el if success else None, itl_s=itl or [], input_tokens=inp, output_tokens=out, **kw)


def test_tpot_is_decode_time_over_tokens_after_the_first():
    r = rec(0, ttft=0.2, e2el=1.1, out=10)
    assert r.tpot_s == pytest.approx((1.1 - 0.2) / 9)
    assert rec(1, ttft=0.2, e2el=0.2, out=1).tpot_s is None  # a single token has no TPOT
    assert rec(2, ttft=0.2, e2el=0.5, out=5, success=False).tpot_s is None


def test_percentiles_match_numpy_linear_interpolation():
    ttfts = [0.010, 0.020, 0.030, 0.040, 0.100]
    records = [rec(i, ttft=t, e2el=t + 0.5, out=6) for i, t in enumerate(ttfts)]
    m = compute_metrics(records, duration_s=2.0, percentiles=(50, 90, 99, 99.9))
    ms = np.array(ttfts) * 1000
    assert m["mean_ttft_ms"] == pytest.approx(40.0)
    assert m["median_ttft_ms"] == pytest.approx(30.0)
    assert m["std_ttft_ms"] == pytest.approx(float(np.std(ms)))
    # Linear interpolation between ranks: p90 = 40 + 0.6 * (100 - 40) = 76.
    assert m["p90_ttft_ms"] == pytest.approx(76.0)
    assert m["p99_ttft_ms"] == pytest.approx(97.6)  # 40 + 0.96 * 60
    assert m["p99.9_ttft_ms"] == pytest.approx(float(np.percentile(ms, 99.9)))
    assert m["p50_ttft_ms"] == pytest.approx(30.0)


def test_itl_statistics_pool_all_gaps_and_tpot_is_per_request():
    a = rec(0, ttft=0.1, e2el=0.1 + 0.02 * 4, out=5, itl=[0.02] * 4)
    b = rec(1, ttft=0.1, e2el=0.1 + 0.06 * 2, out=3, itl=[0.06, 0.06])
    m = compute_metrics([a, b], duration_s=1.0, percentiles=(99,))
    assert m["mean_itl_ms"] == pytest.approx((4 * 20 + 2 * 60) / 6)  # pooled over 6 gaps
    assert m["mean_tpot_ms"] == pytest.approx((20 + 60) / 2)  # averaged over 2 requests
    assert m["median_itl_ms"] == pytest.approx(20.0)


def test_throughputs_count_successful_requests_only():
    ok = [rec(i, ttft=0.1, e2el=1.0, out=100, inp=50) for i in range(3)]
    bad = rec(9, ttft=0, e2el=0, out=0, inp=50, success=False, error_kind="http_500")
    m = compute_metrics(ok + [bad], duration_s=2.0)
    assert (m["completed"], m["failed"], m["num_requests"]) == (3, 1, 4)
    assert m["total_input_tokens"] == 150 and m["total_output_tokens"] == 300
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(150.0)
    assert m["total_token_throughput"] == pytest.approx(225.0)
    assert m["errors_by_kind"] == {"http_500": 1}
    assert m["mean_requests_in_flight"] == pytest.approx(1.5)  # 3 requests x 1 s over 2 s


def test_goodput_counts_requests_meeting_every_slo():
    slos = parse_goodput(["ttft:500", "tpot:50"])
    assert slos == {"ttft": 500.0, "tpot": 50.0}
    good = rec(0, ttft=0.4, e2el=0.4 + 0.04 * 9, out=10)  # ttft 400, tpot 40
    slow_first = rec(1, ttft=0.6, e2el=0.6 + 0.04 * 9, out=10)  # ttft 600
    slow_decode = rec(2, ttft=0.4, e2el=0.4 + 0.06 * 9, out=10)  # tpot 60
    edge = rec(3, ttft=0.5, e2el=0.5 + 0.05 * 9, out=10)  # exactly at both SLOs: counts
    failed = rec(4, ttft=0, e2el=0, out=0, success=False)
    assert [meets_slos(r, slos) for r in (good, slow_first, slow_decode, edge, failed)] == [True, False, False, True, False]
    m = compute_metrics([good, slow_first, slow_decode, edge, failed], duration_s=4.0, goodput_slos=slos)
    assert m["good_requests"] == 2
    assert m["request_goodput"] == pytest.approx(0.5)
    assert m["goodput_slos_ms"] == slos


def test_goodput_e2el_slo():
    slos = parse_goodput(["e2el:1000"])
    assert meets_slos(rec(0, ttft=0.1, e2el=0.9, out=5), slos)
    assert not meets_slos(rec(1, ttft=0.1, e2el=1.2, out=5), slos)


@pytest.mark.parametrize("bad", ["ttft", "ttft:", "ttft:abc", "latency:5", "ttft:-3", "ttft:0"])
def test_parse_goodput_rejects_bad_items(bad):
    with pytest.raises(ValueError, match="goodput"):
        parse_goodput([bad])


def test_cost_per_million_tokens_from_throughput():
    # 100 output tok/s for 1 s at $3.60/h: $3.60 / (100 * 3600) * 1e6 = $10 per million output tokens.
    records = [rec(0, ttft=0.1, e2el=1.0, out=100, inp=300)]
    m = compute_metrics(records, duration_s=1.0, price_per_hour=3.6)
    assert m["cost_per_million_output_tokens"] == pytest.approx(10.0)
    assert m["cost_per_million_total_tokens"] == pytest.approx(2.5)  # 400 tok/s
    no_price = compute_metrics(records, duration_s=1.0)
    assert no_price["cost_per_million_output_tokens"] is None


def test_server_reported_cost_is_summed_only_when_present():
    a = rec(0, ttft=0.1, e2el=1.0, out=100, inp=100, server_cost_usd=0.001)
    b = rec(1, ttft=0.1, e2el=1.0, out=100, inp=100, server_cost_usd=0.003)
    m = compute_metrics([a, b], duration_s=1.0)
    assert m["server_reported_cost_usd"] == pytest.approx(0.004)
    assert m["server_cost_per_million_output_tokens"] == pytest.approx(0.004 / 200 * 1e6)
    assert m["server_cost_per_million_total_tokens"] == pytest.approx(0.004 / 400 * 1e6)
    plain = compute_metrics([rec(0, ttft=0.1, e2el=1.0, out=100)], duration_s=1.0)
    assert "server_reported_cost_usd" not in plain


def test_speculative_counts_sum_over_the_requests_that_report_them():
    a = rec(0, ttft=0.1, e2el=1.0, out=100, accepted_prediction_tokens=60, rejected_prediction_tokens=20)
    b = rec(1, ttft=0.1, e2el=1.0, out=50, accepted_prediction_tokens=0, rejected_prediction_tokens=0)
    c = rec(2, ttft=0.1, e2el=1.0, out=70)  # reported nothing: not in the share
    m = compute_metrics([a, b, c], duration_s=1.0)
    assert (m["spec_accepted_tokens"], m["spec_rejected_tokens"]) == (60, 20)
    assert m["spec_acceptance_rate"] == pytest.approx(0.75)
    assert m["spec_accepted_share_of_output"] == pytest.approx(60 / 150)
    assert "spec_acceptance_rate" not in compute_metrics([c], duration_s=1.0)
    back = RequestRecord.from_dict(a.to_dict())
    assert (back.accepted_prediction_tokens, back.rejected_prediction_tokens) == (60, 20)


def test_prefix_cache_hit_rate_from_cached_tokens():
    a = rec(0, ttft=0.1, e2el=1.0, out=10, inp=1000, cached_tokens=800)
    b = rec(1, ttft=0.1, e2el=1.0, out=10, inp=1000, cached_tokens=0)
    m = compute_metrics([a, b], duration_s=1.0)
    assert m["prefix_cache_hit_rate"] == pytest.approx(0.4)


def test_token_count_sources_are_reported():
    a = rec(0, ttft=0.1, e2el=1.0, out=10, output_tokens_source="usage")
    b = rec(1, ttft=0.1, e2el=1.0, out=10, output_tokens_source="chunks")
    assert compute_metrics([a], 1.0)["output_tokens_counted_by"] == "usage"
    assert compute_metrics([a, b], 1.0)["output_tokens_counted_by"] == "mixed(chunks,usage)"


def test_all_failed_gives_zero_throughput_not_nan():
    m = compute_metrics([rec(0, 0, 0, 0, success=False, error_kind="timeout")], duration_s=1.0)
    assert m["completed"] == 0 and m["output_throughput"] == 0.0
    assert m["mean_ttft_ms"] == 0.0 and not math.isnan(m["p99_ttft_ms"])
    assert m["cost_per_million_output_tokens"] is None


def test_record_round_trips_through_its_json_form():
    r = rec(0, ttft=0.123, e2el=0.5, out=4, itl=[0.1, 0.12, 0.157], cached_tokens=3)
    d = r.to_dict()
    assert d["ttft_ms"] == pytest.approx(123.0) and d["itl_ms"] == pytest.approx([100.0, 120.0, 157.0])
    assert d["tpot_ms"] == pytest.approx((500 - 123) / 3, abs=1e-3)
    back = RequestRecord.from_dict(d)
    assert back.ttft_s == pytest.approx(0.123) and back.itl_s == pytest.approx(r.itl_s)
    assert back.cached_tokens == 3
