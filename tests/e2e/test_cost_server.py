"""Cost accounting on the real server: usage.cost, /v1/cost, /metrics and the ledger agree.

One server for the module (with an API key, a ledger in a temp folder and a round price); the last
test kills it with SIGKILL and checks that every answered request is in the ledger.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import mt_bench_prompts

PRICE = 3.6  # $/h: one machine-second costs $0.001
KEY = "cost-test-key"


@pytest.fixture(scope="module")
def ledger_path(tmp_path_factory):
    return tmp_path_factory.mktemp("ledger") / "ledger.sqlite"


@pytest.fixture(scope="module")
def server_args(ledger_path):
    return ["--ledger", str(ledger_path), "--price-per-hour", str(PRICE), "--max-num-seqs", "8"]


@pytest.fixture(scope="module")
def server_api_key():
    return KEY


def rows(path, where: str = "", args: tuple = ()) -> list[dict]:
    conn = sqlite3.connect(str(path))
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(f"SELECT * FROM requests {where}", args)]
    finally:
        conn.close()


def complete(server, prompt: str, max_tokens: int = 8, **extra) -> dict:
    r = httpx.post(server.v1 + "/completions", headers=server.headers, timeout=120,
                   json={"model": "smollm2-135m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                         "ignore_eos": True, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def wait_idle(server, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while server.metrics().get("leanserve:num_requests_in_flight", 0) > 0:
        assert time.monotonic() < deadline, "requests still in flight"
        time.sleep(0.05)


def test_every_response_carries_its_cost(server):
    body = complete(server, "The cheapest way to serve a model is")
    usd, cost = body["usage"]["cost"], body["usage"]["cost_details"]
    assert isinstance(usd, float)  # OpenRouter's usage.cost, as LiteLLM and other clients read it
    assert set(cost) == {"machine_seconds", "input_usd", "output_usd", "price_per_hour", "hardware", "saved_usd", "saved"}
    # a new prompt: nothing cached, nothing saved
    assert cost["saved"] == {"prefix_cache": 0.0, "response_cache": 0.0, "routing": 0.0} and cost["saved_usd"] == 0.0
    assert cost["price_per_hour"] == PRICE and cost["hardware"]
    assert cost["machine_seconds"] > 0
    assert usd == pytest.approx(cost["machine_seconds"] * PRICE / 3600)
    assert cost["input_usd"] + cost["output_usd"] == pytest.approx(usd)
    assert cost["input_usd"] > 0 and cost["output_usd"] > 0

    # streaming: the usage chunk (include_usage) has it too
    with httpx.stream("POST", server.v1 + "/chat/completions", headers=server.headers, timeout=60,
                      json={"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                            "stream": True, "stream_options": {"include_usage": True}}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert events[-1]["usage"]["cost"] > 0
    assert all(e["usage"] is None for e in events[:-1])


def test_cached_prompt_is_charged_less(server):
    # ~1,000 tokens and one output token: the whole request is its prefill, so the cached copy's
    # cost is the handful of tokens past the last full cached block, not a fixed decode step that a
    # fast prefill (bf16 on AMX) would make comparable to the first request's.
    long_prompt = " ".join(mt_bench_prompts(24))
    first = complete(server, long_prompt, max_tokens=1)["usage"]
    again = complete(server, long_prompt, max_tokens=1)["usage"]
    assert again["prompt_tokens"] == first["prompt_tokens"] > 800
    assert again["prompt_tokens_details"]["cached_tokens"] > 0.9 * again["prompt_tokens"]
    assert again["cost"] < 0.5 * first["cost"]
    assert again["cost_details"]["input_usd"] < 0.5 * first["cost_details"]["input_usd"]


def test_request_closed_by_its_client_is_billed_for_its_work(server, ledger_path):
    with httpx.stream("POST", server.v1 + "/completions", headers=server.headers, timeout=60,
                      json={"model": "smollm2-135m", "prompt": "Count to a thousand:", "max_tokens": 400,
                            "ignore_eos": True, "stream": True}) as r:
        rid, n = None, 0
        for line in r.iter_lines():
            if line.startswith("data: {"):
                rid = json.loads(line[6:])["id"]
                n += 1
                if n >= 5:
                    break  # closing the response here drops the connection mid-stream
    assert rid is not None
    deadline = time.monotonic() + 20
    while not (found := rows(ledger_path, "WHERE id = ?", (rid,))):
        assert time.monotonic() < deadline, "the aborted request never reached the ledger"
        time.sleep(0.05)
    row = found[0]
    assert row["finish_reason"] == "abort"
    assert row["machine_seconds"] > 0 and row["cost_usd"] > 0
    assert 5 <= row["output_tokens"] < 400


def test_charges_add_up_to_busy_time_and_all_views_agree(server, ledger_path):
    prompts = [f"Write a short note about topic number {i}:" for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda p: complete(server, p, max_tokens=12), prompts))
    wait_idle(server)
    time.sleep(0.2)  # the aborted request's row, if its abort was the last thing the engine did
    report = httpx.get(server.v1 + "/cost", headers=server.headers, timeout=10).json()
    metrics = server.metrics()
    ledger = rows(ledger_path)
    total = report["since_start"]

    charged = sum(r["machine_seconds"] for r in ledger)
    assert charged == pytest.approx(total["busy_seconds"], rel=0.02)
    usd = sum(r["cost_usd"] for r in ledger)
    assert total["usd"] == pytest.approx(usd, rel=1e-9)
    assert metrics["leanserve:cost_usd_total"] == pytest.approx(usd, rel=1e-6)
    assert total["requests"] == len(ledger) == metrics["leanserve:cost_requests_total"]
    for kind, col in (("input", "prompt_tokens"), ("cached", "cached_tokens"), ("output", "output_tokens")):
        n = sum(r[col] for r in ledger)
        assert total["tokens"][kind] == n
        assert metrics[f'leanserve:cost_tokens_total{{kind="{kind}"}}'] == n
    assert metrics["leanserve:machine_busy_seconds_total"] == pytest.approx(total["busy_seconds"], rel=0.01)
    assert 0 < total["utilization"] <= 1
    assert total["usd_per_million_tokens"]["total"] == pytest.approx(usd / sum(
        r["prompt_tokens"] + r["output_tokens"] for r in ledger) * 1e6, rel=1e-6)
    assert 0 < total["achieved"]["bandwidth_fraction_of_peak"]
    # the catalog states no peak for some (hardware, dtype) pairs, e.g. cpu-local in bfloat16: no fraction then
    if report["basis"]["peak_flops_for_dtype"] is None:
        assert total["achieved"]["flops_fraction_of_peak"] is None
    else:
        assert 0 < total["achieved"]["flops_fraction_of_peak"]
    assert 'window="60s"' in httpx.get(server.base_url + "/metrics", headers=server.headers).text
    # the window holds this test's requests (all finished well within 60 s)
    assert report["window"]["requests"] >= len(prompts)
    assert report["basis"]["price_per_hour"] == PRICE

    # the ledger: key id (never the key), no text by default
    assert {r["key_id"] for r in ledger} == {hashlib.sha256(KEY.encode()).hexdigest()[:12]}
    assert all(r["prompt_text"] is None and r["output_text"] is None for r in ledger)
    assert not any(KEY in json.dumps(r) for r in ledger)
    # auth like the other /v1 routes; the window is validated
    assert httpx.get(server.v1 + "/cost", timeout=10).status_code == 401
    assert httpx.get(server.v1 + "/cost?window=0", headers=server.headers, timeout=10).status_code == 400


def test_answered_requests_survive_kill_9(server, ledger_path):
    """Last in the module: it kills the server."""
    ids = [complete(server, f"Fact {i}:", max_tokens=3)["id"] for i in range(3)]
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)
    found = {r["id"] for r in rows(ledger_path)}
    assert set(ids) <= found
