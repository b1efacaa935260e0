"""The benchmark client against the stub server, whose timing is known exactly.

The stub waits TTFT before the first token and ITL before each later one; the client must measure
those within a few percent. The stub runs in its own process on 127.0.0.1.
"""

from __future__ import annotations

import json
import statistics
from itertools import islice
from pathlib import Path

import pytest

from leanserve.bench.cli import main
from leanserve.bench.client import interarrival_gaps
from tests.stub_server import serve_in_subprocess
from leanserve.bench.workloads import WorkloadSpec, iter_conversations

TTFT_MS, ITL_MS, OUT = 400.0, 50.0, 10  # HTTP overhead here is 3-15 ms (up to ~30 under load): small against 400


def bench(tmp_path: Path, base_url: str, *args: str, name: str = "r.json") -> dict:
    out = tmp_path / name
    rc = main(["--base-url", base_url, "--json", str(out), "--no-progress", "--quiet", *args])
    assert rc == 0
    return json.loads(out.read_text())


def close(measured: float, expected: float, rel: float = 0.05) -> bool:
    return abs(measured - expected) <= rel * expected


@pytest.fixture(scope="module")
def timed_stub():
    with serve_in_subprocess("--ttft-ms", str(TTFT_MS), "--itl-ms", str(ITL_MS), "--output-len", str(OUT),
                             "--cost-per-token-usd", "1e-6", "--accepted-predictions", "4") as url:
        yield url


@pytest.fixture(scope="module")
def timed_run(timed_stub, tmp_path_factory):
    return bench(tmp_path_factory.mktemp("timed"), timed_stub, "--workload", "random", "--input-len", "32",
                 "--num-prompts", "12", "--concurrency", "4", "--output-len", str(OUT), "--hardware", "l4")


def test_ttft_tpot_itl_e2el_match_the_stub(timed_run):
    r = timed_run
    assert r["completed"] == 12 and r["failed"] == 0
    for key in ("median_ttft_ms", "mean_ttft_ms"):
        # HTTP overhead only adds (3-15 ms here, ~30 ms seen on a loaded 2-core CI box); measuring from
        # a later token would also leave OUT - 2 ITL samples (checked below), from too early, below the wait
        assert TTFT_MS * 0.99 <= r[key] <= TTFT_MS + 75, (key, r[key])
    for key in ("median_tpot_ms", "mean_tpot_ms", "median_itl_ms", "mean_itl_ms"):
        assert close(r[key], ITL_MS), (key, r[key])
    e2el = TTFT_MS + ITL_MS * (OUT - 1)
    assert e2el * 0.99 <= r["median_e2el_ms"] <= e2el + 75
    # every request: one ITL sample per token after the first
    assert all(len(q["itl_ms"]) == OUT - 1 for q in r["requests"])


def test_throughput_matches_the_stub(timed_run):
    r = timed_run
    e2e_s = (TTFT_MS + ITL_MS * (OUT - 1)) / 1000.0
    # the rates are the counts over the run's duration, which is three waves of 4 requests: at least
    # 3 e2e_s, and more only by HTTP and client overhead (~30-60 ms a wave on a loaded 2-core box)
    assert r["output_throughput"] == pytest.approx(r["total_output_tokens"] / r["duration"])
    assert r["request_throughput"] == pytest.approx(r["completed"] / r["duration"])
    assert 3 * e2e_s * 0.99 <= r["duration"] <= 3 * e2e_s * 1.25
    assert 3.6 <= r["mean_requests_in_flight"] <= 4.0 + 1e-9  # 4 at a time, less in the gaps between waves
    assert r["total_output_tokens"] == 12 * OUT


