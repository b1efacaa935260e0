"""/v1/embeddings and the response cache's semantic stage on the real server, through the openai client."""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server_args(tmp_path_factory) -> list[str]:
    tmp = tmp_path_factory.mktemp("semantic")
    return ["--response-cache", "--cache-path", str(tmp / "cache.sqlite"), "--semantic-cache", "smollm2-135m"]


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60)


def test_embeddings_through_the_openai_client(server):
    c = client(server)
    texts = ["Who wrote Hamlet?", "who wrote hamlet", "What is the boiling point of water?"]
    r = c.embeddings.create(model="smollm2-135m", input=texts)  # the client asks for base64
    v = np.array([d.embedding for d in r.data])
    assert v.shape == (3, 576) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert [d.index for d in r.data] == [0, 1, 2] and r.model == "smollm2-135m"
    sims = v @ v.T
    assert sims[0, 1] > sims[0, 2]  # the same question in other case is nearer than another question
    usage = r.usage.model_dump()
    assert usage["prompt_tokens"] == usage["total_tokens"] > 0 and usage["cost"] > 0
    one = c.embeddings.create(model="smollm2-135m", input=texts[2], encoding_format="float")
    assert len(one.data) == 1 and one.data[0].embedding == pytest.approx(list(v[2]), abs=0.02)
    ids = c.embeddings.create(model="smollm2-135m", input=[[28, 3287, 2817], [28, 3287]], encoding_format="float")
    assert len(ids.data) == 2 and ids.usage.prompt_tokens == 5


@pytest.mark.parametrize("body, message", [
    ({"input": []}, "at least one input"),
    ({"input": ""}, "input 0 is empty"),
    ({"input": "x", "dimensions": 3}, "cannot be shortened"),
    ({"input": [99999999]}, "out of range"),
    ({"input": "x", "model": "nope"}, "does not exist"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
])
def test_bad_embedding_requests_are_400s(server, body, message):
    r = httpx.post(server.v1 + "/embeddings", json={"model": "smollm2-135m", **body}, timeout=30)
    assert r.status_code in (400, 404) and message in r.json()["error"]["message"], r.text


def test_the_semantic_stage_hits_a_trivially_varied_repeat_and_not_another_question(server):
    c = client(server)

    def ask(prompt: str):
        raw = c.completions.with_raw_response.create(model="smollm2-135m", prompt=prompt, max_tokens=6,
                                                     temperature=0)
        return raw.headers["x-leanserve-cache"], raw.http_response.json()

    verdict, first = ask("Question: Which planet is known as the Red Planet?\nAnswer:")
    assert verdict == "miss" and first["usage"]["cost_details"]["lookup_usd"] > 0
    verdict, again = ask("question:   which planet is known as the red planet\nanswer")
    assert verdict == "semantic-hit" and again["choices"][0]["text"] == first["choices"][0]["text"]
    d = again["usage"]["cost_details"]
    assert d["similarity"] >= 0.99 and again["usage"]["cost"] == d["lookup_usd"] > 0  # the hit pays its lookup
    assert d["saved"]["response_cache"] == pytest.approx(first["usage"]["cost"] - first["usage"]["cost_details"][
        "lookup_usd"])
    verdict, other = ask("Question: Which planet is known as the Morning Star?\nAnswer:")
    assert verdict == "miss"
    stats = httpx.get(server.v1 + "/cost", timeout=10).json()["response_cache"]
    assert stats["lookups"]["semantic_hit"] == 1 and stats["semantic"]["vectors"] == 2
