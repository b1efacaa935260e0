"""The gateway end to end: one server with both built-in models, an upstream (a second leanserve
started here, given a list price), a cascade and the response cache, driven by the official
openai client. Every response's cost and receipt is kept and checked against /v1/cost and the
ledger at the end; then the server restarts on the same cache file.

Tests run in file order and share the servers (module scope).
"""

from __future__ import annotations

import math
import sqlite3
import time

import httpx
import openai
import pytest

from tests.e2e.conftest import start_server

pytestmark = pytest.mark.e2e

KEY1, KEY2 = "sk-gw-one", "sk-gw-two"
PRICE_IN, PRICE_OUT = 100.0, 200.0  # the upstream's list price, $ per million tokens (large: easy to see)
CONFIDENT = "1, 2, 3, 4, 5, 6,"  # SmolLM2 continues " 7, 8, 9" with mean token logprob ~ -0.1
DOUBTFUL = "My favourite obscure word is"  # mean token logprob ~ -2
THRESHOLD = -0.5
PROMPT = "The capital of Italy is"


class Spent:
    """Every answered response's usage.cost and saved_usd, to add up against /v1/cost and the ledger."""

    def __init__(self) -> None:
        self.cost: dict[str, float] = {}  # model (as requested) -> $
        self.saved = 0.0

    def add(self, model: str, usage: dict) -> None:
        self.cost[model] = self.cost.get(model, 0.0) + usage["cost"]
        self.saved += usage["cost_details"]["saved_usd"]


@pytest.fixture(scope="module")
def spent() -> Spent:
    return Spent()


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """A second leanserve, served as model 'remote' by the gateway; its own response cache has a
    2-second TTL (the expiry test runs on it)."""
    tmp = tmp_path_factory.mktemp("upstream")
    s = start_server(tmp, "--served-model-name", "remote-small", "--response-cache", "--cache-path",
                     str(tmp / "cache.sqlite"), "--cache-ttl", "2")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gateway")
    return {"dir": tmp, "cache": tmp / "cache.sqlite", "ledger": tmp / "ledger.sqlite"}


def _start_gateway(paths, upstream_url: str):
    return start_server(paths["dir"], "--upstream",
                        f"remote={upstream_url},model=remote-small,key_env=GW_TEST_UPSTREAM_KEY,"
                        f"input={PRICE_IN},output={PRICE_OUT},timeout=30,retries=1",
                        "--cascade", "auto=smollm2-135m,gemma3-270m", "--cascade-threshold", str(THRESHOLD),
                        "--response-cache", "--cache-path", str(paths["cache"]), "--ledger", str(paths["ledger"]),
                        "--price-per-hour", "3.6",
                        model=["smollm2-135m", "gemma3-270m"], api_key=[KEY1, KEY2],
                        env_extra={"GW_TEST_UPSTREAM_KEY": "anything"})


@pytest.fixture(scope="module")
def gateway(paths, upstream):
    s = _start_gateway(paths, upstream.v1)
    yield s
    s.stop()


def client(server, key: str = KEY1) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key=key, max_retries=0, timeout=60)


def complete(server, spent: Spent | None, key: str = KEY1, **kw):
    """A completion through the raw-response API: (parsed response, its headers, the JSON dict)."""
    raw = client(server, key).completions.with_raw_response.create(**{"max_tokens": 8, "temperature": 0, **kw})
    body = raw.http_response.json()
    if spent is not None:
        spent.add(kw["model"], body["usage"])
    return raw.parse(), raw.headers, body


def stream_text(server, spent: Spent | None, key: str = KEY1, include_usage: bool = True, **kw):
    """A streamed completion: (text, usage dict or None, headers)."""
    kw = {"max_tokens": 8, "temperature": 0, **kw}
    with client(server, key).completions.with_streaming_response.create(
            stream=True, stream_options={"include_usage": True} if include_usage else None, **kw) as raw:
        headers = raw.headers
        text, usage = "", None
        for chunk in raw.parse():
            if chunk.choices:
                text += chunk.choices[0].text
            if chunk.usage is not None:
                usage = chunk.usage.model_dump()
    if spent is not None and usage is not None:
        spent.add(kw["model"], usage)
    return text, usage, headers


