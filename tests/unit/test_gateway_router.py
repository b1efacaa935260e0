"""The gateway over fake engines (tests/fake_engine.py): routing by name, the exact cache and its
verdicts, per-key scopes, a cascade's escalation and bill, streamed hits. Exact and fast; the real
models and an upstream are in tests/e2e/test_gateway.py."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from leanserve.cost.basis import resolve_price_basis
from leanserve.engine.async_engine import AsyncEngine
from leanserve.gateway.cache import CacheConfig, ResponseCache
from leanserve.gateway.router import CascadeSpec
from leanserve.serve.api import ServerSettings, build_app
from leanserve.serve.auth import key_digest
from tests.fake_engine import FakeEngine


@pytest.fixture()
def app(tmp_path):
    fakes = {"small": FakeEngine(step_s=0.001), "large": FakeEngine(step_s=0.002)}
    engines = {n: AsyncEngine(f, max_queue=8) for n, f in fakes.items()}
    settings = ServerSettings("small", frozenset({key_digest("k1"), key_digest("k2")}), request_timeout=30,
                              price_basis=resolve_price_basis(price_per_hour=3.6))
    cache = ResponseCache(CacheConfig(tmp_path / "cache.sqlite"))
    a = build_app(engines, settings, cascades=[CascadeSpec("auto", ("small", "large"), -0.5)], cache=cache)
    with TestClient(a) as client:
        yield client, fakes


def post(client, body, key="k1", headers=None):
    return client.post("/v1/completions", json={"max_tokens": 3, "temperature": 0, **body},
                       headers={"Authorization": f"Bearer {key}", **(headers or {})})


def test_models_and_routing_by_name(app):
    client, fakes = app
    r = client.get("/v1/models", headers={"Authorization": "Bearer k1"})
    assert [m["id"] for m in r.json()["data"]] == ["small", "large", "auto"]
    assert r.json()["data"][2]["route"] == {"kind": "cascade", "models": ["small", "large"],
                                            "score": "mean_logprob", "threshold": -0.5}
    r = post(client, {"model": "large", "prompt": "hi"})
    assert r.status_code == 200 and r.json()["model"] == "large" and r.json()["choices"][0]["text"] == "abc"
    assert len(fakes["large"].batches) == 3 and fakes["small"].batches == []
    r = post(client, {"prompt": "hi"})  # no model: the first local one
    assert r.json()["model"] == "small"
    r = post(client, {"model": "medium", "prompt": "hi"})
    assert r.status_code == 404 and r.json()["error"]["message"] == (
        "the model 'medium' does not exist; this server serves 'small', 'large', 'auto' (GET /v1/models)")


def test_cache_verdicts_scopes_and_receipts(app):
    client, fakes = app
    first = post(client, {"model": "small", "prompt": "hello"})
    assert first.headers["x-leanserve-cache"] == "miss"
    cost = first.json()["usage"]["cost"]
    assert cost == pytest.approx(3 * 0.001 * 3.6 / 3600)  # three 1 ms steps at $3.6/h
    hit = post(client, {"model": "small", "prompt": "hello", "stream": False, "user": "someone"})
    assert hit.headers["x-leanserve-cache"] == "hit" and hit.json()["choices"] == first.json()["choices"]
    usage = hit.json()["usage"]
    assert usage["cost"] == 0.0 and usage["cost_details"]["saved"] == {
        "prefix_cache": 0.0, "response_cache": cost, "routing": 0.0} and usage["cost_details"]["saved_usd"] == cost
    assert len(fakes["small"].batches) == 3  # the hit ran no step
    assert post(client, {"model": "small", "prompt": "hello"}, key="k2").headers["x-leanserve-cache"] == "miss"
    assert post(client, {"model": "small", "prompt": "hello", "temperature": 1.0}).headers["x-leanserve-cache"] == "off"
    assert post(client, {"model": "small", "prompt": "hello"},
                headers={"Cache-Control": "no-cache"}).headers["x-leanserve-cache"] == "bypass"
    assert post(client, {"model": "small", "prompt": "hello"},
                headers={"x-leanserve-cache": "bypass"}).headers["x-leanserve-cache"] == "bypass"
    report = client.get("/v1/cost", headers={"Authorization": "Bearer k1"}).json()
    assert report["response_cache"]["lookups"] == {"hit": 1, "semantic_hit": 0, "miss": 2, "bypass": 2, "off": 1}
    total = report["since_start"]
    assert (total["requests"], total["cache_hits"]) == (6, 1)
    assert total["saved"]["response_cache"] == pytest.approx(cost)


def test_a_streamed_hit_is_replayed_as_events(app):
    client, _ = app
    whole = post(client, {"model": "small", "prompt": "stream me", "n": 2})
    with client.stream("POST", "/v1/completions", headers={"Authorization": "Bearer k1"},
                       json={"model": "small", "prompt": "stream me", "n": 2, "max_tokens": 3, "temperature": 0,
                             "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.headers["x-leanserve-cache"] == "hit"
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    texts = {}
    for c in chunks[:-1]:
        for ch in c["choices"]:
            texts[ch["index"]] = texts.get(ch["index"], "") + ch["text"]
    assert texts == {c["index"]: c["text"] for c in whole.json()["choices"]}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["cost"] == 0.0


def test_a_cascade_without_confidence_escalates_and_bills_both(app):
    client, fakes = app
    r = post(client, {"model": "auto", "prompt": "route me"})
    body = r.json()
    assert r.status_code == 200 and body["model"] == "large"
    small, large = body["route"]["attempts"]
    assert (small["model"], small["accepted"], small["score"]) == ("small", False, None)  # no logprobs: -inf
    assert (large["model"], large["accepted"]) == ("large", True)
    assert body["usage"]["cost"] == pytest.approx(small["cost"] + large["cost"])
    assert body["usage"]["cost_details"]["saved"]["routing"] == pytest.approx(-small["cost"])
    assert r.headers["x-leanserve-route"] == "small=escalated, large=answered"
    # the first attempt asked for logprobs (the score needs them), the client did not: none shown
    assert fakes["small"].requests == {} and body["choices"][0]["logprobs"] is None
