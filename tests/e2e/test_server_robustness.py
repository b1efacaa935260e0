"""Bad input, overload and timeouts against the real server: every failure is a 4xx (or 504) in
OpenAI's error format, nothing is a 5xx, and the server keeps serving afterwards.

One server for the module: 2 sequences per batch, 4 more may wait, requests time out after 4 s,
context 512 tokens.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m"
MAX_MODEL_LEN = 2048
MAX_NUM_SEQS, MAX_QUEUE, TIMEOUT_S = 2, 4, 4
MSG = [{"role": "user", "content": "hi"}]
LONG = "word " * 2100  # more than MAX_MODEL_LEN tokens


@pytest.fixture(scope="module")
def server_args() -> list[str]:
    return ["--max-num-seqs", str(MAX_NUM_SEQS), "--max-queue", str(MAX_QUEUE), "--request-timeout", str(TIMEOUT_S),
            "--max-model-len", str(MAX_MODEL_LEN)]


def C(**kw):  # a completions body
    return ("/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 2, **kw})


def CH(**kw):  # a chat body
    return ("/v1/chat/completions", {"model": MODEL, "messages": MSG, "max_tokens": 2, **kw})


# (id, path, raw body or JSON object, expected status, expected param or None)
MALFORMED = [
    ("bad-json", "/v1/completions", b'{"prompt": "hi",', 400, None),
    ("not-an-object", "/v1/completions", b"[1, 2, 3]", 400, None),
    ("empty-body", "/v1/chat/completions", b"", 400, None),
    ("missing-prompt", *C(prompt=None), 400, "prompt"),
    ("prompt-wrong-type", *C(prompt=12), 400, "prompt"),
    ("two-prompts", *C(prompt=["a", "b"]), 400, "prompt"),
    ("empty-prompt", *C(prompt=""), 400, "prompt"),
    ("token-id-out-of-vocab", *C(prompt=[1, 10**9]), 400, "prompt"),
    ("negative-token-id", *C(prompt=[1, -5]), 400, "prompt"),
    ("prompt-too-long", *C(prompt=LONG), 400, "prompt"),
    ("messages-too-long", *CH(messages=[{"role": "user", "content": LONG}]), 400, "messages"),
    ("max-tokens-past-context", *C(max_tokens=MAX_MODEL_LEN), 400, "max_tokens"),
    ("unknown-model", *C(model="gpt-4o"), 404, "model"),
    ("n-zero", *C(n=0), 400, "n"),
    ("n-string", *C(n="two"), 400, "n"),
    ("n-huge", *C(n=10**6), 400, "n"),
    ("temperature-negative", *C(temperature=-1), 400, "temperature"),
    ("temperature-string", *CH(temperature="hot"), 400, "temperature"),
    ("top-p-2", *C(top_p=2), 400, "top_p"),
    ("top-p-zero", *C(top_p=0), 400, "top_p"),
    ("logprobs-50", *C(logprobs=50), 400, "logprobs"),
    ("top-logprobs-30", *CH(logprobs=True, top_logprobs=30), 400, "top_logprobs"),
    ("top-logprobs-without-logprobs", *CH(top_logprobs=2), 400, "top_logprobs"),
    ("stop-5-entries", *C(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("stop-empty-string", *C(stop=""), 400, "stop"),
    ("stop-wrong-type", *C(stop=[1, 2]), 400, "stop"),
    ("max-tokens-zero", *C(max_tokens=0), 400, "max_tokens"),
    ("max-tokens-negative", *CH(max_completion_tokens=-3), 400, "max_completion_tokens"),
    ("max-tokens-float", *C(max_tokens=2.5), 400, "max_tokens"),
    ("presence-penalty-3", *C(presence_penalty=3), 400, "presence_penalty"),
    ("frequency-penalty-minus-3", *CH(frequency_penalty=-3), 400, "frequency_penalty"),
    ("logit-bias-bad-key", *C(logit_bias={"abc": 1}), 400, "logit_bias"),
    ("logit-bias-out-of-vocab", *C(logit_bias={"99999999": 1}), 400, "logit_bias"),
    ("logit-bias-value-200", *C(logit_bias={"5": 200}), 400, "logit_bias"),
    ("seed-too-big", *C(seed=2**70), 400, "seed"),
    ("top-k-minus-5", *C(top_k=-5), 400, "top_k"),
    ("min-p-2", *C(min_p=2), 400, "min_p"),
    ("repetition-penalty-zero", *C(repetition_penalty=0), 400, "repetition_penalty"),
    ("min-tokens-over-max", *C(min_tokens=10, max_tokens=5), 400, "min_tokens"),
    ("priority-unknown", *C(priority="urgent"), 400, "priority"),
    ("stream-options-without-stream", *C(stream_options={"include_usage": True}), 400, "stream_options"),
    ("stream-not-bool", *CH(stream="maybe"), 400, "stream"),
    ("echo-with-stream", *C(echo=True, stream=True), 400, "echo"),
    ("empty-messages", *CH(messages=[]), 400, "messages"),
    ("messages-not-list", *CH(messages="hello"), 400, "messages"),
    ("unknown-role", *CH(messages=[{"role": "wizard", "content": "x"}]), 400, "messages.0"),
    ("missing-content", *CH(messages=[{"role": "user"}]), 400, "messages.0"),
    ("missing-role", *CH(messages=[{"content": "x"}]), 400, "messages.0"),
    ("content-wrong-type", *CH(messages=[{"role": "user", "content": 42}]), 400, "messages.0"),
    ("image-content", *CH(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     400, "messages.0"),
    ("tools", *CH(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
    ("json-mode", *CH(response_format={"type": "json_object"}), 400, "response_format"),
    ("nan-temperature", "/v1/completions", b'{"prompt": "hi", "temperature": NaN}', 400, "temperature"),
]


@pytest.mark.parametrize("name,path,body,status,param", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_request(server, name, path, body, status, param):
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if v is not None}
        r = httpx.post(server.base_url + path, json=body, timeout=30)
    else:
        r = httpx.post(server.base_url + path, content=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert isinstance(err["message"], str) and len(err["message"]) > 10
    assert err["param"] == param, err
    if name.endswith("too-long") or name == "max-tokens-past-context":
        assert err["code"] == "context_length_exceeded"
        assert str(MAX_MODEL_LEN) in err["message"]
    if name == "unknown-model":
        assert err["code"] == "model_not_found"


def test_still_serving_after_malformed_requests(server):
    r = httpx.post(server.base_url + "/v1/chat/completions", json={"model": MODEL, "messages": MSG, "max_tokens": 3},
                   timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1
    m = server.metrics()
    assert m['leanserve:request_failure_total{reason="engine"}'] == 0
    assert m["leanserve:engine_step_failures_total"] == 0


def test_unknown_endpoint_and_method(server):
    r = httpx.get(server.base_url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["message"]
    r = httpx.get(server.base_url + "/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["message"]


def test_overload_gets_429_with_retry_after(server):
    n = 20

    async def one(client: httpx.AsyncClient, i: int) -> httpx.Response:
        return await client.post("/v1/completions", json={"model": MODEL, "prompt": f"Request {i} says", "max_tokens": 4,
                                                          "ignore_eos": True, "temperature": 0})

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60,
                                     limits=httpx.Limits(max_connections=n)) as client:
            return await asyncio.gather(*(one(client, i) for i in range(n)))

    t0 = time.monotonic()
    responses = asyncio.run(burst())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    rejected = [r for r in responses if r.status_code == 429]
    accepted = [r for r in responses if r.status_code == 200]
    assert rejected and accepted, statuses
    assert len(accepted) >= MAX_NUM_SEQS
    for r in rejected:
        assert int(r.headers["Retry-After"]) >= 1
        err = r.json()["error"]
        assert err["type"] == "rate_limit_error" and err["code"] == "queue_full"
    for r in accepted:
        assert r.json()["usage"]["completion_tokens"] == 4
    assert time.monotonic() - t0 < TIMEOUT_S * 3
    assert server.metrics()['leanserve:request_failure_total{reason="rejected"}'] == len(rejected)


def test_request_timeout(server):
    # 2,000 tokens keep two sequences decoding well past the timeout on any machine this runs on (400 did
    # not once decode steps ran in one native call)
    body = {"model": MODEL, "prompt": "Count to a thousand:", "max_tokens": 2000, "ignore_eos": True}

    async def both() -> tuple[httpx.Response, list[str]]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
            async def streamed() -> list[str]:
                async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                    assert r.status_code == 200
                    return [line async for line in r.aiter_lines() if line]
            return await asyncio.gather(client.post("/v1/completions", json=body), streamed())

    t0 = time.monotonic()
    plain, lines = asyncio.run(both())
    elapsed = time.monotonic() - t0
    assert TIMEOUT_S - 0.5 < elapsed < TIMEOUT_S + 5
    assert plain.status_code == 504
    assert plain.json()["error"]["type"] == "timeout_error"
    assert lines[-1] == "data: [DONE]"
    err = json.loads(lines[-2][len("data: "):])["error"]
    assert err["type"] == "timeout_error" and "took longer" in err["message"]
    assert len(lines) > 3  # tokens were streamed before the timeout
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and server.metrics()["leanserve:kv_cache_usage_perc"] > 0:
        time.sleep(0.05)
    m = server.metrics()
    assert m["leanserve:kv_cache_usage_perc"] == 0 and m["leanserve:num_requests_running"] == 0
    assert m['leanserve:request_failure_total{reason="timeout"}'] == 2
