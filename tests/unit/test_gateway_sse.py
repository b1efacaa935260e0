"""gateway/sse.py: SSE bytes -> chunk dicts, chunks -> the whole response, and back, in the exact
shapes leanserve's own streaming produces (chunks built with serve/responses.py's functions)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable

import pytest

from leanserve.gateway import sse as S
from leanserve.serve import responses as R
from leanserve.types import CompletionOutput, RequestOutput, TokenLogprob

RID, CREATED, MODEL = "chatcmpl-1", 1700000000, "m"
COST = {"cost": 1.5e-06, "cost_details": {"prefill_usd": 5e-07, "decode_usd": 1e-06}}


def parse(pieces: Iterable[bytes]) -> list[dict]:
    async def body() -> AsyncIterator[bytes]:
        for p in pieces:
            yield p

    async def go() -> list[dict]:
        return [e async for e in S.parse_events(body())]

    return asyncio.run(go())


def _out(texts: list[str], finishes: list[str], stop_reasons: list[str | int | None],
         logprobs: bool) -> RequestOutput:
    """A finished RequestOutput; token ids 1..4 are the tokens of _tt()."""
    outs = []
    for i, (text, finish, stop_reason) in enumerate(zip(texts, finishes, stop_reasons)):
        ids = [1, 2] if i == 0 else [4]
        lps = [TokenLogprob(t, -0.25 * (k + 1), [(t, -0.25 * (k + 1)), (3, -3.0)]) for k, t in enumerate(ids)]
        outs.append(CompletionOutput(i, text, ids, finish, lps if logprobs else None, stop_reason))
    return RequestOutput(RID, [5, 6, 7], outs, num_cached_tokens=1, finished=True)


def _tt() -> R.TokenText:
    pieces = {1: "Ġhi", 2: "Ã©", 3: "Ã", 4: "<0x0A>"}
    texts = {1: " hi", 2: "é", 3: "\ufffd", 4: "\n"}
    return R.TokenText(lambda ids: "".join(texts[i] for i in ids), pieces.get, byte_level=True)


# ---- parse_events ---------------------------------------------------------------------------------

def _chat_stream() -> tuple[list[dict], bytes]:
    """A streamed chat answer, n=2, with usage, as leanserve's _stream sends it."""
    chunks = [R.chat_chunk(RID, CREATED, MODEL, i, {"role": "assistant", "content": ""}, None, None, True)
              for i in range(2)]
    chunks += [R.chat_chunk(RID, CREATED, MODEL, 0, {"content": "Héllo\n"}, None, None, True),
               R.chat_chunk(RID, CREATED, MODEL, 1, {"content": "data: [DONE]"}, None, "stop", True, 7),
               R.chat_chunk(RID, CREATED, MODEL, 0, {}, None, "length", True)]
    chunks.append(R.usage_chunk(RID, CREATED, MODEL, "chat.completion.chunk", _out(["a", "b"], ["length", "stop"],
                                                                                     [None, 7], False), COST))
    return chunks, b"".join(R.sse(c) for c in chunks) + R.SSE_DONE


def test_parse_events_at_every_split():
    chunks, stream = _chat_stream()
    assert parse([stream]) == chunks
    for i in range(len(stream) + 1):
        assert parse([stream[:i], stream[i:]]) == chunks, i
    assert parse([stream[i:i + 1] for i in range(len(stream))]) == chunks


def test_parse_events_crlf_and_cr_line_ends():
    chunks, stream = _chat_stream()
    crlf = stream.replace(b"\n", b"\r\n")  # JSON escapes newlines: only the framing changes
    assert parse([crlf]) == chunks
    for i in range(len(crlf) + 1):  # a CR at the end of one piece and its LF at the start of the next
        assert parse([crlf[:i], crlf[i:]]) == chunks, i
    assert parse([stream.replace(b"\n", b"\r")]) == chunks


