"""AsyncEngine and the HTTP app over a fake LLMEngine: no model, no torch work, exact control over
when a step runs and when it fails."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from leanserve.cost.basis import resolve_price_basis
from leanserve.engine.async_engine import AsyncEngine, QueueFullError, RequestTimeoutError
from leanserve.serve.api import ServerSettings, build_app
from leanserve.serve.auth import key_digest
from leanserve.types import SamplingParams
from tests.fake_engine import BAD_TOKEN, FakeEngine

def _wait_for(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.002)


# ---- AsyncEngine alone ---------------------------------------------------------------------

def _run(coro):
    return asyncio.run(coro)


def test_outputs_stream_in_order_and_only_the_engine_thread_touches_the_engine():
    fake = FakeEngine()

    async def main():
        ae = AsyncEngine(fake)
        ae.start()
        try:
            stream = ae.add_request("a", [1, 2], SamplingParams(max_tokens=5))
            outs = [o async for o in stream]
        finally:
            ae.shutdown()
        return outs

    outs = _run(main())
    assert outs[-1].finished and outs[-1].outputs[0].token_ids == [0, 1, 2, 3, 4]
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    assert lengths == sorted(lengths)  # cumulative outputs, maybe coalesced, never out of order
    assert fake.thread_ids and threading.get_ident() not in fake.thread_ids and len(fake.thread_ids) == 1


def test_an_engine_built_on_its_own_thread_runs_on_that_same_thread():
    built_on: list[int] = []

    def build():
        built_on.append(threading.get_ident())
        return FakeEngine()

    async def main():
        ae = AsyncEngine.built_on_engine_thread(build)
        assert not ae.is_running  # built, waiting for start()
        ae.start()
        try:
            outs = [o async for o in ae.add_request("a", [1, 2], SamplingParams(max_tokens=3))]
        finally:
            ae.shutdown()
        return ae, outs

    ae, outs = _run(main())
    assert outs[-1].outputs[0].token_ids == [0, 1, 2]
    # one thread loaded and stepped the engine (CPU: one OpenMP team), and it was not the caller's
    assert ae.engine.thread_ids == set(built_on) and built_on[0] != threading.get_ident()
    assert not ae._thread.is_alive()


def test_an_engine_that_fails_to_build_raises_in_the_caller():
    def build():
        raise ValueError("no such model")

    with pytest.raises(ValueError, match="no such model"):
        AsyncEngine.built_on_engine_thread(build)


def test_shutdown_before_start_ends_the_waiting_thread():
    ae = AsyncEngine.built_on_engine_thread(FakeEngine)
    t = time.perf_counter()
    ae.shutdown()
    assert not ae._thread.is_alive() and time.perf_counter() - t < 2


def test_requests_join_the_running_batch():
    fake = FakeEngine(step_s=0.005)

    async def main():
        ae = AsyncEngine(fake)
        ae.start()
        try:
            a = ae.add_request("a", [1], SamplingParams(max_tokens=40))
            await a.get()  # a is running
            b = ae.add_request("b", [1], SamplingParams(max_tokens=3))
            outs_b = [o async for o in b]
            outs_a = [o async for o in a]
        finally:
            ae.shutdown()
        return outs_a, outs_b

    outs_a, outs_b = _run(main())
    assert outs_b[-1].finished and not any(o.finished for o in outs_a[:-1])
    joint = [batch for batch in fake.batches if batch == ["a", "b"]]
    assert len(joint) == 3  # b ran its 3 steps side by side with a, which had not finished
    assert b_finished_before_a(fake)


def b_finished_before_a(fake: FakeEngine) -> bool:
    last_b = max(i for i, batch in enumerate(fake.batches) if "b" in batch)
    last_a = max(i for i, batch in enumerate(fake.batches) if "a" in batch)
    return last_b < last_a


def test_idle_loop_does_not_spin():
    fake = FakeEngine()

    async def main():
        ae = AsyncEngine(fake)
        ae.start()
        try:
            [o async for o in ae.add_request("a", [1], SamplingParams(max_tokens=2))]
            calls = fake.step_calls
            await asyncio.sleep(0.2)
            return calls, fake.step_calls
        finally:
            ae.shutdown()

    before, after = _run(main())
    assert before == 2 and after == 2


def test_queue_limit_counts_sequences_and_abort_frees_a_slot():
    fake = FakeEngine(max_num_seqs=1, step_s=0.01)

    async def main():
        ae = AsyncEngine(fake, max_queue=2)  # capacity: 1 running + 2 waiting sequences
        ae.start()
        try:
            ae.add_request("a", [1], SamplingParams(max_tokens=500))
            ae.add_request("b", [1], SamplingParams(max_tokens=500, n=2))
            with pytest.raises(QueueFullError) as e:
                ae.add_request("c", [1], SamplingParams(max_tokens=5))
            assert e.value.retry_after >= 1
            with pytest.raises(ValueError, match="n must be <= 3"):
                ae.add_request("d", [1], SamplingParams(max_tokens=5, n=4))
            ae.abort("a")
            c = ae.add_request("c", [1], SamplingParams(max_tokens=2))
            ae.abort("b")
            outs = [o async for o in c]
            while set(fake.aborted) != {"a", "b"}:
                await asyncio.sleep(0.002)
            return outs
        finally:
            ae.shutdown()

    outs = _run(asyncio.wait_for(main(), 5))
    assert outs[-1].finished
    assert fake.requests == {}


def test_timeout_aborts_the_request():
    fake = FakeEngine(step_s=0.005)

    async def main():
        ae = AsyncEngine(fake)
        ae.start()
        try:
            s = ae.add_request("slow", [1], SamplingParams(max_tokens=10_000), timeout=0.1)
            t0 = time.monotonic()
            with pytest.raises(RequestTimeoutError):
                async for _ in s:
                    pass
            elapsed = time.monotonic() - t0
            while fake.aborted != ["slow"]:  # the abort goes through the engine thread
                await asyncio.sleep(0.002)
            return elapsed
        finally:
            ae.shutdown()

    elapsed = _run(asyncio.wait_for(main(), 5))
    assert 0.05 < elapsed < 1.0
    assert fake.requests == {}


# ---- through HTTP --------------------------------------------------------------------------

@pytest.fixture()
def fake_server():
    def make(max_num_seqs: int = 4, keys: tuple[str, ...] = ()):
        fake = FakeEngine(max_num_seqs=max_num_seqs, step_s=0.003)
        ae = AsyncEngine(fake, max_queue=8)
        app = build_app(ae, ServerSettings("fake-model", frozenset(key_digest(k) for k in keys), request_timeout=30,
                                           price_basis=resolve_price_basis(price_per_hour=3.6)))
        return fake, app
    return make


def _sse_events(lines) -> list:
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


def test_failed_step_fails_only_its_requests_and_serving_goes_on(fake_server):
    fake, app = fake_server(max_num_seqs=1)  # "a" runs, "b" waits: a step with "a" in it fails
    results = {}
    with TestClient(app) as client:
        def post(name, max_tokens):
            results[name] = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": max_tokens})

        fake.fail_when = lambda batch: batch == [next(iter(fake.requests))] and len(fake.requests) == 2
        ta = threading.Thread(target=post, args=("a", 50))
        ta.start()
        _wait_for(lambda: len(fake.requests) == 1)
        tb = threading.Thread(target=post, args=("b", 3))
        tb.start()
        ta.join(10)
        tb.join(10)
        assert results["a"].status_code == 500, results["a"].text
        err = results["a"].json()["error"]
        assert err["type"] == "server_error" and "simulated kernel failure" in err["message"]
        assert results["b"].status_code == 200, results["b"].text
        assert results["b"].json()["choices"][0]["text"] == "abc"
        assert fake.resets == 1
        # the next request is served normally
        r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200
        metrics = client.get("/metrics").text
        assert 'leanserve:engine_step_failures_total{model_name="fake-model"} 1.0' in metrics


def test_failed_step_ends_a_stream_with_an_error_event(fake_server):
    fake, app = fake_server()
    fake.fail_when = lambda batch: fake.step_calls == 3
    with TestClient(app) as client:
        with client.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "stream": True}) as r:
            assert r.status_code == 200
            events = _sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["type"] == "server_error" and "simulated" in err["message"]
    contents = [json.loads(e)["choices"][0]["delta"].get("content") for e in events[:-2]]
    assert contents == ["", "a", "b"]  # the role chunk, then the two tokens before the failure


def test_engine_value_error_is_a_400(fake_server):
    _, app = fake_server()
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"prompt": [1, BAD_TOKEN], "max_tokens": 2})
        assert r.status_code == 400
        assert r.json()["error"]["message"] == f"prompt token {BAD_TOKEN} is not allowed here"
        assert r.json()["error"]["param"] == "prompt"


def test_streamed_text_equals_whole_text_with_n_and_usage(fake_server):
    _, app = fake_server()
    body = {"prompt": "hi", "max_tokens": 5, "n": 2}
    with TestClient(app) as client:
        whole = client.post("/v1/completions", json=body).json()
        with client.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                             "stream_options": {"include_usage": True}}) as r:
            events = _sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    texts = {0: "", 1: ""}
    for c in chunks[:-1]:
        (choice,) = c["choices"]
        texts[choice["index"]] += choice["text"]
        assert c["usage"] is None
    assert texts == {c["index"]: c["text"] for c in whole["choices"]} == {0: "abcde", 1: "abcde"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    # usage.cost is a number (USD), the breakdown in cost_details: 5 fake steps of 3 ms at $3.6/h
    assert whole["usage"] == {"prompt_tokens": 2, "completion_tokens": 10, "total_tokens": 12,
                              "prompt_tokens_details": {"cached_tokens": 0}, "cost": pytest.approx(1.5e-5),
                              "cost_details": {"machine_seconds": pytest.approx(0.015), "input_usd": 0.0,
                                               "output_usd": pytest.approx(1.5e-5), "price_per_hour": 3.6,
                                               "hardware": "cpu-local", "saved_usd": 0.0,
                                               "saved": {"prefix_cache": 0.0, "response_cache": 0.0, "routing": 0.0}}}


def test_api_keys(fake_server):
    _, app = fake_server(keys=("k1", "k2"))
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/version").status_code == 200
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic k1"}):
            r = client.get("/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["WWW-Authenticate"] == "Bearer"
        # checked before the body is parsed: bad JSON without a key is a 401, not a 400
        assert client.post("/v1/completions", content=b"{", headers={"Content-Type": "application/json"}).status_code == 401
        for key in ("k1", "k2"):
            assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert client.get("/metrics", headers={"Authorization": "Bearer k1"}).status_code == 200


def test_openapi_documents_every_parameter(fake_server):
    _, app = fake_server()
    with TestClient(app) as client:
        spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    chat = set(schemas["ChatCompletionRequest"]["properties"])
    comp = set(schemas["CompletionRequest"]["properties"])
    shared = {"model", "n", "temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty",
              "logit_bias", "user", "stream", "stream_options", "top_k", "min_p", "repetition_penalty", "ignore_eos",
              "min_tokens", "priority"}
    assert shared | {"messages", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs"} <= chat
    assert shared | {"prompt", "max_tokens", "logprobs"} <= comp
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/version"):
        assert path in spec["paths"]
    responses = spec["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "400", "429"} <= set(responses) and "422" not in responses  # bad bodies are 400s here


def test_chat_without_a_template_is_a_400_and_completions_still_work(fake_server):
    fake, app = fake_server()
    fake.tokenizer.has_chat_template = False
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["code"] == "chat_template_missing" and "/v1/completions" in err["message"]
        assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}).status_code == 200