# ---- models and routing ---------------------------------------------------------------------------

def test_models_lists_local_upstream_and_route(gateway):
    ids = [m.id for m in client(gateway).models.list().data]
    assert ids == ["smollm2-135m", "gemma3-270m", "remote", "auto"]


def test_the_model_field_routes(gateway, spent):
    for model in ("smollm2-135m", "gemma3-270m"):
        r, headers, body = complete(gateway, spent, model=model, prompt=PROMPT)
        assert r.model == model and headers["x-leanserve-cache"] == "miss"
        assert body["usage"]["cost"] > 0 and body["usage"]["cost_details"]["hardware"] == "cpu-local"
    # the upstream: its answer billed at the list price given on the command line
    r, headers, body = complete(gateway, spent, model="remote", prompt=PROMPT)
    u = body["usage"]
    assert r.model == "remote" and u["cost_details"]["hardware"] == "upstream:remote"
    assert u["cost"] == pytest.approx((u["prompt_tokens"] * PRICE_IN + u["completion_tokens"] * PRICE_OUT) / 1e6)
    # it is the same model as the local smollm2-135m, greedy: the same text
    local, _, _ = complete(gateway, spent, model="smollm2-135m", prompt=PROMPT)  # a cache hit, $0
    assert r.choices[0].text == local.choices[0].text
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        complete(gateway, None, model="nope", prompt=PROMPT)


def test_streaming_through_the_upstream(gateway, spent):
    prompt = "A list of three fruits:"
    text, usage, headers = stream_text(gateway, spent, model="remote", prompt=prompt, max_tokens=12)
    assert headers["x-leanserve-cache"] == "miss" and text
    assert usage["cost"] == pytest.approx(
        (usage["prompt_tokens"] * PRICE_IN + usage["completion_tokens"] * PRICE_OUT) / 1e6)
    r, _, _ = complete(gateway, spent, model="smollm2-135m", prompt=prompt, max_tokens=12)
    assert r.choices[0].text == text  # the same model behind the upstream, greedy


# ---- the response cache ---------------------------------------------------------------------------

def test_cache_hits_whole_and_streamed(gateway, spent):
    prompt = "Three colours of the rainbow are"
    first, h1, b1 = complete(gateway, spent, model="smollm2-135m", prompt=prompt)
    assert h1["x-leanserve-cache"] == "miss" and b1["usage"]["cost"] > 0
    again, h2, b2 = complete(gateway, spent, model="smollm2-135m", prompt=prompt)
    assert h2["x-leanserve-cache"] == "hit" and again.choices[0].text == first.choices[0].text
    assert again.id != first.id
    d = b2["usage"]["cost_details"]
    assert b2["usage"]["cost"] == 0.0 and d["cache"] == "hit"
    assert d["saved"]["response_cache"] == pytest.approx(b1["usage"]["cost"]) == pytest.approx(d["saved_usd"])
    # streamed: replayed as server-sent events, with and without the usage chunk
    text, usage, h3 = stream_text(gateway, spent, model="smollm2-135m", prompt=prompt)
    assert h3["x-leanserve-cache"] == "hit" and text == first.choices[0].text and usage["cost"] == 0.0
    text, usage, _ = stream_text(gateway, None, model="smollm2-135m", prompt=prompt, include_usage=False)
    assert text == first.choices[0].text and usage is None
    spent.saved += b1["usage"]["cost"]  # its receipt, not shown without the usage chunk: the first answer's cost
    # a streamed miss is stored too, and hits as a whole response
    prompt = "Two animals that live in the sea are"
    text, usage, h4 = stream_text(gateway, spent, model="gemma3-270m", prompt=prompt)
    assert h4["x-leanserve-cache"] == "miss" and usage["cost"] > 0
    r, h5, b5 = complete(gateway, spent, model="gemma3-270m", prompt=prompt)
    assert h5["x-leanserve-cache"] == "hit" and r.choices[0].text == text
    assert b5["usage"]["completion_tokens"] == usage["completion_tokens"]
    # the upstream's answers are cached as well
    _, h6, b6 = complete(gateway, spent, model="remote", prompt=PROMPT)
    assert h6["x-leanserve-cache"] == "hit" and b6["usage"]["cost"] == 0.0