def test_parse_events_comments_fields_and_multiline_data():
    stream = (b"\xef\xbb\xbf: keep-alive\n\n"
              b"event: message\nid: 7\nretry: 100\ndata: {\"a\":\ndata:1}\n\n"
              b"data\n\n"  # a field with no colon: empty data, nothing to dispatch
              b": comment\ndata: {\"b\": \"x:y\"}\n\n"
              b"\n\n"
              b"data: [DONE]\n\n"
              b"data: {\"after\": 1}\n\n")
    assert parse([stream]) == [{"a": 1}, {"b": "x:y"}]
    assert parse([stream[:1], stream[1:2], stream[2:]]) == [{"a": 1}, {"b": "x:y"}]  # a BOM split in pieces


def test_parse_events_stops_at_done_without_reading_on():
    read = []

    async def body() -> AsyncIterator[bytes]:
        for p in (b'data: {"x": 1}\n\ndata: [DONE]\n\n', b'data: {"x": 2}\n\n'):
            read.append(p)
            yield p

    async def go() -> list[dict]:
        return [e async for e in S.parse_events(body())]

    assert asyncio.run(go()) == [{"x": 1}]
    assert len(read) == 1


def test_parse_events_unterminated_last_event_is_dropped():
    assert parse([b'data: {"x": 1}\n\ndata: {"x": 2}\n']) == [{"x": 1}]
    assert parse([b'data: {"x": 1}\n\ndata: {"x": 2}']) == [{"x": 1}]


def test_parse_events_error_event_is_yielded():
    err = R.error_event("boom", "server_error", "engine_error")
    assert parse([err + R.SSE_DONE]) == [{"error": {"message": "boom", "type": "server_error", "param": None,
                                                    "code": "engine_error"}}]


@pytest.mark.parametrize("payload", [b"{not json", b"[1, 2]", b"42"])
def test_parse_events_non_object_raises(payload):
    with pytest.raises(ValueError, match="SSE event is not a JSON object"):
        parse([b'data: {"ok": 1}\n\ndata: ' + payload + b"\n\n"])


def test_parse_events_is_linear_in_the_stream():
    # one 4 MB event in 1 KB pieces and 20,000 small events: a rescanning parser takes minutes here
    big = {"text": "x" * (4 << 20)}
    stream = S.encode(big) + b"".join(S.encode({"i": i}) for i in range(20000)) + S.DONE
    t0 = time.perf_counter()
    events = parse([stream[i:i + 1024] for i in range(0, len(stream), 1024)])
    assert time.perf_counter() - t0 < 5.0
    assert events[0] == big and events[1:] == [{"i": i} for i in range(20000)]


