"""Request validation, error formatting, SSE framing, streaming deltas, logprob formats and API-key
files: everything of the server that needs no model."""

from __future__ import annotations

import json
import math

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from leanserve.serve import responses as R
from leanserve.serve.auth import APIKeyAuth, key_digest, read_keys_file
from leanserve.serve.errors import format_validation_error, from_value_error
from leanserve.serve.protocol import ChatCompletionRequest, CompletionRequest
from leanserve.types import CompletionOutput, RequestOutput, SamplingParams, TokenLogprob

MSG = [{"role": "user", "content": "hi"}]


def _error(model, body: dict):
    """The OpenAI error a body would get, as the server formats it."""
    with pytest.raises(ValidationError) as e:
        model.model_validate(body)
    errors = [{**err, "loc": ("body", *err["loc"])} for err in e.value.errors()]
    return format_validation_error(RequestValidationError(errors))


# ---- protocol ----------------------------------------------------------------------------------

def test_completion_prompt_forms():
    assert CompletionRequest(prompt="hi").prompt_input == "hi"
    assert CompletionRequest(prompt=["hi"]).prompt_input == "hi"
    assert CompletionRequest(prompt=[1, 2, 3]).prompt_input == [1, 2, 3]
    assert CompletionRequest(prompt=[[1, 2]]).prompt_input == [1, 2]


@pytest.mark.parametrize("prompt,fragment", [
    (["a", "b"], "one prompt per request"), ([[1], [2]], "one prompt per request"), ([], "must be a string"),
    (3, "must be a string"), ([1, -2], ">= 0"), ([[]], "must be a string"), ([True, 1], "must be a string"),
    ({"text": "hi"}, "must be a string"),
])
def test_bad_prompts(prompt, fragment):
    err = _error(CompletionRequest, {"prompt": prompt})
    assert err.status == 400 and err.param == "prompt" and fragment in err.message


@pytest.mark.parametrize("field,value,fragment", [
    ("n", 0, "greater than or equal to 1"), ("n", 17, "less than or equal to 16"),
    ("temperature", -0.1, "greater than or equal to 0"), ("temperature", 2.5, "less than or equal to 2"),
    ("top_p", 0, "greater than 0"), ("top_p", 1.01, "less than or equal to 1"),
    ("presence_penalty", 2.1, "less than or equal to 2"), ("frequency_penalty", -2.1, "greater than or equal to -2"),
    ("max_tokens", -1, "greater than or equal to 0"), ("logprobs", 21, "less than or equal to 20"),
    ("logprobs", -1, "greater than or equal to 0"), ("seed", 2**63, "less than or equal to"),
    ("stop", ["a"] * 5, "at most 4 stop sequences"), ("stop", "", "must not be empty"), ("stop", [""], "must not be empty"),
    ("stop", 7, "string or a list of strings"), ("logit_bias", {"x": 1}, "token ids"),
    ("logit_bias", {"5": 101}, "[-100, 100]"), ("logit_bias", [1], "object mapping"),
    ("top_k", -2, "greater than or equal to -1"), ("min_p", 1.5, "less than or equal to 1"),
    ("repetition_penalty", 0.001, "greater than or equal to 0.01"), ("min_tokens", -1, "greater than or equal to 0"),
    ("priority", "now", "'interactive' or 'batch'"), ("n", "two", "valid integer"), ("n", 1.5, "valid integer"),
    ("temperature", float("nan"), "finite number"), ("stream", "maybe", "valid boolean"),
    ("stop_token_ids", [-1], ">= 0"), ("max_tokens", 0, "0 only with echo"), ("suffix", "x", "not supported"),
    ("best_of", 3, "best_of == n"), ("stream_options", {"include_usage": True}, "only allowed when stream is true"),
])
def test_completion_field_errors_name_the_field(field, value, fragment):
    err = _error(CompletionRequest, {"prompt": "hi", field: value})
    assert err.status == 400 and err.type == "invalid_request_error"
    assert err.param == field, err.message
    assert fragment in err.message
    assert err.message.startswith(f"{field}: ")