def test_another_key_never_hits_and_undetermined_requests_never_do(gateway, spent):
    prompt = "Three colours of the rainbow are"  # cached under KEY1 above
    _, h, b = complete(gateway, spent, key=KEY2, model="smollm2-135m", prompt=prompt)
    assert h["x-leanserve-cache"] == "miss" and b["usage"]["cost"] > 0
    for _ in range(2):  # sampled without a seed: never looked up, never stored
        _, h, _ = complete(gateway, spent, model="smollm2-135m", prompt=prompt, temperature=0.8)
        assert h["x-leanserve-cache"] == "off"
    # with a seed the answer is determined: cached
    _, h, _ = complete(gateway, spent, model="smollm2-135m", prompt=prompt, temperature=0.8, seed=7)
    assert h["x-leanserve-cache"] == "miss"
    _, h, _ = complete(gateway, spent, model="smollm2-135m", prompt=prompt, temperature=0.8, seed=7)
    assert h["x-leanserve-cache"] == "hit"
    # the client can opt out
    raw = client(gateway).completions.with_raw_response.create(
        model="smollm2-135m", prompt=prompt, max_tokens=8, temperature=0, extra_headers={"Cache-Control": "no-cache"})
    body = raw.http_response.json()
    spent.add("smollm2-135m", body["usage"])
    assert raw.headers["x-leanserve-cache"] == "bypass" and body["usage"]["cost"] > 0


def test_ttl_expiry(upstream):
    prompt = "The largest planet is"
    _, h, _ = complete(upstream, None, model="remote-small", prompt=prompt)
    assert h["x-leanserve-cache"] == "miss"
    _, h, _ = complete(upstream, None, model="remote-small", prompt=prompt)
    assert h["x-leanserve-cache"] == "hit"
    time.sleep(2.2)  # the upstream's --cache-ttl 2
    _, h, _ = complete(upstream, None, model="remote-small", prompt=prompt)
    assert h["x-leanserve-cache"] == "miss"


# ---- the cascade ------------------------------------------------------------------------------------

def test_the_cascade_keeps_a_confident_answer(gateway, spent):
    r, h, body = complete(gateway, spent, model="auto", prompt=CONFIDENT)
    route = body["route"]
    assert route["name"] == "auto" and route["answered_by"] == "smollm2-135m" == r.model
    (attempt,) = route["attempts"]
    assert attempt["accepted"] and attempt["score"] >= THRESHOLD
    assert h["x-leanserve-route"].startswith("smollm2-135m=answered")
    assert r.choices[0].logprobs is None  # asked for the score, not shown: the client did not ask
    # billed once; routing saved the large model's estimated cost minus what was paid
    assert body["usage"]["cost"] == pytest.approx(attempt["cost"])
    est = route["largest_model_estimate_usd"]
    assert est is not None and body["usage"]["cost_details"]["saved"]["routing"] == pytest.approx(
        est - attempt["cost"])


def test_the_cascade_escalates_a_doubtful_answer(gateway, spent):
    r, h, body = complete(gateway, spent, model="auto", prompt=DOUBTFUL)
    route = body["route"]
    assert route["answered_by"] == "gemma3-270m" == r.model
    small, large = route["attempts"]
    assert small["model"] == "smollm2-135m" and not small["accepted"] and small["score"] < THRESHOLD
    assert large["model"] == "gemma3-270m" and large["accepted"]
    # both attempts billed; routing "saved" minus the wasted attempt
    assert body["usage"]["cost"] == pytest.approx(small["cost"] + large["cost"])
    assert body["usage"]["cost_details"]["saved"]["routing"] == pytest.approx(-small["cost"])
    assert "smollm2-135m=escalated" in h["x-leanserve-route"]
    # streamed: the same route, the usage chunk carries the sum
    text, usage, h2 = stream_text(gateway, spent, model="auto", prompt=DOUBTFUL + " really")
    assert "escalated" in h2["x-leanserve-route"] and text
    assert usage["cost_details"]["saved"]["routing"] < 0 and usage["cost"] > -usage["cost_details"]["saved"]["routing"]