def test_encode_and_done_are_leanserves():
    assert S.encode({"a": "é"}) == R.sse({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode()
    assert S.DONE == R.SSE_DONE == b"data: [DONE]\n\n"


# ---- assemble ---------------------------------------------------------------------------------------

def _lp(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": []}


def test_assemble_chat():
    role = {"role": "assistant", "content": ""}
    usage = R.usage_chunk(RID, CREATED, MODEL, "chat.completion.chunk",
                          _out(["Hello", "Yo"], ["stop", "length"], ["\n", None], False), COST)
    chunks = [R.chat_chunk(RID, CREATED, MODEL, 0, role, None, None, True),
              R.chat_chunk(RID, CREATED, MODEL, 1, role, None, None, True),
              R.chat_chunk(RID, CREATED, MODEL, 1, {"content": "Yo"}, {"content": [_lp("Yo", -0.5)]}, None, True),
              R.chat_chunk(RID, CREATED, MODEL, 0, {"content": "Hel"}, {"content": [_lp("Hel", -0.1)]}, None, True),
              {"error": {"message": "ignored", "type": "server_error", "param": None, "code": None}},
              R.chat_chunk(RID, CREATED, MODEL, 0, {"content": "lo"}, {"content": [_lp("lo", -0.2)]}, "stop",
                           True, "\n"),
              R.chat_chunk(RID, CREATED, MODEL, 1, {}, {"content": []}, "length", True),
              usage]
    assert S.assemble("chat", chunks) == {
        "id": RID, "object": "chat.completion", "created": CREATED, "model": MODEL,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Hello"},
             "logprobs": {"content": [_lp("Hel", -0.1), _lp("lo", -0.2)]}, "finish_reason": "stop",
             "stop_reason": "\n"},
            {"index": 1, "message": {"role": "assistant", "content": "Yo"},
             "logprobs": {"content": [_lp("Yo", -0.5)]}, "finish_reason": "length", "stop_reason": None}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6,
                  "prompt_tokens_details": {"cached_tokens": 1}, "cost": 1.5e-06,
                  "cost_details": {"prefill_usd": 5e-07, "decode_usd": 1e-06}}}


def test_assemble_chat_without_usage_logprobs_or_content():
    # OpenAI's shapes: no stop_reason, a role chunk without content, no usage chunk
    chunks = [{"id": "x", "object": "chat.completion.chunk", "created": 5, "model": "gpt",
               "choices": [{"index": 0, "delta": {"role": "assistant", "content": None, "refusal": None},
                            "logprobs": None, "finish_reason": None}]},
              {"id": "x", "object": "chat.completion.chunk", "created": 6, "model": "gpt",
               "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]}]
    assert S.assemble("chat", chunks) == {
        "id": "x", "object": "chat.completion", "created": 5, "model": "gpt",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": None}, "logprobs": None,
                     "finish_reason": "stop"}],
        "usage": None}


def test_assemble_keeps_vllm_stop_reason_sent_on_every_chunk():
    chunk = {"id": "x", "object": "text_completion", "created": 1, "model": "v"}
    chunks = [{**chunk, "choices": [{"index": 0, "text": "a", "logprobs": None, "finish_reason": None,
                                     "stop_reason": None}]},
              {**chunk, "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "stop",
                                     "stop_reason": 2}]},
              {**chunk, "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": None,
                                     "stop_reason": None}]}]
    assert S.assemble("completions", chunks)["choices"] == [
        {"index": 0, "text": "a", "logprobs": None, "finish_reason": "stop", "stop_reason": 2}]


def test_assemble_completions():
    tt = _tt()
    lp_a, off = R.completion_logprobs([TokenLogprob(1, -0.1, [(1, -0.1)])], tt, 0)
    lp_b, _ = R.completion_logprobs([TokenLogprob(2, -0.2, [(3, -0.05), (2, -0.2)])], tt, off)
    usage = R.usage_chunk(RID, CREATED, MODEL, "text_completion",
                          _out([" hié", "\n"], ["stop", "length"], ["x", None], False))
    chunks = [R.completion_chunk(RID, CREATED, MODEL, 1, "\n", None, "length", True),
              R.completion_chunk(RID, CREATED, MODEL, 0, " hi", lp_a, None, True),
              R.completion_chunk(RID, CREATED, MODEL, 0, "é", lp_b, "stop", True, "x"),
              usage]
    assert S.assemble("completions", chunks) == {
        "id": RID, "object": "text_completion", "created": CREATED, "model": MODEL,
        "choices": [
            {"index": 0, "text": " hié",
             "logprobs": {"tokens": [" hi", "é"], "token_logprobs": [-0.1, -0.2],
                          "top_logprobs": [{" hi": -0.1}, {"\ufffd": -0.05, "é": -0.2}], "text_offset": [0, 3]},
             "finish_reason": "stop", "stop_reason": "x"},
            {"index": 1, "text": "\n", "logprobs": None, "finish_reason": "length", "stop_reason": None}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6,
                  "prompt_tokens_details": {"cached_tokens": 1}}}