@pytest.mark.parametrize("messages,fragment", [
    ([], "at least 1 item"), ("hi", "valid list"), ([{"role": "robot", "content": "x"}], "unknown role 'robot'"),
    ([{"role": "tool", "content": "x"}], "no tool calling"), ([{"role": "user"}], "content is required"),
    ([{"content": "x"}], "role is required"), ([{"role": "user", "content": 3}], "string or a list of text parts"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "only text content parts"), (["hi"], "must be an object"),
    ([{"role": "assistant", "content": None, "tool_calls": [{}]}], "tool calls are not supported"),
])
def test_chat_message_errors(messages, fragment):
    err = _error(ChatCompletionRequest, {"messages": messages})
    assert err.status == 400 and err.param.startswith("messages") and fragment in err.message, err.message


def test_chat_options():
    req = ChatCompletionRequest(messages=[{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                                            {"type": "text", "text": "b"}]}, *MSG],
                                max_tokens=5, max_completion_tokens=7, logprobs=True, top_logprobs=3)
    assert [m.to_template() for m in req.messages] == [{"role": "system", "content": "a\nb"}, MSG[0]]
    assert req.max_output_tokens == 7 and req.num_logprobs == 3
    assert ChatCompletionRequest(messages=MSG, logprobs=True).num_logprobs == 0
    assert ChatCompletionRequest(messages=MSG).num_logprobs is None
    assert ChatCompletionRequest(messages=MSG, unknown_option=1, store=True).n == 1  # unknown fields are ignored
    for body, param in (({"top_logprobs": 2}, "top_logprobs"), ({"tools": [{"type": "function"}]}, "tools"),
                        ({"response_format": {"type": "json_schema"}}, "response_format"),
                        ({"tool_choice": "required"}, "tool_choice")):
        assert _error(ChatCompletionRequest, {"messages": MSG, **body}).param == param


def test_missing_and_non_object_bodies():
    err = _error(ChatCompletionRequest, {})
    assert err.param == "messages" and err.code == "missing_required_parameter"
    with pytest.raises(ValidationError) as e:
        CompletionRequest.model_validate([1, 2])
    err = format_validation_error(RequestValidationError([{**x, "loc": ("body", *x["loc"])} for x in e.value.errors()]))
    assert err.param is None and "JSON object" in err.message


def test_sampling_params_errors_map_to_their_field():
    with pytest.raises(ValueError) as e:
        SamplingParams(min_tokens=9, max_tokens=3)
    err = from_value_error(e.value)
    assert err.status == 400 and err.param == "min_tokens" and "max_tokens" in err.message
    assert from_value_error(ValueError("something odd")).param is None


# ---- SSE and deltas ------------------------------------------------------------------------

def test_sse_framing_is_one_json_line_per_event_and_utf8():
    event = R.sse({"text": "line one\nline two \u00e9\u4f60 \U0001f600"})
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    payload = event[len(b"data: "):-2]
    assert b"\n" not in payload
    assert json.loads(payload.decode("utf-8"))["text"] == "line one\nline two \u00e9\u4f60 \U0001f600"
    assert R.SSE_DONE == b"data: [DONE]\n\n"
    err = R.error_event("boom", "server_error", "engine_error")
    assert json.loads(err[6:]) == {"error": {"message": "boom", "type": "server_error", "param": None,
                                             "code": "engine_error"}}


def test_choice_cursor_turns_cumulative_outputs_into_deltas():
    cur = R.ChoiceCursor()
    lp = [TokenLogprob(i, -0.5, []) for i in range(4)]
    steps = [CompletionOutput(0, "He", [1], None, lp[:1]), CompletionOutput(0, "He", [1, 2], None, lp[:2]),
             CompletionOutput(0, "Hello", [1, 2, 3], None, lp[:3]),
             CompletionOutput(0, "Hello!", [1, 2, 3, 4], "stop", lp[:4])]
    got = [cur.advance(c) for c in steps]
    assert [g[0] for g in got] == ["He", "", "llo", "!"]
    assert [len(g[1]) for g in got] == [1, 1, 1, 1]
    assert [g[2] for g in got] == [None, None, None, "stop"]
    assert cur.advance(steps[-1]) == ("", [], None)  # the finish reason is sent once


