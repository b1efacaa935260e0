"""Upstream APIs as models (leanserve/gateway/upstream.py): --upstream parsing, the forwarded request,
the bill, streaming, the error mapping and retries, all over httpx.MockTransport (no network, no sleep)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from leanserve.gateway.upstream import Upstream, UpstreamError, UpstreamSpec, parse_upstream
from leanserve.serve.errors import APIError

URL = "http://up.test/v1"


# ---- helpers -----------------------------------------------------------------------------------

class Chunks(httpx.AsyncByteStream):
    """A response body sent in pieces; ``fail`` is raised after them; records its aclose()."""

    def __init__(self, pieces: list[bytes], fail: Exception | None = None) -> None:
        self.pieces, self.fail, self.closed = pieces, fail, False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            yield piece
        if self.fail is not None:
            raise self.fail

    async def aclose(self) -> None:
        self.closed = True


def sse(*events: dict[str, Any], done: bool = True) -> list[bytes]:
    out = [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events]
    return out + [b"data: [DONE]\n\n"] if done else out


class Recorder:
    """A MockTransport handler answering from a list (the last answer repeats); keeps every request."""

    def __init__(self, *answers: httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers[min(len(self.requests), len(self.answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer(request) if callable(answer) and not isinstance(answer, httpx.Response) else answer

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.requests]


def make(rec: Recorder, sleeps: list[float] | None = None, environ: dict[str, str] | None = None,
         **spec: Any) -> Upstream:
    async def sleep(s: float) -> None:
        if sleeps is not None:
            sleeps.append(s)

    spec = {"name": "gpt", "url": URL, "model": "gpt-4o-mini", "input_usd_per_mtok": 0.15,
            "output_usd_per_mtok": 0.6, **spec}
    return Upstream(UpstreamSpec(**spec), environ=environ or {}, transport=httpx.MockTransport(rec), sleep=sleep)


def complete(up: Upstream, body: dict[str, Any] | None = None, endpoint: str = "chat") -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        try:
            return await up.complete(endpoint, body or {"model": "gpt", "messages": [{"role": "user", "content": "x"}]})
        finally:
            await up.aclose()
    return asyncio.run(go())


def stream(up: Upstream, body: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    async def go() -> list[dict[str, Any]]:
        try:
            return [c async for c in up.stream("chat", body or {"model": "gpt", "messages": [], "stream": True})]
        finally:
            await up.aclose()
    return asyncio.run(go())


def api_error(fn: Callable[[], Any]) -> APIError:
    with pytest.raises(APIError) as info:
        fn()
    return info.value


ANSWER = {"id": "c1", "object": "chat.completion", "model": "gpt-4o-mini-2024-07-18",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500}}


def ok(body: dict[str, Any] = ANSWER) -> httpx.Response:
    return httpx.Response(200, json=body)


CHUNKS = [{"id": "c1", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], "usage": None},
          {"id": "c1", "choices": [{"index": 0, "delta": {"content": "hel"}}], "usage": None},
          {"id": "c1", "choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}], "usage": None},
          {"id": "c1", "choices": [], "usage": {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500}}]


# ---- parse_upstream ----------------------------------------------------------------------------

def test_parse_minimal_defaults_and_trailing_slash() -> None:
    assert parse_upstream("local=http://127.0.0.1:8001/v1/") == UpstreamSpec(
        name="local", url="http://127.0.0.1:8001/v1", model="local")


def test_parse_every_option() -> None:
    spec = parse_upstream("gpt=https://api.openai.com/v1,model=gpt-4o-mini,key_env=OPENAI_API_KEY,"
                          "input=0.15,output=0.6,timeout=30,retries=0")
    assert spec == UpstreamSpec(name="gpt", url="https://api.openai.com/v1", model="gpt-4o-mini",
                                key_env="OPENAI_API_KEY", input_usd_per_mtok=0.15, output_usd_per_mtok=0.6,
                                timeout_s=30.0, retries=0)


@pytest.mark.parametrize("text, phrase", [
    ("gpt", "no '='"),
    ("=http://x/v1", "empty name"),
    ("gpt=ftp://x/v1", "must be http(s)://"),
    ("gpt=http:///v1", "must be http(s)://"),
    ("gpt=api.openai.com/v1", "must be http(s)://"),
    ("gpt=http://x/v1,colour=red", "unknown option 'colour'"),
    ("gpt=http://x/v1,model", "must be key=value"),
    ("gpt=http://x/v1,model=", "empty value for model"),
    ("gpt=http://x/v1,key_env=", "empty value for key_env"),
    ("gpt=http://x/v1,input=cheap", "input='cheap' is not a number"),
    ("gpt=http://x/v1,output=-1", "output='-1' must be a finite price >= 0"),
    ("gpt=http://x/v1,input=inf", "must be a finite price"),
    ("gpt=http://x/v1,input=nan", "must be a finite price"),
    ("gpt=http://x/v1,timeout=0", "timeout='0' must be a number of seconds > 0"),
    ("gpt=http://x/v1,timeout=-3", "timeout="),
    ("gpt=http://x/v1,timeout=soon", "timeout="),
    ("gpt=http://x/v1,retries=11", "retries='11' must be an integer in 0..10"),
    ("gpt=http://x/v1,retries=1.5", "retries="),
    ("gpt=http://x/v1,retries=-1", "retries="),
])
def test_parse_rejects(text: str, phrase: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_upstream(text)
    assert phrase in str(info.value)
    assert "\n" not in str(info.value)


# ---- the forwarded request and the bill --------------------------------------------------------

def test_missing_key_variable() -> None:
    for environ in ({}, {"OPENAI_API_KEY": ""}):
        with pytest.raises(UpstreamError, match="^upstream gpt: the environment variable OPENAI_API_KEY is not set$"):
            make(Recorder(ok()), environ=environ, key_env="OPENAI_API_KEY")


def test_complete_forwards_body_and_key() -> None:
    rec = Recorder(ok())
    up = make(rec, environ={"K": "sk-test"}, key_env="K")
    body = {"model": "gpt", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0.5}
    out = complete(up, body)
    (request,) = rec.requests
    assert (request.method, str(request.url)) == ("POST", URL + "/chat/completions")
    assert request.headers["authorization"] == "Bearer sk-test"
    assert rec.bodies == [{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": False,
                           "temperature": 0.5}]
    assert body["model"] == "gpt" and body["stream"] is True and "stream_options" in body  # the caller's is untouched
    assert out["model"] == "gpt-4o-mini-2024-07-18"  # as the upstream wrote it
    assert out["choices"] == ANSWER["choices"]


def test_completions_endpoint_and_no_key_no_header() -> None:
    rec = Recorder(ok())
    complete(make(rec), {"model": "gpt", "prompt": "x"}, endpoint="completions")
    assert str(rec.requests[0].url) == URL + "/completions"
    assert "authorization" not in rec.requests[0].headers


def test_complete_cost_at_list_price() -> None:
    usage = complete(make(Recorder(ok())))["usage"]
    assert usage == {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500, "cost": 0.00045,
                     "cost_details": {"input_usd": 0.00015, "output_usd": 0.0003, "price_source": "list_price",
                                      "hardware": "upstream:gpt", "input_usd_per_mtok": 0.15,
                                      "output_usd_per_mtok": 0.6}}


def test_complete_keeps_the_upstreams_cost_when_no_price_was_given() -> None:
    answer = {**ANSWER, "usage": {**ANSWER["usage"], "cost": 0.00123}}
    # a list price given is what the operator pays: it wins over the upstream's own figure
    assert complete(make(Recorder(ok(answer))))["usage"]["cost"] == 0.00045
    usage = complete(make(Recorder(ok(answer)), input_usd_per_mtok=0.0, output_usd_per_mtok=0.0))["usage"]
    assert usage["cost"] == 0.00123
    assert usage["cost_details"]["price_source"] == "upstream"
    assert usage["cost_details"]["input_usd"] is None and usage["cost_details"]["output_usd"] is None


def test_cost_without_usage_and_with_odd_counts() -> None:
    up = make(Recorder(ok()))
    assert up.cost(None) == {"cost": 0.0, "cost_details": {
        "input_usd": 0.0, "output_usd": 0.0, "price_source": "unknown", "hardware": "upstream:gpt",
        "input_usd_per_mtok": 0.15, "output_usd_per_mtok": 0.6}}
    # missing or non-integer counts count as 0; a boolean "cost" is not a number
    assert up.cost({"prompt_tokens": 2_000_000, "cost": True})["cost"] == 0.3
    assert up.cost({"completion_tokens": "5"})["cost"] == 0.0


def test_complete_without_usage_adds_none() -> None:
    answer = {k: v for k, v in ANSWER.items() if k != "usage"}
    assert "usage" not in complete(make(Recorder(ok(answer))))


# ---- streaming ---------------------------------------------------------------------------------

def test_stream_yields_chunks_and_costs_the_usage_chunk() -> None:
    body_stream = Chunks(sse(*CHUNKS))
    rec = Recorder(httpx.Response(200, stream=body_stream, headers={"content-type": "text/event-stream"}))
    chunks = stream(make(rec, environ={"K": "sk"}, key_env="K"),
                    {"model": "gpt", "messages": [], "stream": True, "stream_options": {"include_usage": False}})
    assert rec.bodies == [{"model": "gpt-4o-mini", "messages": [], "stream": True,
                           "stream_options": {"include_usage": True}}]
    assert rec.requests[0].headers["authorization"] == "Bearer sk"
    assert chunks[:3] == CHUNKS[:3]
    assert chunks[3]["usage"]["cost"] == 0.00045
    assert chunks[3]["usage"]["cost_details"]["price_source"] == "list_price"
    assert len(chunks) == 4 and body_stream.closed


def test_stream_parses_split_crlf_and_multiline_events() -> None:
    raw = b"".join(sse(*CHUNKS)).replace(b"\n", b"\r\n")
    pieces = [raw[i:i + 7] for i in range(0, len(raw), 7)] + [b": keep-alive comment\n\n"]
    multiline = b'data: {"id": "c2",\ndata: "choices": []}\n\n'
    chunks = stream(make(Recorder(httpx.Response(200, stream=Chunks([multiline] + pieces)))))
    assert [c["id"] for c in chunks] == ["c2", "c1", "c1", "c1", "c1"]


def test_stream_closed_when_consumer_stops_early() -> None:
    body_stream = Chunks(sse(*CHUNKS))
    up = make(Recorder(httpx.Response(200, stream=body_stream)))

    async def go() -> dict[str, Any]:
        it = up.stream("chat", {"messages": []})
        first = await it.__anext__()
        assert not body_stream.closed
        await it.aclose()
        await up.aclose()
        return first

    assert asyncio.run(go()) == CHUNKS[0]
    assert body_stream.closed


def test_stream_break_midway_yields_one_error_and_no_retry() -> None:
    rec = Recorder(lambda r: httpx.Response(200, stream=Chunks(sse(*CHUNKS[:2], done=False),
                                                               fail=httpx.ReadError("connection reset"))))
    sleeps: list[float] = []
    chunks = stream(make(rec, sleeps))
    assert chunks[:2] == CHUNKS[:2]
    assert chunks[2:] == [{"error": {"message": "upstream gpt: the stream broke off (ReadError: connection reset)",
                                     "type": "server_error", "param": None, "code": "upstream_error"}}]
    assert len(rec.requests) == 1 and sleeps == []


def test_stream_read_timeout_midway() -> None:
    rec = Recorder(httpx.Response(200, stream=Chunks(sse(CHUNKS[0], done=False), fail=httpx.ReadTimeout("slow"))))
    chunks = stream(make(rec))
    assert len(chunks) == 2
    assert chunks[1]["error"]["code"] == "upstream_timeout" and chunks[1]["error"]["type"] == "timeout_error"


def test_stream_error_event_midway() -> None:
    events = sse(CHUNKS[0], {"error": {"message": "engine step failed", "type": "server_error", "code": None}})
    chunks = stream(make(Recorder(httpx.Response(200, stream=Chunks(events)))))
    assert chunks == [CHUNKS[0], {"error": {"message": "upstream gpt: error in the stream: engine step failed",
                                            "type": "server_error", "param": None, "code": "upstream_error"}}]


def test_stream_errors_before_the_first_chunk_raise() -> None:
    cases = [
        (Chunks(sse({"error": {"message": "boom"}})), "error in the stream: boom"),
        (Chunks([b"data: {not json\n\n"]), "sent a malformed event"),
        (Chunks([]), "the stream ended before [DONE]"),
        (Chunks([], fail=httpx.ReadError("reset")), "the stream broke off"),
    ]
    for body_stream, phrase in cases:
        err = api_error(lambda: stream(make(Recorder(httpx.Response(200, stream=body_stream)))))
        assert (err.status, err.code, err.type) == (502, "upstream_error", "server_error")
        assert phrase in err.message and body_stream.closed


def test_stream_without_done_after_usage_is_complete() -> None:
    chunks = stream(make(Recorder(httpx.Response(200, stream=Chunks(sse(*CHUNKS, done=False))))))
    assert len(chunks) == 4 and "error" not in chunks[-1]


def test_stream_cut_short_after_chunks_yields_error() -> None:
    chunks = stream(make(Recorder(httpx.Response(200, stream=Chunks(sse(*CHUNKS[:2], done=False))))))
    assert chunks[-1]["error"]["message"] == "upstream gpt: the stream ended before [DONE]" and len(chunks) == 3


def test_stream_http_error_raises_before_any_chunk() -> None:
    rec = Recorder(httpx.Response(400, json={"error": {"message": "bad", "type": "invalid_request_error",
                                                       "param": "messages", "code": None}}))
    err = api_error(lambda: stream(make(rec)))
    assert (err.status, err.message, err.param) == (400, "upstream gpt: bad", "messages")


# ---- error mapping -----------------------------------------------------------------------------

def test_4xx_json_error_kept() -> None:
    rec = Recorder(httpx.Response(404, json={"error": {"message": "The model `x` does not exist",
                                                       "type": "invalid_request_error", "param": "model",
                                                       "code": "model_not_found"}}))
    err = api_error(lambda: complete(make(rec)))
    assert err.body() == {"error": {"message": "upstream gpt: The model `x` does not exist",
                                    "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}
    assert err.status == 404 and len(rec.requests) == 1


def test_4xx_text_error() -> None:
    rec = Recorder(httpx.Response(422, text="x" * 300))
    err = api_error(lambda: complete(make(rec)))
    assert err.status == 422 and err.message == "upstream gpt answered HTTP 422: " + "x" * 200


def test_5xx_after_retries_is_502() -> None:
    rec = Recorder(httpx.Response(503, text="overloaded"))
    sleeps: list[float] = []
    err = api_error(lambda: complete(make(rec, sleeps)))
    assert (err.status, err.code, err.type) == (502, "upstream_error", "server_error")
    assert err.message == "upstream gpt answered HTTP 503: overloaded"
    assert len(rec.requests) == 3 and sleeps == [0.25, 0.5]


def test_500_is_not_retried() -> None:
    rec = Recorder(httpx.Response(500, json={"error": {"message": "oops"}}))
    err = api_error(lambda: complete(make(rec)))
    assert (err.status, err.message) == (502, "upstream gpt answered HTTP 500: oops")
    assert len(rec.requests) == 1


def test_malformed_json_is_502() -> None:
    for answer in (httpx.Response(200, text="<html>"), httpx.Response(200, json=[1, 2])):
        err = api_error(lambda: complete(make(Recorder(answer))))
        assert (err.status, err.code) == (502, "upstream_error") and "malformed JSON" in err.message


def test_connect_error_after_retries_is_502_unreachable() -> None:
    rec = Recorder(httpx.ConnectError("[Errno 111] Connection refused"))
    sleeps: list[float] = []
    err = api_error(lambda: complete(make(rec, sleeps, retries=4)))
    assert (err.status, err.code) == (502, "upstream_unreachable")
    assert err.message == "upstream gpt is unreachable: ConnectError: [Errno 111] Connection refused"
    assert len(rec.requests) == 5 and sleeps == [0.25, 0.5, 1.0, 2.0]


def test_connect_timeout_retried_then_504() -> None:
    rec = Recorder(httpx.ConnectTimeout("timed out"))
    err = api_error(lambda: complete(make(rec, retries=1)))
    assert (err.status, err.code, err.type) == (504, "upstream_timeout", "timeout_error")
    assert len(rec.requests) == 2


def test_read_timeout_not_retried() -> None:
    rec = Recorder(httpx.ReadTimeout("timed out"))
    err = api_error(lambda: complete(make(rec)))
    assert (err.status, err.code) == (504, "upstream_timeout") and len(rec.requests) == 1


def test_read_timeout_in_body_is_504() -> None:
    rec = Recorder(httpx.Response(200, stream=Chunks([b'{"id"'], fail=httpx.ReadTimeout("slow"))))
    err = api_error(lambda: complete(make(rec)))
    assert (err.status, err.code) == (504, "upstream_timeout") and len(rec.requests) == 1


def test_429_passes_retry_after_after_retries() -> None:
    rec = Recorder(httpx.Response(429, headers={"Retry-After": "7"},
                                  json={"error": {"message": "Rate limit reached", "type": "requests",
                                                  "code": "rate_limit_exceeded"}}))
    sleeps: list[float] = []
    err = api_error(lambda: complete(make(rec, sleeps, retries=1)))
    assert (err.status, err.headers, err.code, err.type) == (429, {"Retry-After": "7"}, "rate_limit_exceeded",
                                                              "requests")
    assert err.message == "upstream gpt: Rate limit reached"
    assert len(rec.requests) == 2 and sleeps == [0.25]


def test_retries_then_success() -> None:
    rec = Recorder(httpx.Response(503), httpx.Response(503), ok())
    sleeps: list[float] = []
    assert complete(make(rec, sleeps))["usage"]["cost"] == 0.00045
    assert len(rec.requests) == 3 and sleeps == [0.25, 0.5]


def test_retries_zero_is_one_call() -> None:
    rec = Recorder(httpx.Response(502), ok())
    err = api_error(lambda: complete(make(rec, retries=0)))
    assert err.status == 502 and len(rec.requests) == 1


def test_stream_retried_before_it_starts() -> None:
    rec = Recorder(httpx.ConnectError("refused"), httpx.Response(504),
                   lambda r: httpx.Response(200, stream=Chunks(sse(*CHUNKS))))
    assert len(stream(make(rec))) == 4 and len(rec.requests) == 3


def test_unknown_endpoint() -> None:
    with pytest.raises(ValueError, match="endpoint"):
        complete(make(Recorder(ok())), endpoint="embeddings")


def test_one_client_per_loop() -> None:
    up = make(Recorder(ok()))

    async def two() -> bool:
        await up.complete("chat", {"messages": []})
        first = up._client
        await up.complete("chat", {"messages": []})
        return up._client is first

    assert asyncio.run(two())
    stale = up._client
    asyncio.run(up.complete("chat", {"messages": []}))  # a new loop gets a new client
    assert up._client is not stale
    asyncio.run(up.aclose())
    assert up._client is None


# ---- check() at start-up -----------------------------------------------------------------------

def check(up: Upstream) -> None:
    asyncio.run(up.check())


def test_check_ok_sends_the_key() -> None:
    rec = Recorder(httpx.Response(200, json={"object": "list", "data": []}))
    check(make(rec, environ={"K": "sk-1"}, key_env="K"))
    (request,) = rec.requests
    assert (request.method, str(request.url)) == ("GET", URL + "/models")
    assert request.headers["authorization"] == "Bearer sk-1"


def test_check_rejected_key() -> None:
    for status in (401, 403):
        with pytest.raises(UpstreamError, match=f"^upstream gpt at {URL} rejected the key: HTTP {status}"):
            check(make(Recorder(httpx.Response(status)), environ={"K": "sk-1"}, key_env="K"))


def test_check_unreachable() -> None:
    with pytest.raises(UpstreamError, match=f"^upstream gpt at {URL} is unreachable: ConnectError: refused$"):
        check(make(Recorder(httpx.ConnectError("refused"))))


def test_check_other_status() -> None:
    with pytest.raises(UpstreamError, match="answered HTTP 500 on GET /models: down"):
        check(make(Recorder(httpx.Response(500, text="down"))))