def test_assemble_refuses_what_it_cannot_rebuild():
    with pytest.raises(ValueError, match="endpoint must be one of chat, completions"):
        S.assemble("embeddings", [])
    with pytest.raises(ValueError, match="no chunks to assemble"):
        S.assemble("chat", [{"error": {"message": "x"}}])
    tool = R.chat_chunk(RID, CREATED, MODEL, 0, {"tool_calls": [{"index": 0}]}, None, None, False)
    with pytest.raises(ValueError, match="cannot assemble the delta field 'tool_calls'"):
        S.assemble("chat", [tool])


# ---- replay and the round trip ------------------------------------------------------------------------

def test_replay_chat_shapes():
    r = R.chat_response(RID, CREATED, MODEL, _out(["Hi"], ["stop"], [None], False), None, COST)
    usage = r["usage"]
    assert S.replay("chat", r, True) == [
        {"id": RID, "object": "chat.completion.chunk", "created": CREATED, "model": MODEL,
         "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}], "usage": None},
        {"id": RID, "object": "chat.completion.chunk", "created": CREATED, "model": MODEL,
         "choices": [{"index": 0, "delta": {"content": "Hi"}, "logprobs": None, "finish_reason": "stop",
                      "stop_reason": None}], "usage": None},
        {"id": RID, "object": "chat.completion.chunk", "created": CREATED, "model": MODEL, "choices": [],
         "usage": usage}]
    assert S.replay("chat", r, False) == [
        R.chat_chunk(RID, CREATED, MODEL, 0, {"role": "assistant", "content": ""}, None, None, False),
        R.chat_chunk(RID, CREATED, MODEL, 0, {"content": "Hi"}, None, "stop", False, None)]


def test_replay_completions_shapes():
    r = R.completion_response(RID, CREATED, MODEL, _out(["a", ""], ["stop", "length"], [3, None], False), None)
    assert S.replay("completions", r, False) == [
        {"id": RID, "object": "text_completion", "created": CREATED, "model": MODEL,
         "choices": [{"index": 0, "text": "a", "logprobs": None, "finish_reason": "stop", "stop_reason": 3}]},
        {"id": RID, "object": "text_completion", "created": CREATED, "model": MODEL,
         "choices": [{"index": 1, "text": "", "logprobs": None, "finish_reason": "length", "stop_reason": None}]}]
    assert S.replay("completions", r, True)[-1] == R.usage_chunk(RID, CREATED, MODEL, "text_completion",
                                                                   _out(["a", ""], ["stop", "length"], [3, None],
                                                                        False))


def test_replay_keeps_an_upstream_answer_as_it_is():
    r = {"id": "x", "object": "chat.completion", "created": 5, "model": "gpt",
         "choices": [{"index": 0, "message": {"role": "assistant", "content": None, "refusal": "no"},
                      "logprobs": None, "finish_reason": "stop"}],
         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    chunks = S.replay("chat", r, True)
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant"}, {"refusal": "no"}]
    assert "stop_reason" not in chunks[1]["choices"][0]
    assert S.assemble("chat", chunks) == {**r, "choices": [{**r["choices"][0],
                                                            "message": {"role": "assistant", "content": None,
                                                                        "refusal": "no"}}]}


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("logprobs", [False, True])
def test_round_trip(endpoint, n, logprobs):
    out = _out([" hié", ""][:n], ["stop", "length"][:n], ["\n", None][:n], logprobs)
    if endpoint == "chat":
        r = R.chat_response(RID, CREATED, MODEL, out, _tt(), COST)
    else:
        r = R.completion_response(RID, CREATED, MODEL, out, _tt(), COST)
    assert (r["choices"][0]["logprobs"] is not None) == logprobs
    chunks = S.replay(endpoint, r, True)
    assert S.assemble(endpoint, chunks) == r
    # and through the wire: encoded, parsed back, assembled
    wire = b"".join(S.encode(c) for c in chunks) + S.DONE
    assert S.assemble(endpoint, parse([wire])) == r
    # without include_usage no chunk has a usage key, and the rest is the same
    plain = S.replay(endpoint, r, False)
    assert all("usage" not in c for c in plain)
    assert S.assemble(endpoint, plain) == {**r, "usage": None}