def test_chunks_and_usage():
    out = RequestOutput("r", [1, 2, 3], [CompletionOutput(0, "ab", [5, 6], "length"),
                                         CompletionOutput(1, "c", [7], "stop", stop_reason="\n")], num_cached_tokens=2,
                        finished=True)
    assert R.usage(out) == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6,
                            "prompt_tokens_details": {"cached_tokens": 2}}
    chunk = R.chat_chunk("r", 1, "m", 1, {"content": "c"}, None, "stop", True, "\n")
    assert chunk["object"] == "chat.completion.chunk" and chunk["usage"] is None
    assert chunk["choices"] == [{"index": 1, "delta": {"content": "c"}, "logprobs": None, "finish_reason": "stop",
                                 "stop_reason": "\n"}]
    assert "usage" not in R.completion_chunk("r", 1, "m", 0, "x", None, None, False)
    last = R.usage_chunk("r", 1, "m", "text_completion", out)
    assert last["choices"] == [] and last["usage"]["total_tokens"] == 6
    resp = R.chat_response("r", 1, "m", out, None)
    assert [c["message"]["content"] for c in resp["choices"]] == ["ab", "c"]
    assert R.engine_failure(out) is None
    assert "abort" in R.engine_failure(RequestOutput("r", [1], [CompletionOutput(0, "", [], "abort")], finished=True))


# ---- logprobs ------------------------------------------------------------------------------

def _tt() -> R.TokenText:
    # byte-level pieces: "Ġhi" is " hi"; "Ã©" is the two bytes of "é"; a lone "Ã" is half a character
    pieces = {1: "Ġhi", 2: "Ã©", 3: "Ã", 4: "<0x0A>"}
    texts = {1: " hi", 2: "é", 3: "\ufffd", 4: "\n"}
    return R.TokenText(lambda ids: "".join(texts[i] for i in ids), pieces.get, byte_level=True)


def test_token_bytes_are_exact_for_partial_characters():
    tt = _tt()
    assert tt.get(1) == (" hi", [32, 104, 105])
    assert tt.get(2) == ("é", [0xC3, 0xA9])
    assert tt.get(3) == ("\ufffd", [0xC3])
    assert tt.get(4) == ("\n", [10])


def test_logprob_formats():
    tt = _tt()
    lps = [TokenLogprob(1, -0.1, [(1, -0.1), (2, -2.5)]), TokenLogprob(2, -0.7, [(3, -0.6), (2, -0.7)])]
    legacy, end = R.completion_logprobs(lps, tt, offset=5)
    assert legacy == {"tokens": [" hi", "é"], "token_logprobs": [-0.1, -0.7],
                      "top_logprobs": [{" hi": -0.1, "é": -2.5}, {"\ufffd": -0.6, "é": -0.7}], "text_offset": [5, 8]}
    assert end == 9
    chat = R.chat_logprobs(lps, tt)["content"]
    assert chat[0] == {"token": " hi", "logprob": -0.1, "bytes": [32, 104, 105],
                       "top_logprobs": [{"token": " hi", "logprob": -0.1, "bytes": [32, 104, 105]},
                                        {"token": "é", "logprob": -2.5, "bytes": [0xC3, 0xA9]}]}
    assert all(math.isfinite(e["logprob"]) for e in chat)


# ---- API keys ------------------------------------------------------------------------------

def test_api_keys_file(tmp_path):
    f = tmp_path / "keys"
    f.write_text(f"# team A\n{key_digest('alpha')}  # alice\n\n{key_digest('beta').upper()}\n")
    digests = read_keys_file(f)
    auth = APIKeyAuth({d.lower() for d in digests})
    assert auth.check("Bearer alpha") and auth.check("bearer beta") and auth.check("Bearer  alpha ")
    assert not auth.check("Bearer gamma") and not auth.check(None) and not auth.check("alpha")
    assert not auth.check("Bearer ") and not auth.check("Basic alpha")
    assert APIKeyAuth(set()).check(None)  # no keys configured: open
    f.write_text("alpha\n")
    with pytest.raises(ValueError, match="keys:1: expected the sha256 hex digest"):
        read_keys_file(f)
    with pytest.raises(ValueError, match="cannot read"):
        read_keys_file(tmp_path / "missing")
