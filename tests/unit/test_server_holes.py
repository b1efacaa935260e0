"""The server's holes found by a hostile client, each pinned over the fake engine core (no model):
bad input is a 400 that fails only its own request, a client that never reads holds one output,
one caller cannot take every slot, Retry-After follows the drain rate, and a bill has one door."""

from __future__ import annotations

import asyncio
import gc
import json
import re
import sqlite3
import weakref
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from leanserve.cost.basis import resolve_price_basis
from leanserve.cost.billing import Billing, RequestMeta
from leanserve.cost.ledger import Ledger
from leanserve.cost.meter import CostMeter
from leanserve.engine.async_engine import AsyncEngine, DrainRate, QueueFullError, RequestStream
from leanserve.engine.engine import LLMEngine
from leanserve.engine.interface import EngineCore
from leanserve.serve.api import ServerSettings, build_app
from leanserve.serve.auth import key_digest
from leanserve.types import CompletionOutput, RequestOutput, SamplingParams
from tests.fake_engine import FakeEngine, missing_members

ROOT = Path(__file__).resolve().parents[2]


def _app(keys: tuple[str, ...] = (), max_num_seqs: int = 4, max_queue: int = 8, **settings):
    fake = FakeEngine(max_num_seqs=max_num_seqs, step_s=0.002)
    ae = AsyncEngine(fake, max_queue=max_queue)
    return fake, build_app(ae, ServerSettings("fake-model", frozenset(key_digest(k) for k in keys),
                                              request_timeout=30, price_basis=resolve_price_basis(price_per_hour=3.6),
                                              **settings))


# ---- the engine contract ----------------------------------------------------------------------

def test_the_fake_and_the_real_engine_implement_the_whole_contract():
    assert missing_members(FakeEngine()) == []
    assert missing_members(LLMEngine) == []  # methods and their parameters (attributes: tests/model)
    assert {"add_request", "step", "abort_request", "has_unfinished", "stats"} <= set(vars(EngineCore))


def test_async_engine_uses_nothing_but_the_contract():
    source = (ROOT / "leanserve/engine/async_engine.py").read_text()
    for probe in (r"getattr\(", "last_scheduler_output", r'split\("#"', "abort_request_output", r"\.scheduler\b",
                  r"\.loaded\b", r"\.kv_cache\b", r"\.runner\b"):
        assert not re.search(probe, source), probe


# ---- 1-3: bad values fail alone, with a 400 -------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("top_k", 2**63), ("top_k", 2**31), ("repetition_penalty", 1e-300), ("n", 17), ("temperature", 2.01),
    ("logit_bias", {"\u0661": 5}), ("logit_bias", {"\u00b2": 5}), ("logit_bias", {"1" * 11: 5}),
    ("stop", "x" * 1025), ("model", "m" * 300), ("max_tokens", 2**31),
])
def test_out_of_range_fields_are_400s_and_the_batch_goes_on(field, value):
    fake, app = _app()
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, field: value})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == field and len(r.text) < 1000
        assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3}).status_code == 200
    assert fake.requests == {}


@pytest.mark.parametrize("body", [
    b'{"prompt": "a\\ud800b", "max_tokens": 2}',
    b'{"prompt": ["\\udfff"], "max_tokens": 2}',
    b'{"prompt": "hi", "stop": ["\\ud83d"], "max_tokens": 2}',
    b'{"prompt": "hi", "user": "\\udc00", "max_tokens": 2}',
    b'{"prompt": "hi", "model": "\\ud800", "max_tokens": 2}',
])
def test_lone_surrogates_are_400s(body):
    _, app = _app()
    with TestClient(app) as client:
        r = client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, r.text
        assert "not valid Unicode" in r.json()["error"]["message"]


@pytest.mark.parametrize("content", ['"x\\ud800"', '[{"type": "text", "text": "\\udbff"}]'])
def test_lone_surrogates_in_messages_are_400s(content):
    _, app = _app()
    body = f'{{"messages": [{{"role": "user", "content": {content}}}], "max_tokens": 2}}'.encode()
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text


def test_any_tokenizer_failure_on_a_request_is_a_400_and_the_server_serves():
    fake, app = _app()

    def explode(text, add_special_tokens=True):
        if "boom" in text:
            raise RuntimeError("tokenizer blew up")
        return [10 + ord(c) % 26 for c in text]

    fake.tokenizer.encode = explode
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"prompt": "boom", "max_tokens": 2})
        assert r.status_code == 400 and "tokenizer blew up" in r.json()["error"]["message"]
        assert client.post("/v1/completions", json={"prompt": "fine", "max_tokens": 2}).status_code == 200


