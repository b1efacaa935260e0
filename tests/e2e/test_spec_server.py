"""Speculative decoding through the real server and the official openai client: the same text as
the engine without speculation, OpenAI's accepted/rejected prediction counts in usage, and vLLM's
spec_decode counters in /metrics."""

from __future__ import annotations

import openai
import pytest

from leanserve.engine.engine import LLM
from leanserve.types import SamplingParams

PROMPT = ("Repeat the list exactly.\nList: apple, banana, cherry, date, elderberry, fig, grape, honeydew, kiwi, "
          "lemon, mango.\nRepeated list: apple, banana, cherry, date,")


@pytest.fixture(scope="module")
def server_args():
    # float32: a verify step's rows then round exactly as one-row decode steps do; in bfloat16 on a CPU
    # with AVX512-BF16 they need not (docs/speculative.md, "What it guarantees")
    return ["--speculative", "ngram", "--num-speculative-tokens", "5", "--dtype", "float32"]


def test_completion_equals_no_speculation_and_reports_predictions(server):
    client = openai.OpenAI(base_url=server.v1, api_key="unused")
    before = server.metrics()
    r = client.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=40, temperature=0.0)
    plain = LLM("smollm2-135m", dtype="float32")  # the server's settings, speculation off
    want = plain.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=40), use_tqdm=False)[0].outputs[0]
    assert r.choices[0].text == want.text
    details = r.usage.completion_tokens_details
    accepted, rejected = details.accepted_prediction_tokens, details.rejected_prediction_tokens
    # the list is in the prompt: drafts are accepted (how many depends on the drafts the server's own step
    # timings size, so a loaded machine may draft fewer: a CI run saw exactly 5)
    assert accepted > 0 and rejected >= 0
    after = server.metrics()
    assert after["leanserve:spec_decode_num_accepted_tokens_total"] - before.get("leanserve:spec_decode_num_accepted_tokens_total", 0) == accepted
    assert (after["leanserve:spec_decode_num_draft_tokens_total"] - before.get("leanserve:spec_decode_num_draft_tokens_total", 0)
            == accepted + rejected)
    per_pos = sum(v for k, v in after.items() if k.startswith("leanserve:spec_decode_num_accepted_tokens_per_pos"))
    assert per_pos == after["leanserve:spec_decode_num_accepted_tokens_total"]
    assert 0 < after["leanserve:spec_decode_acceptance_rate"] <= 1
    assert after["leanserve:spec_decode_verify_seconds_total"] > 0


def test_streamed_chat_with_speculation_is_whole(server):
    client = openai.OpenAI(base_url=server.v1, api_key="unused")
    msgs = [{"role": "user", "content": PROMPT}]
    full = client.chat.completions.create(model="smollm2-135m", messages=msgs, max_tokens=30, temperature=0.0)
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="smollm2-135m", messages=msgs, max_tokens=30, temperature=0.0, stream=True) if c.choices]
    assert "".join(parts) == full.choices[0].message.content