def test_tokens_come_from_usage_and_cost_is_reported(timed_run):
    r = timed_run
    assert r["output_tokens_counted_by"] == "usage" and r["input_tokens_counted_by"] == "usage"
    # the stub counts prompt words; the random workload sends exactly 32 words
    assert all(q["input_tokens"] == 32 for q in r["requests"])
    # the stub bills 1e-6 $/token (usage.cost, USD): server-side $/Mtok is exactly 1
    assert r["server_reported_cost_usd"] == pytest.approx(1e-6 * (12 * 32 + 12 * OUT))
    assert r["server_cost_per_million_total_tokens"] == pytest.approx(1.0)
    # speculative decoding's counts from usage.completion_tokens_details: 4 accepted, 2 rejected a request
    assert (r["spec_accepted_tokens"], r["spec_rejected_tokens"]) == (48, 24)
    assert r["spec_acceptance_rate"] == pytest.approx(2 / 3)
    assert r["spec_accepted_share_of_output"] == pytest.approx(4 / OUT)
    # our own $/Mtok at the L4 list price
    assert r["cost_assumption"]["hardware"] == "l4"
    expected = r["cost_assumption"]["price_per_hour"] / (r["output_throughput"] * 3600) * 1e6
    assert r["cost_per_million_output_tokens"] == pytest.approx(expected)


def test_result_document_shape(timed_run):
    r = timed_run
    assert r["kind"] == "run" and r["format"].startswith("leanserve-bench/")
    assert r["server"]["model"] == "stub-model"  # from GET /v1/models
    assert r["config"]["load"]["concurrency"] == 4
    for key in ("completed", "failed", "request_throughput", "output_throughput", "total_token_throughput",
                "total_input_tokens", "total_output_tokens", "mean_ttft_ms", "median_ttft_ms", "std_ttft_ms",
                "p90_ttft_ms", "p99_ttft_ms", "p99_tpot_ms", "p99_itl_ms", "p99_e2el_ms",
                "cost_per_million_output_tokens", "cost_per_million_total_tokens"):
        assert key in r, key
    assert len(r["requests"]) == 12


def test_chunk_counting_fallback_without_usage_on_completions(tmp_path):
    with serve_in_subprocess("--ttft-ms", "30", "--itl-ms", "10", "--no-usage") as url:
        r = bench(tmp_path, url, "--endpoint", "completions", "--workload", "random", "--input-len", "20",
                  "--num-prompts", "6", "--concurrency", "3", "--output-len", "7")
    assert r["completed"] == 6
    assert r["output_tokens_counted_by"] == "chunks" and r["input_tokens_counted_by"] == "estimate"
    assert all(q["output_tokens"] == 7 and q["num_chunks"] == 7 for q in r["requests"])
    assert "server_reported_cost_usd" not in r


def test_http_errors_are_counted_by_kind(tmp_path):
    # The stub fails every 3rd request it receives (the warm-up is the 1st) with HTTP 503.
    with serve_in_subprocess("--ttft-ms", "5", "--itl-ms", "2", "--fail-status", "503", "--fail-every", "3") as url:
        r = bench(tmp_path, url, "--workload", "random", "--input-len", "8", "--num-prompts", "9",
                  "--concurrency", "1", "--output-len", "3")
    assert (r["completed"], r["failed"]) == (6, 3)
    assert r["errors_by_kind"] == {"http_503": 3}
    assert {q["error"] for q in r["requests"] if not q["success"]} == {"stub failure"}


def test_multi_turn_second_request_carries_the_first_answer(tmp_path):
    with serve_in_subprocess("--ttft-ms", "5", "--itl-ms", "2") as url:
        r = bench(tmp_path, url, "--workload", "multi-turn", "--num-prompts", "4", "--concurrency", "2",
                  "--output-len", "5", "--seed", "3")
    assert r["completed"] == 8
    convs = {c.conversation_id: c for c in iter_conversations(WorkloadSpec("multi-turn", seed=3, output_len=5), 4)}
    by_id = {q["request_id"]: q for q in r["requests"]}
    for cid, conv in convs.items():
        first, second = by_id[f"{cid}-0"], by_id[f"{cid}-1"]
        # The stub's prompt_tokens is a word count: the second request is the first question, the
        # stub's 5-word answer, and the second question.
        assert first["input_tokens"] == len(conv.turns[0].split())
        assert second["input_tokens"] == len(conv.turns[0].split()) + 5 + len(conv.turns[1].split())
        assert second["start_ms"] >= first["start_ms"] + first["e2el_ms"] - 1  # sent after the answer