def test_prompt_text_far_past_the_context_is_refused_before_tokenizing():
    fake, app = _app()
    calls = []
    encode = fake.tokenizer.encode
    fake.tokenizer.encode = lambda text, add_special_tokens=True: calls.append(len(text)) or encode(text)
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"prompt": "x" * (32 * 64 + 1), "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "y" * 3000}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert calls == []


def test_tokenizing_runs_off_the_event_loop():
    fake, app = _app()
    loops = []
    encode = fake.tokenizer.encode

    def record(text, add_special_tokens=True):
        try:
            asyncio.get_running_loop()
            loops.append("on the loop")
        except RuntimeError:
            loops.append("worker")
        return encode(text)

    fake.tokenizer.encode = record
    with TestClient(app) as client:
        assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}).status_code == 200
    assert loops == ["worker"]


# ---- 6: a client that never reads holds one output --------------------------------------------

def _output(rid: str, n_tokens: int, finished: bool = False) -> RequestOutput:
    return RequestOutput(rid, [1], [CompletionOutput(0, "a" * n_tokens, [0] * n_tokens, "length" if finished else None)],
                         finished=finished)


def test_a_stream_keeps_only_the_newest_output():
    async def main():
        stream = RequestStream("r", 1, 0.0)
        first = _output("r", 1)
        ref = weakref.ref(first)
        stream.put(first)
        for i in range(2, 200):
            stream.put(_output("r", i))
        del first
        gc.collect()
        assert ref() is None  # nothing holds the outputs the client never read
        assert len((await stream.get()).outputs[0].token_ids) == 199
        stream.put(_output("r", 200, finished=True))
        stream.put(_output("r", 201))  # nothing after the final output
        final = await stream.get()
        assert final.finished and len(final.outputs[0].token_ids) == 200

    asyncio.run(main())


def test_an_error_replaces_an_unread_output_and_closes_the_stream():
    async def main():
        stream = RequestStream("r", 1, 0.0)
        stream.put(_output("r", 3))
        stream.put(TimeoutError("late"))
        stream.put(_output("r", 4, finished=True))
        with pytest.raises(TimeoutError):
            await stream.get()

    asyncio.run(main())


# ---- 7: capacity is shared; Retry-After from the drain rate --------------------------------------

def test_one_api_key_cannot_take_every_slot():
    async def main():
        fake = FakeEngine(max_num_seqs=2, step_s=0.01)
        ae = AsyncEngine(fake, max_queue=6)  # capacity 8: a key alone may hold 4
        ae.start()
        try:
            for i in range(4):
                ae.add_request(f"a{i}", [1], SamplingParams(max_tokens=1000), tenant="A")
            with pytest.raises(QueueFullError, match="this API key holds 4"):
                ae.add_request("a4", [1], SamplingParams(max_tokens=1000), tenant="A")
            ae.add_request("b0", [1], SamplingParams(max_tokens=1000, n=3), tenant="B")  # B still gets in
            # three tenants now: a share is 8 // 3 = 2; C has nothing in flight, so it gets the last slot
            ae.add_request("c0", [1], SamplingParams(max_tokens=1000), tenant="C")
            with pytest.raises(QueueFullError, match="at capacity"):
                ae.add_request("c1", [1], SamplingParams(max_tokens=1000), tenant="C")
            assert ae.tenant_limit("A") == 2 and ae.num_seqs_in_flight == 8
            for rid in ("a0", "a1", "a2", "a3", "b0", "c0"):
                ae.abort(rid)
            assert ae._held == {} and ae.num_seqs_in_flight == 0
        finally:
            ae.shutdown()

    asyncio.run(main())


def test_without_tenants_one_caller_may_fill_the_server():
    async def main():
        ae = AsyncEngine(FakeEngine(max_num_seqs=2, step_s=0.01), max_queue=2)
        ae.start()
        try:
            for i in range(4):
                ae.add_request(f"r{i}", [1], SamplingParams(max_tokens=1000))
            with pytest.raises(QueueFullError):
                ae.add_request("r4", [1], SamplingParams(max_tokens=1000))
        finally:
            ae.shutdown()

    asyncio.run(main())


def test_drain_rate_gives_retry_after():
    now = [100.0]
    drain = DrainRate(window=30.0, clock=lambda: now[0])
    assert drain.rate() is None and drain.seconds_to_drain(10, fallback=7.0) == 7.0
    for _ in range(20):  # 2 sequences finish every 0.5 s: 4 a second
        now[0] += 0.5
        drain.add(2)
    assert drain.rate() == pytest.approx(4.0)
    assert drain.seconds_to_drain(22, fallback=99) == pytest.approx(5.5)
    assert drain.seconds_to_drain(1, fallback=99) == 1.0  # at least a second
    assert drain.seconds_to_drain(10_000, fallback=99) == 60.0  # at most a minute
    now[0] += 31  # nothing finished for longer than the window
    assert drain.rate() is None


