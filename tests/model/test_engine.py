"""The engine on the real SmolLM2-135M: stop conditions, n > 1, seeds, logprobs, preemption, abort."""

from __future__ import annotations

import math

import pytest
import torch

from leanserve.engine.engine import LLM
from leanserve.types import SamplingParams
from tests.conftest import mt_bench_prompts

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def loaded(smollm2_f32):
    return smollm2_f32


@pytest.fixture
def llm(loaded):
    return LLM("smollm2-135m", loaded=loaded)


@pytest.fixture(scope="module")
def chats(loaded):
    return [loaded.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in mt_bench_prompts(6)]


def greedy(max_tokens: int = 32, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def test_stop_string_cuts_text_before_it(llm, chats):
    full = llm.generate(chats[0], greedy(40, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    stop = full.text[20:26]
    assert len(stop.strip()) > 0
    out = llm.generate(chats[0], greedy(40, ignore_eos=True, stop=[stop, "zzzz-never"]), use_tqdm=False)[0].outputs[0]
    assert out.text == full.text[:full.text.index(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    kept = llm.generate(chats[0], greedy(40, ignore_eos=True, stop=[stop], include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == full.text[:full.text.index(stop) + len(stop)]


def test_stop_token_ids_and_length(llm, chats):
    full = llm.generate(chats[1], greedy(20, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 20
    stop_tok = full.token_ids[7]
    first = full.token_ids.index(stop_tok)
    out = llm.generate(chats[1], greedy(20, ignore_eos=True, stop_token_ids=[stop_tok]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == full.token_ids[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok


def test_min_tokens_holds_back_eos(llm, loaded):
    short = loaded.tokenizer.encode_chat([{"role": "user", "content": "Answer with one word: is the sky blue?"}])
    natural = llm.generate(short, greedy(60), use_tqdm=False)[0].outputs[0]
    assert natural.finish_reason == "stop"  # ends on EOS by itself
    n = len(natural.token_ids)
    longer = llm.generate(short, greedy(60, min_tokens=n + 5), use_tqdm=False)[0].outputs[0]
    assert len(longer.token_ids) >= n + 5


def test_n_samples_share_prompt_blocks_and_differ(llm, chats):
    before = llm.engine.kv_cache.prefix_cache_hits
    out = llm.generate(chats[3], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=16), use_tqdm=False)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) == 3
    full_blocks = (len(chats[3]) - 1) // llm.engine.cache_config.block_size
    # samples 1 and 2 read the prompt blocks that sample 0 wrote in the same step
    assert llm.engine.kv_cache.prefix_cache_hits - before >= 2 * full_blocks * llm.engine.cache_config.block_size
    again = llm.generate(chats[3], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=16), use_tqdm=False)[0]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in out.outputs]


def test_seed_gives_same_text_whatever_the_batch(llm, chats):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=24, ignore_eos=True)
    alone = llm.generate(chats[0], seeded, use_tqdm=False)[0].outputs[0].token_ids
    noise = SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)
    mixed = llm.generate([chats[4], chats[0], chats[5]], [noise, seeded, noise], use_tqdm=False)
    assert mixed[1].outputs[0].token_ids == alone
    other_seed = llm.generate(chats[0], SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=24,
                                                       ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
    assert other_seed != alone


def test_logprobs_are_the_model_distribution(llm, loaded, chats):
    out = llm.generate(chats[1], greedy(6, logprobs=3), use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids) == 6
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == tok and lp.logprob <= 0.0
        assert len(lp.top) == 3 and lp.top[0][0] == tok  # greedy picks the most likely token
        assert [p for _, p in lp.top] == sorted((p for _, p in lp.top), reverse=True)
        assert sum(math.exp(p) for _, p in lp.top) <= 1.0 + 1e-5


def test_preemption_by_recompute_keeps_greedy_output(loaded, chats):
    roomy = LLM("smollm2-135m", loaded=loaded)
    want = [o.outputs[0].token_ids for o in roomy.generate(chats, greedy(48, ignore_eos=True), use_tqdm=False)]
    # 16 blocks of 16 tokens cannot hold six ~100-token requests growing by 48: the scheduler must
    # preempt and recompute; recomputed KV must give the same tokens
    block_bytes = loaded.config.kv_bytes_per_token * 4 * 16
    tight = LLM("smollm2-135m", loaded=loaded, kv_cache_memory=40 * block_bytes, max_model_len=512)
    got = tight.generate(chats, greedy(48, ignore_eos=True), use_tqdm=False)
    assert tight.engine.scheduler.num_preemptions_total > 0
    assert [o.outputs[0].token_ids for o in got] == want
    assert tight.engine.kv_cache.usage == 0.0
    tight.engine.scheduler.check_integrity()


def test_abort_frees_every_block(llm, chats):
    eng = llm.engine
    eng.add_request("a", chats[0], greedy(100))
    eng.add_request("b", chats[1], SamplingParams(n=2, temperature=1.0, max_tokens=100))
    for _ in range(3):
        eng.step()
    assert eng.kv_cache.usage > 0
    eng.abort_request("a")
    eng.abort_request("b")
    assert not eng.has_unfinished()
    assert eng.kv_cache.usage == 0.0
    eng.scheduler.check_integrity()


def test_bad_requests_are_value_errors(llm):
    eng = llm.engine
    with pytest.raises(ValueError, match="empty"):
        eng.add_request("x", [], greedy())
    with pytest.raises(ValueError, match="token ids must be in"):
        eng.add_request("y", [10**9], greedy())
    with pytest.raises(ValueError, match="context"):
        eng.add_request("z", [1] * eng.max_model_len, greedy())
    with pytest.raises(ValueError, match="logit_bias keys"):
        eng.add_request("b", [1, 2], greedy(logit_bias={10**7: 1.0}))
    with pytest.raises(ValueError, match="stop_token_ids"):
        eng.add_request("s", [1, 2], greedy(stop_token_ids=[10**7]))
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    assert not eng.has_unfinished()


def test_request_charges_add_up_to_busy_time(loaded, chats):
    llm = LLM("smollm2-135m", loaded=loaded)
    busy0 = llm.engine.meter.snapshot().busy_seconds
    outs = llm.generate(chats[:4], [greedy(8), greedy(12), SamplingParams(n=2, max_tokens=6), greedy(4)], use_tqdm=False)
    busy = llm.engine.meter.snapshot().busy_seconds - busy0
    assert all(o.machine_seconds > 0 for o in outs)
    assert sum(o.machine_seconds for o in outs) == pytest.approx(busy, rel=0.02)


def test_cached_prompt_is_charged_less(llm):
    long_prompt = " ".join(mt_bench_prompts(12)) * 2  # several hundred tokens
    first = llm.generate(long_prompt, greedy(4, ignore_eos=True), use_tqdm=False)[0]
    again = llm.generate(long_prompt, greedy(4, ignore_eos=True), use_tqdm=False)[0]
    assert again.num_cached_tokens > 0.9 * first.num_prompt_tokens
    assert again.machine_seconds < 0.5 * first.machine_seconds


def test_a_failed_step_names_its_requests_and_the_engine_serves_on(llm, chats):
    from leanserve.engine.interface import StepError
    from tests.fake_engine import missing_members

    eng = llm.engine
    assert missing_members(eng) == []  # the EngineCore contract, attributes included
    assert eng.info.max_model_len == eng.max_model_len and eng.info.num_params > 100_000_000
    eng.add_request("a", chats[0], greedy(8))
    eng.add_request("b", chats[1], SamplingParams(n=2, temperature=1.0, max_tokens=8, seed=3))
    first = eng.step()
    assert first.scheduled == ["a", "b"]  # request ids, not the engine's per-choice sequence ids
    real = eng.runner.execute
    eng.runner.execute = lambda sched: (_ for _ in ()).throw(RuntimeError("simulated kernel failure"))
    with pytest.raises(StepError) as e:
        eng.step()
    eng.runner.execute = real
    assert e.value.request_ids == ["a", "b"] and "simulated" in str(e.value)
    assert [o.request_id for o in e.value.outputs] == ["a", "b"]
    assert all(c.finish_reason == "error" for o in e.value.outputs for c in o.outputs)
    assert e.value.outputs[0].machine_seconds > 0  # what the request's earlier steps cost, for its bill
    assert not eng.has_unfinished() and eng.kv_cache.usage == 0.0
    eng.scheduler.check_integrity()
    with pytest.raises(ValueError, match="'#'"):
        eng.add_request("x#1", chats[2], greedy())
    again = llm.generate(chats[0], greedy(8), use_tqdm=False)[0]
    assert again.outputs[0].finish_reason in ("stop", "length")
    assert eng.abort_request("nobody") is None


def test_8bit_kv_cache_holds_more_tokens_and_scores_close_to_the_float_cache(loaded, chats):
    memory = 64 << 20
    exact = LLM("smollm2-135m", loaded=loaded, kv_cache_memory=memory)
    small = LLM("smollm2-135m", loaded=loaded, kv_cache_memory=memory, kv_cache_dtype="int8")
    cfg = loaded.config
    # float32 rows of 64 values (256 bytes) against 64 int8 values and two float16 scales (68 bytes)
    row_bytes = {"float32": cfg.head_dim * 4, "int8": cfg.head_dim + 4}
    for llm, kind in ((exact, "float32"), (small, "int8")):
        block = 2 * cfg.num_layers * cfg.num_kv_heads * row_bytes[kind] * 16
        assert llm.engine.info.kv_cache_tokens == memory // block * 16
        assert llm.engine.info.kv_cache_dtype == kind
    assert small.engine.info.kv_cache_summary() == (
        f"{small.engine.info.kv_cache_tokens:,} tokens in int8 (3.76x the {exact.engine.info.kv_cache_tokens:,} of float32)")
    assert small.engine.runner.kv_caches[0][0].dtype == torch.int8
    # leanserve plan sizes the same cache: its bytes per token are the engine's
    from leanserve.plan.model import load_shape

    engine_bytes = sum(t.numel() for kv in small.engine.runner.kv_caches for t in kv) / small.engine.info.kv_cache_tokens
    assert load_shape("smollm2-135m").kv_bytes_per_token("int8") == engine_bytes
    # teacher-forced: each chat and its float-cache greedy answer, scored by both caches
    answers = exact.generate(chats, greedy(48, ignore_eos=True), use_tqdm=False)
    texts = [c + list(a.outputs[0].token_ids) for c, a in zip(chats, answers)]
    scoring = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0, prompt_logprobs_start=1)
    want = [[lp.logprob for lp in o.prompt_logprobs[1:]] for o in exact.generate(texts, scoring, use_tqdm=False)]
    got = [[lp.logprob for lp in o.prompt_logprobs[1:]] for o in small.generate(texts, scoring, use_tqdm=False)]
    diffs = [abs(g - w) for gs, ws in zip(got, want) for g, w in zip(gs, ws, strict=True)]
    # measured: mean 0.022 nats a token, max 0.20, the texts' total log-likelihood 0.08% apart
    assert sum(diffs) / len(diffs) < 0.05 and max(diffs) < 0.6
    assert abs(sum(map(sum, got)) / sum(map(sum, want)) - 1) < 0.01
    # and generation over the 8-bit cache runs its decode steps natively and frees every block
    out = small.generate(chats, greedy(16), use_tqdm=False)
    assert all(o.outputs[0].token_ids for o in out) and small.engine.kv_cache.usage == 0.0
