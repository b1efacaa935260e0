"""The real server on smollm2-135m, driven by the official `openai` client.

One server for the module (API key required, max_model_len 1024). Generations are short: the
machine this runs on has 2 cores.
"""

from __future__ import annotations

import math
import time

import httpx
import openai
import pytest

pytestmark = pytest.mark.e2e

API_KEY = "test-key-123"
MODEL = "smollm2-135m"
MAX_MODEL_LEN = 1024
PROMPT = "The three primary colors are"
CHAT = [{"role": "user", "content": "Name three fruits."}]


@pytest.fixture(scope="module")
def server_args() -> list[str]:
    # float32: the prompt-logprob test compares a whole prompt's scores with its tail's, computed in
    # steps of other sizes; in bfloat16 the kernel reading the blocks (few rows) and the dequantized
    # tiles (many rows, weights rounded to bfloat16) differ by up to ~1e-2 (docs/quantization.md)
    return ["--max-model-len", str(MAX_MODEL_LEN), "--dtype", "float32"]


@pytest.fixture(scope="module")
def server_api_key() -> str:
    return API_KEY


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0, timeout=120)


def test_models_health_version(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(server.base_url + "/health").json() == {"status": "ok"}  # open without a key
    assert httpx.get(server.base_url + "/version").json()["version"]


def test_auth_required(server):
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": API_KEY}):
        r = httpx.post(server.v1 + "/completions", json={"prompt": "hi", "max_tokens": 1}, headers=headers)
        assert r.status_code == 401, (headers, r.text)
        err = r.json()["error"]
        assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key" and err["message"]
    assert httpx.get(server.base_url + "/metrics").status_code == 401
    assert httpx.get(server.v1 + "/models").status_code == 401
    bad = openai.OpenAI(base_url=server.v1, api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_completion_stream_equals_non_stream(client):
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    choice = full.choices[0]
    assert choice.text and choice.finish_reason == "length"
    assert full.usage.completion_tokens == 12 and full.usage.total_tokens == full.usage.prompt_tokens + 12

    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 12
    assert last.usage.prompt_tokens == full.usage.prompt_tokens

    # the same prompt as token ids gives the same greedy text
    from leanserve.model.loader import load_config_and_tokenizer, resolve

    ids = load_config_and_tokenizer(resolve(MODEL))[1].encode(PROMPT)
    raw = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    assert raw.usage.prompt_tokens == len(ids) == full.usage.prompt_tokens
    assert raw.choices[0].text == choice.text


def test_chat_stream_equals_non_stream(client):
    full = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0)
    msg = full.choices[0].message
    assert msg.role == "assistant" and msg.content
    assert full.choices[0].finish_reason in ("stop", "length")

    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_n_choices(client):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=1.0, n=2,
                                    extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert all(c.finish_reason == "length" for c in out.choices)
    assert out.usage.completion_tokens == 12

    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, temperature=1.0, n=2,
                                                 stream=True, extra_body={"ignore_eos": True}))
    texts = {0: "", 1: ""}
    finishes = {}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finishes[ch.index] = ch.finish_reason
    assert finishes == {0: "length", 1: "length"}
    assert all(texts.values())


def test_stop_strings(client):
    base = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    words = base.split()
    assert len(words) >= 3, base
    stop = words[2]  # a word in the middle of the greedy continuation
    cut = base[:base.index(stop)]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop, "@@@"])
    assert out.choices[0].text == cut
    assert out.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=stop,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_seed_reproducible(client):
    def sample(seed: int) -> str:
        return client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0,
                                         seed=seed, extra_body={"ignore_eos": True}).choices[0].text

    a, b = sample(1234), sample(1234)
    assert a == b
    others = {sample(s) for s in (1, 2)}
    assert len(others | {a}) >= 2, "different seeds gave the same text"
    # n > 1 with a seed: the choices differ from each other (choice i uses seed + i), reproducibly
    twice = [client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0, n=2,
                                       seed=7, extra_body={"ignore_eos": True}) for _ in range(2)]
    texts = [[c.text for c in sorted(r.choices, key=lambda c: c.index)] for r in twice]
    assert texts[0] == texts[1] and texts[0][0] != texts[0][1]


def test_completion_logprobs(client):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    n = out.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert "".join(lp.tokens).startswith(out.choices[0].text[:5])
    assert lp.text_offset == sorted(lp.text_offset)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0.0 and math.isfinite(chosen)
        values = list(top.values())
        assert 1 <= len(values) <= 3
        assert values == sorted(values, reverse=True)
        assert sum(math.exp(v) for v in values) <= 1.0 + 1e-4
        assert chosen == pytest.approx(values[0], abs=1e-4)  # greedy picks the most likely token


def test_chat_logprobs(client):
    out = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, temperature=0, logprobs=True,
                                         top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0.0 and entry.bytes is not None
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 2 and tops == sorted(tops, reverse=True)
        assert entry.logprob == pytest.approx(tops[0], abs=1e-4)
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace").startswith(
        out.choices[0].message.content[:3])
    # logprobs without top_logprobs: the chosen tokens only
    plain = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, temperature=0, logprobs=True)
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content)
    none = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, temperature=0)
    assert none.choices[0].logprobs is None


def test_cached_tokens_on_repeated_prompt(client):
    long_prompt = "Facts about the number %d: " % time.time_ns() + " ".join(f"item {i}," for i in range(120))
    first = client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=2, temperature=0)
    second = client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens > 200
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens - 16 - 1  # all full blocks but the last partial one
    assert first.choices[0].text == second.choices[0].text