# ---- the bill adds up -------------------------------------------------------------------------------

def _cost(server) -> dict:
    return httpx.get(server.v1 + "/cost", headers=server.headers, timeout=10).json()


def test_every_cost_and_receipt_adds_up_in_cost_and_the_ledger(gateway, spent, paths):
    report = _cost(gateway)
    total = report["since_start"]
    assert total["usd"] == pytest.approx(sum(spent.cost.values()), rel=1e-9, abs=1e-15)
    assert total["saved"]["usd"] == pytest.approx(spent.saved, rel=1e-9, abs=1e-15)
    assert report["models"]["remote"]["since_start"]["usd"] == pytest.approx(spent.cost["remote"])
    assert report["models"]["remote"]["kind"] == "upstream" and report["models"]["auto"]["kind"] == "route"
    # the ledger: one row per attempt and per hit, the same sums (its writer commits before each answer)
    conn = sqlite3.connect(paths["ledger"])
    usd, saved, hits = conn.execute("SELECT SUM(cost_usd), SUM(saved_prefix_usd + saved_cache_usd + "
                                    "saved_routing_usd), SUM(cache = 'hit') FROM requests").fetchone()
    assert usd == pytest.approx(total["usd"], rel=1e-9) and saved == pytest.approx(total["saved"]["usd"], rel=1e-9)
    assert hits == total["cache_hits"] == report["response_cache"]["lookups"]["hit"]
    routes = dict(conn.execute("SELECT model, COUNT(*) FROM requests WHERE route = 'auto' GROUP BY model"))
    assert routes["smollm2-135m"] >= 3 and routes["gemma3-270m"] == 2  # attempts of the three cascade requests
    # /metrics: the same receipts by lever
    m = gateway.metrics()
    assert m['leanserve:saved_usd_total{lever="response_cache"}'] >= 0  # present (summed over models below)
    text = httpx.get(gateway.base_url + "/metrics", headers=gateway.headers, timeout=10).text
    levers = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("leanserve:saved_usd_total{")]
    assert math.fsum(levers) == pytest.approx(total["saved"]["usd"], rel=1e-9, abs=1e-15)


# ---- failures and restarts -----------------------------------------------------------------------

def test_a_failing_upstream_is_a_clean_error_and_a_restart_keeps_the_cache(gateway, paths, upstream):
    prompt = "Three colours of the rainbow are"
    first, _, _ = complete(gateway, None, model="smollm2-135m", prompt=prompt)
    # the upstream goes away while the gateway runs: an OpenAI-format error, the local models serve on
    upstream.stop()
    with pytest.raises(openai.APIStatusError) as e:
        complete(gateway, None, model="remote", prompt="Something new to ask", max_tokens=4)
    assert e.value.status_code == 502 and e.value.body["code"] == "upstream_unreachable"
    r, _, _ = complete(gateway, None, model="gemma3-270m", prompt="Something new to ask", max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length")
    gateway.stop()
    # a new server on the same cache file (here with one model: entries are keyed by model name) answers from it
    again = start_server(paths["dir"], "--response-cache", "--cache-path", str(paths["cache"]), "--no-ledger",
                         api_key=[KEY1, KEY2])
    try:
        r, h, b = complete(again, None, model="smollm2-135m", prompt=prompt)
        assert h["x-leanserve-cache"] == "hit" and r.choices[0].text == first.choices[0].text
        assert b["usage"]["cost"] == 0.0
    finally:
        again.stop()
