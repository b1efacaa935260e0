"""`leanserve eval`'s scores against HF transformers' on the same token ids (float32, the same GGUF
file): per-choice log-likelihoods of 30 ARC-Easy and 30 HellaSwag items within 1e-3, WikiText-2
perplexity through the same rolling windows within 0.5%, and the engine's prompt logprobs under it."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from leanserve.config import EngineConfig
from leanserve.engine.engine import LLM
from leanserve.eval.backend import ScoreRequest
from leanserve.eval.inprocess import InProcessBackend
from leanserve.eval.tasks import EvalOptions, Selection, builtin_task, continuation_request
from leanserve.model.loader import resolve
from leanserve.types import SamplingParams
from tests.conftest import mt_bench_prompts, require_model

pytestmark = pytest.mark.model

ITEMS = 30


@pytest.fixture(scope="module")
def backend():
    require_model("smollm2-135m")
    return InProcessBackend(EngineConfig(model="smollm2-135m", dtype="float32", max_num_batched_tokens=1024))


@pytest.fixture(scope="module")
def hf():
    path = resolve("smollm2-135m").path
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32).eval()


def hf_scores(hf, requests: list[ScoreRequest]) -> list[float]:
    """Summed log-softmax of each request's scored tokens: one right-padded HF batch per call."""
    width = max(len(r.token_ids) for r in requests)
    ids = torch.tensor([list(r.token_ids) + [0] * (width - len(r.token_ids)) for r in requests])
    mask = torch.tensor([[1] * len(r.token_ids) + [0] * (width - len(r.token_ids)) for r in requests])
    with torch.inference_mode():
        lp = torch.log_softmax(hf(ids, attention_mask=mask).logits.float(), dim=-1)
    return [sum(lp[b, i - 1, r.token_ids[i]].item() for i in range(r.start, len(r.token_ids)))
            for b, r in enumerate(requests)]


@pytest.mark.parametrize("name", ["arc_easy", "hellaswag"])
def test_multiple_choice_loglikelihoods_equal_hf(backend, hf, name):
    task = builtin_task(name)
    out = task.run(backend, EvalOptions(selection=Selection(first=ITEMS), batch_size=25))
    assert out.num_items == ITEMS
    items = {it.index: it for it in task.items()[:ITEMS]}
    worst = 0.0
    for rec in out.items:
        item = items[rec["index"]]
        ctx = backend.tokenize(item.context)
        reqs = [continuation_request(backend, item.context, " " + c, ctx) for c in item.choices]
        want = hf_scores(hf, reqs)
        assert rec["tokens"] == [len(r.token_ids) - r.start for r in reqs]
        for got, ref in zip(rec["logprobs"], want):
            worst = max(worst, abs(got - ref))
        assert rec["chosen"] == max(range(len(want)), key=lambda i: want[i])
    print(f"{name}: largest |leanserve - HF| over {ITEMS} items' choices: {worst:.2e}")
    assert worst < 1e-3


def test_wikitext2_perplexity_equals_hf_through_the_same_windows(backend, hf):
    task = builtin_task("wikitext2")
    out = task.run(backend, EvalOptions(selection=Selection(first=6), context_length=256, stride=192))
    d = out.details
    assert (d["context_length"], d["stride"], d["windows"]) == (256, 192, 6)
    ids = backend.tokenize(task.documents()[0].text, add_special_tokens=False)
    nll, n = 0.0, 0
    for rec in out.items:  # the same windows, scored by HF
        req = ScoreRequest(tuple(ids[rec["begin"]:rec["end"]]), rec["score_from"] - rec["begin"])
        nll -= hf_scores(hf, [req])[0]
        n += rec["tokens"]
    assert n == d["tokens_scored"] == 255 + 5 * 192  # the first window from token 1, then 192 new tokens each
    assert out.metrics["perplexity"] == pytest.approx(math.exp(nll / n), rel=5e-3)
    assert out.metrics["bits_per_byte"] == pytest.approx(nll / math.log(2) / d["bytes_scored"], rel=5e-3)


def test_prompt_logprobs_equal_hf_with_chunks_and_a_cached_context(backend, hf):
    """Prompt logprobs (the eval harness's scoring) against HF's log-softmax over the same ids, float32:
    through chunked prefill (64-token steps), with n > 1, and with a shared context served from the
    prefix cache while only the continuation is scored."""
    ours = backend.engine.loaded
    tok = ours.tokenizer
    context = tok.encode(" ".join(mt_bench_prompts(3)))  # ~200 tokens: several chunks and blocks
    conts = [tok.encode(" The answer is yes.", add_special_tokens=False),
             tok.encode(" It depends on the weather in Paris.", add_special_tokens=False)]
    with torch.no_grad():
        ref = [torch.log_softmax(hf(torch.tensor([context + c])).logits[0].float(), dim=-1) for c in conts]
    llm = LLM("smollm2-135m", loaded=ours, max_num_batched_tokens=64)
    full = llm.generate([context + conts[0]], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2, n=2),
                        use_tqdm=False)[0]
    lps = full.prompt_logprobs
    assert lps is not None and lps[0] is None and len(lps) == len(context) + len(conts[0])
    ids = context + conts[0]
    for i in range(1, len(ids)):
        want = ref[0][i - 1]
        assert lps[i].token_id == ids[i] and abs(lps[i].logprob - want[ids[i]].item()) < 1e-3
        assert lps[i].rank == int((want > want[ids[i]]).sum()) + 1
        assert [t for t, _ in lps[i].top] == want.topk(2).indices.tolist()
    # the shared context is cached now: scoring only the continuations reuses it
    start = len(context)
    outs = llm.generate([context + c for c in conts], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0,
                                                                       prompt_logprobs_start=start), use_tqdm=False)
    for out, c, r in zip(outs, conts, ref):
        assert out.num_cached_tokens >= (start - 1) // 16 * 16 > 0
        got = out.prompt_logprobs
        assert all(x is None for x in got[:start]) and all(x is not None for x in got[start:])
        for j, lp in enumerate(got[start:]):
            assert abs(lp.logprob - r[start + j - 1][c[j]].item()) < 1e-3 and lp.top == []