def test_poisson_arrivals_follow_the_seeded_gamma_schedule(tmp_path):
    with serve_in_subprocess("--ttft-ms", "5", "--itl-ms", "2") as url:
        r = bench(tmp_path, url, "--workload", "random", "--input-len", "8", "--num-prompts", "12",
                  "--request-rate", "25", "--output-len", "2", "--seed", "11")
    starts = sorted(q["start_ms"] for q in r["requests"])
    gaps = list(islice(interarrival_gaps(25.0, 1.0, 11), 11))
    expected = [0.0]
    for g in gaps:
        expected.append(expected[-1] + g * 1000.0)
    assert all(abs(s - e) < 15.0 for s, e in zip(starts, expected)), list(zip(starts, expected))


def test_interarrival_gaps_mean_and_burstiness():
    def cv2(xs):
        m = statistics.fmean(xs)
        return statistics.pvariance(xs) / m ** 2
    poisson = list(islice(interarrival_gaps(10.0, 1.0, 0), 20000))
    assert statistics.fmean(poisson) == pytest.approx(0.1, rel=0.03)
    assert cv2(poisson) == pytest.approx(1.0, rel=0.06)  # exponential: CV^2 = 1
    bursty = list(islice(interarrival_gaps(10.0, 0.25, 0), 20000))
    assert statistics.fmean(bursty) == pytest.approx(0.1, rel=0.06)
    assert cv2(bursty) == pytest.approx(4.0, rel=0.12)  # gamma(k): CV^2 = 1/k
    assert list(islice(interarrival_gaps(5.0, 1.0, 42), 5)) == list(islice(interarrival_gaps(5.0, 1.0, 42), 5))


def test_duration_bounds_the_run(tmp_path):
    with serve_in_subprocess("--ttft-ms", "40", "--itl-ms", "10") as url:
        r = bench(tmp_path, url, "--workload", "random", "--input-len", "8", "--duration", "1.0",
                  "--concurrency", "2", "--output-len", "5")
    assert max(q["start_ms"] for q in r["requests"]) < 1000.0
    assert r["duration"] < 1.3
    assert r["completed"] >= 15  # ~80 ms per request, 2 at a time, for 1 s


def test_sweep_finds_the_saturation_point(tmp_path):
    # The stub serves at most 2 requests at once: throughput stops growing past concurrency 2.
    # Past the knee throughput still creeps up a few % (queued requests leave the stub no idle gap),
    # hence a 25% growth threshold; below the knee doubling concurrency doubles throughput.
    with serve_in_subprocess("--ttft-ms", "50", "--itl-ms", "20", "--max-concurrency", "2") as url:
        r = bench(tmp_path, url, "--workload", "random", "--input-len", "8", "--num-prompts", "8",
                  "--output-len", "6", "--sweep", "--sweep-threshold", "0.25", "--sweep-rates", "0.5,0.8",
                  "--price-per-hour", "1.0")
    assert r["kind"] == "sweep"
    ramp = [x for x in r["runs"] if x["phase"] == "ramp"]
    rates = [x for x in r["runs"] if x["phase"] == "rate"]
    assert [x["load"]["concurrency"] for x in ramp] == [1, 2, 4]
    assert r["saturation"]["concurrency"] == 2
    assert close(ramp[1]["output_throughput"], 2 * ramp[0]["output_throughput"], 0.15)
    assert len(rates) == 2
    sat_rate = r["saturation"]["max_request_throughput"]
    assert [x["load"]["request_rate"] for x in rates] == pytest.approx([0.5 * sat_rate, 0.8 * sat_rate])
    assert all(x["cost_per_million_output_tokens"] > 0 for x in r["runs"])