def test_retry_after_follows_how_fast_the_queue_drains():
    fake, app = _app(max_num_seqs=2, max_queue=2)
    fake.step_s = 0.01
    with TestClient(app) as client:
        # warm the drain estimate: a few short requests finish
        for _ in range(3):
            assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5}).status_code == 200
        import threading
        results = []
        threads = [threading.Thread(target=lambda: results.append(
            client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 30}))) for _ in range(4)]
        for t in threads:
            t.start()
        deadline = __import__("time").monotonic() + 5
        while len(fake.requests) < 4 and __import__("time").monotonic() < deadline:
            __import__("time").sleep(0.005)
        r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5})
        for t in threads:
            t.join(10)
    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
    # the 3 warm-up requests drained quickly: the estimate is the 1 s floor, not the 33 s a mean latency gave
    assert r.headers["Retry-After"] == "1"
    assert all(x.status_code == 200 for x in results)


def test_n_counts_toward_admission_and_is_capped():
    fake, app = _app(max_num_seqs=2, max_queue=2)
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "n": 5})
        assert r.status_code == 400 and "n must be <= 4" in r.json()["error"]["message"]
        assert client.post("/v1/completions", json={"prompt": "hi", "n": 16, "max_tokens": 2}).status_code == 400


def test_api_keys_are_tenants_only_when_there_are_several():
    fake, app = _app(keys=("k1", "k2"))
    seen = []
    real = app.state.server.engine.add_request
    app.state.server.engine.add_request = lambda *a, **kw: seen.append(kw["tenant"]) or real(*a, **kw)
    with TestClient(app) as client:
        for key in ("k1", "k2", "k1"):
            r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1},
                            headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200
    assert seen[0] == seen[2] != seen[1] and None not in seen


# ---- cost has one door ----------------------------------------------------------------------------

def test_billing_close_bills_records_and_settles_once(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    billing = Billing(resolve_price_basis(price_per_hour=7.2), CostMeter(), "m", ledger=ledger)
    out = _output("req-1", 3, finished=True)
    out.machine_seconds, out.prefill_seconds = 0.5, 0.2
    bill = billing.close(out, RequestMeta(arrival=0.0, key_id="abc"))
    assert (bill.usd, bill.input_usd, bill.output_usd) == pytest.approx((0.001, 0.0004, 0.0006))
    usage = asyncio.run(billing.settle(bill))
    assert usage == {"cost": pytest.approx(0.001), "cost_details": {
        "machine_seconds": 0.5, "input_usd": pytest.approx(0.0004), "output_usd": pytest.approx(0.0006),
        "price_per_hour": 7.2, "hardware": "cpu-local", "saved_usd": 0.0,
        "saved": {"prefix_cache": 0.0, "response_cache": 0.0, "routing": 0.0}}}
    row = sqlite3.connect(tmp_path / "ledger.sqlite").execute(
        "SELECT id, key_id, cost_usd, finish_reason FROM requests").fetchall()
    assert row == [("req-1", "abc", pytest.approx(0.001), "length")]  # committed before settle returned
    report = billing.report(60)
    assert report["since_start"]["requests"] == 1 and report["since_start"]["usd"] == pytest.approx(0.001)
    ledger.close()


def test_dollars_are_computed_in_one_place():
    # machine-seconds become $ in PriceBasis.usd only (catalog.py turns a throughput into $/Mtok, another thing)
    pattern = re.compile(r"price_per_hour\s*/|/\s*3600|usd_per_second|\.usd\(")

    def code(path: Path) -> str:  # comments dropped
        return "\n".join(re.split(r"#|-- ", line)[0] for line in path.read_text().splitlines())

    offenders = {str(p.relative_to(ROOT)) for p in (ROOT / "leanserve").rglob("*.py") if pattern.search(code(p))}
    assert offenders == {"leanserve/cost/basis.py", "leanserve/cost/billing.py", "leanserve/cost/accounting.py",
                         "leanserve/cost/catalog.py"}


def test_usage_cost_is_a_number_with_details(fake_server_usage=None):
    _, app = _app()
    with TestClient(app) as client:
        body = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                         "max_tokens": 3}).json()
        with client.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True,
                "stream_options": {"include_usage": True}}) as r:
            last = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")][-1]
    for usage in (body["usage"], last["usage"]):
        assert isinstance(usage["cost"], float) and usage["cost"] > 0
        assert usage["cost"] == pytest.approx(usage["cost_details"]["machine_seconds"] * 3.6 / 3600)
        assert usage["cost_details"]["input_usd"] + usage["cost_details"]["output_usd"] == pytest.approx(usage["cost"])