def test_default_max_tokens_fills_the_context(client):
    prompt = " ".join(["word"] * (MAX_MODEL_LEN - 20))
    out = client.completions.create(model=MODEL, prompt=prompt, temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens + out.usage.completion_tokens == MAX_MODEL_LEN


def _wait_until_idle(server, baseline: float) -> dict[str, float]:
    deadline = time.monotonic() + 3.0
    after = server.metrics()
    while time.monotonic() < deadline and (after["leanserve:kv_cache_usage_perc"] != baseline
                                           or after["leanserve:num_requests_running"] > 0):
        time.sleep(0.05)
        after = server.metrics()
    return after


# seconds of generation (each test aborts it early): ~4 s at 5.5 ms a token
LONG_BODY = {"model": MODEL, "prompt": "Tell me a long story. " * 40, "max_tokens": 700, "ignore_eos": True}


def test_disconnect_mid_stream_frees_kv_blocks(server):
    before = server.metrics()
    assert before["leanserve:num_requests_running"] == 0
    with httpx.Client(timeout=60, headers=server.headers) as c:
        with c.stream("POST", server.v1 + "/completions", json={**LONG_BODY, "stream": True}) as r:
            assert r.status_code == 200
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data: {")
                if seen >= 3:
                    during = server.metrics()
                    break
    # leaving the blocks closed the connection, 3 tokens into 700
    assert during["leanserve:num_requests_running"] == 1
    assert during["leanserve:kv_cache_usage_perc"] > before["leanserve:kv_cache_usage_perc"]
    _assert_aborted_and_freed(server, before)


def _assert_aborted_and_freed(server, before):
    """KV usage back to where it was, nothing running, and exactly one more abort counted."""
    after = _wait_until_idle(server, before["leanserve:kv_cache_usage_perc"])
    assert after["leanserve:kv_cache_usage_perc"] == before["leanserve:kv_cache_usage_perc"]
    assert after["leanserve:num_requests_running"] == 0 and after["leanserve:num_requests_in_flight"] == 0
    aborts = 'leanserve:request_success_total{finished_reason="abort"}'
    assert after[aborts] == before[aborts] + 1


def test_disconnect_while_waiting_for_a_whole_response_frees_kv_blocks(server):
    before = server.metrics()
    with httpx.Client(timeout=1.5, headers=server.headers) as c:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            c.post(server.v1 + "/completions", json=LONG_BODY)
    _assert_aborted_and_freed(server, before)


def test_metrics_exposed(server):
    m = server.metrics()
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_queries_total",
                 "prefix_cache_hits_total", "prompt_tokens_total", "generation_tokens_total",
                 "time_to_first_token_seconds_count", "time_per_output_token_seconds_count",
                 "e2e_request_latency_seconds_count", "request_queue_time_seconds_count"):
        assert "leanserve:" + name in m, name
    # the module's earlier tests ran requests: the counters moved
    assert m["leanserve:generation_tokens_total"] > 0 and m["leanserve:prompt_tokens_total"] > 0
    assert m["leanserve:prefix_cache_hits_total"] > 0  # test_cached_tokens_on_repeated_prompt
    assert m['leanserve:request_success_total{finished_reason="length"}'] > 0
    assert m["leanserve:e2e_request_latency_seconds_count"] > 0


def test_echo_and_prompt_logprobs_score_the_prompt(server, client):
    """The evaluation path: prompt log-probabilities through OpenAI's echo + logprobs and vLLM's
    prompt_logprobs agree with each other, with /tokenize's ids, and with the scored-suffix form."""
    h = {"Authorization": f"Bearer {API_KEY}"}
    text = "The capital of France is Paris, and the capital of Italy is Rome."
    tok = httpx.post(server.base_url + "/tokenize", json={"prompt": text}, headers=h, timeout=30).json()
    ids = tok["tokens"]
    assert tok["count"] == len(ids) > 10 and tok["max_model_len"] == MAX_MODEL_LEN
    echo = client.completions.create(model=MODEL, prompt=text, max_tokens=0, echo=True, logprobs=1, temperature=0)
    c = echo.choices[0]
    assert c.text == text and echo.usage.completion_tokens == 0 and echo.usage.prompt_tokens == len(ids)
    lps = c.logprobs.token_logprobs
    assert len(lps) == len(ids) and lps[0] is None and all(x is not None and x <= 0 for x in lps[1:])
    assert "".join(c.logprobs.tokens) == text and c.logprobs.text_offset[0] == 0
    # vLLM's form, on token ids, with the generated token kept this time
    r = httpx.post(server.v1 + "/completions", headers=h, timeout=60, json={
        "model": MODEL, "prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 2}).json()
    plp = r["choices"][0]["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids) and r["usage"]["completion_tokens"] == 1
    for i in range(1, len(ids)):
        own = plp[i][str(ids[i])]
        assert abs(own["logprob"] - lps[i]) < 1e-4 and own["rank"] >= 1 and len(plp[i]) in (2, 3)
    # only the tail scored: the head may come from the prefix cache, and gets null
    start = len(ids) - 5
    tail = httpx.post(server.v1 + "/completions", headers=h, timeout=60, json={
        "model": MODEL, "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0,
        "prompt_logprobs_start": start}).json()["choices"][0]["logprobs"]["token_logprobs"]
    assert tail[:start] == [None] * start
    assert tail[start:] == pytest.approx(lps[start:], abs=1e-4)
    # echo cannot stream; max_tokens 0 needs echo
    for body in ({"echo": True, "stream": True}, {"max_tokens": 0}):
        bad = httpx.post(server.v1 + "/completions", headers=h, json={"model": MODEL, "prompt": text, **body})
        assert bad.status_code == 400, bad.text
