"""Speculative decoding in the engine on real models: every proposer's output equals speculation off,
token for token (greedy and seeded sampling), in batches where speculating sequences, plain ones
and prefill chunks share steps; and the KV cache stays whole through rejections, preemption and abort."""

from __future__ import annotations

import json

import pytest

from leanserve.engine.engine import LLMEngine
from leanserve.config import EngineConfig
from leanserve.types import SamplingParams
from tests.conftest import DATA_DIR

pytestmark = pytest.mark.model

KV = 96 << 20


def grounded_prompts(n: int, max_chars: int = 1500) -> list[str]:
    """Input-grounded prompts (code to fix, abstracts to summarize, passages to answer from), where
    the answer re-uses the prompt's text: drafts get accepted. Alternating with plain questions."""
    d = DATA_DIR / "eval"
    if not (d / "humanevalfix_python.jsonl").is_file():
        pytest.skip(f"{d} not found: the shared data folder is needed for this test")
    code = [json.loads(x) for x in (d / "humanevalfix_python.jsonl").read_text().splitlines()[:n]]
    papers = [json.loads(x) for x in (d / "scitldr_a_test.jsonl").read_text().splitlines()[:n]]
    rag = [json.loads(x) for x in (d / "specbench_questions.jsonl").read_text().splitlines()
           if json.loads(x)["category"] == "rag"][:n]
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            c = code[i]
            out.append(f"Fix the bug in this function.\n\n{c['prompt'][-max_chars // 2:]}{c.get('buggy_solution', '')}\n\n"
                       f"Fixed version:\n{c['prompt'][-max_chars // 2:]}")
        elif kind == 1:
            out.append("Summarize the paper in one sentence.\n\n" + " ".join(papers[i]["source"])[:max_chars] + "\n\nSummary:")
        elif kind == 2:
            out.append(rag[i]["turns"][0][:max_chars])
        else:
            out.append(f"Question {i}: what is the capital of a country you like, and why?")
    return out


def run(engine: LLMEngine, prompts, params, check_every_step: bool = True, abort_at: dict[int, str] | None = None):
    """All prompts at once; the scheduler's and KV cache's invariants checked after every step.
    Returns {index: token ids} and the number of steps that verified drafts beside plain sequences."""
    ids = []
    for i, (p, sp) in enumerate(zip(prompts, params)):
        rid = f"r{i}"
        engine.add_request(rid, p, sp)
        ids.append(rid)
    done, mixed, step = {}, 0, 0
    real_execute = engine.runner.execute

    def spy(sched):
        nonlocal mixed
        spec = [s for s in sched.scheduled if s.spec_token_ids]
        if spec and len(spec) < len(sched.scheduled):
            mixed += 1
        return real_execute(sched)

    engine.runner.execute = spy
    try:
        while engine.has_unfinished():
            for out in engine.step().outputs:
                if out.finished:
                    done[out.request_id] = out
            step += 1
            if abort_at and step in abort_at:
                engine.abort_request(abort_at[step])
            if check_every_step:
                engine.scheduler.check_integrity()
    finally:
        engine.runner.execute = real_execute
    return {rid: done[rid] for rid in ids if rid in done}, mixed


@pytest.fixture(scope="module")
def smollm(smollm2_f32):
    return smollm2_f32


def engine(loaded, method: str, **kw) -> LLMEngine:
    """An engine whose drafts always look worth their cost (a step-cost model with a free slope), so
    every decoding sequence speculates: these tests check what speculation does to the output, not
    when it pays (tests/unit/test_spec_adaptive.py does that)."""
    kw.setdefault("kv_cache_memory", KV)
    kw.setdefault("max_model_len", 2048)
    eng = LLMEngine(EngineConfig(model=kw.pop("model", "smollm2-135m"), dtype="float32", speculative=method,
                                 speculative_max_batch=32, **kw), loaded)
    eng.step_cost.coefficients = lambda: (1.0, 0.0)
    forward_cost = getattr(eng.proposer, "forward_cost", None)  # a draft model's measured forwards: free here too,
    if forward_cost is not None:  # or a loaded machine's slow forwards would stop the drafting these tests check
        forward_cost.coefficients = lambda: (0.0, 0.0)
    return eng


def _tokens(outs):
    return {rid: [c.token_ids for c in o.outputs] for rid, o in outs.items()}


GREEDY_20 = [SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=i % 5 == 0) for i in range(20)]


@pytest.fixture(scope="module")
def greedy_off(smollm):
    prompts = [smollm.tokenizer.encode(p) for p in grounded_prompts(20)]
    return prompts, run(engine(smollm, "off"), prompts, GREEDY_20)[0]


@pytest.mark.parametrize("method", ["ngram", "suffix"])
def test_greedy_equals_speculation_off_on_20_prompts(smollm, greedy_off, method):
    prompts, ref = greedy_off
    params = GREEDY_20
    eng = engine(smollm, method)
    got, mixed = run(eng, prompts, params)
    assert _tokens(got) == _tokens(ref)
    assert [o.outputs[0].text for o in got.values()] == [o.outputs[0].text for o in ref.values()]
    assert [o.outputs[0].finish_reason for o in got.values()] == [o.outputs[0].finish_reason for o in ref.values()]
    st = eng.spec
    assert st.num_accepted_tokens > 50, st  # drafts were verified and accepted, not just proposed
    assert 0 < st.num_accepted_tokens < st.num_draft_tokens
    assert sum(st.accepted_per_pos) == st.num_accepted_tokens
    assert mixed > 0  # steps where speculating and plain sequences shared the batch


def test_seeded_sampling_penalties_logprobs_and_stops_equal_speculation_off(smollm):
    prompts = [smollm.tokenizer.encode(p) for p in grounded_prompts(8)]
    params = [SamplingParams(temperature=0.7, seed=100 + i, max_tokens=32, logprobs=2,
                             repetition_penalty=1.0 if i % 2 else 1.2, frequency_penalty=0.3 if i % 3 == 0 else 0.0,
                             n=2 if i == 3 else 1, stop=["\n\n\n"] if i == 5 else ()) for i in range(8)]
    ref, _ = run(engine(smollm, "off"), prompts, params)
    eng = engine(smollm, "ngram")
    got, _ = run(eng, prompts, params)
    assert _tokens(got) == _tokens(ref)
    assert eng.spec.num_accepted_tokens > 0
    for rid in ref:
        for a, b in zip(got[rid].outputs, ref[rid].outputs):
            assert [lp.token_id for lp in a.logprobs] == [lp.token_id for lp in b.logprobs] == a.token_ids
            assert [lp.logprob for lp in a.logprobs] == pytest.approx([lp.logprob for lp in b.logprobs], abs=1e-3)


def test_kv_integrity_through_preemption_and_abort(smollm):
    # a KV cache of ~1,100 tokens for 6 prompts of ~300-500 tokens: sequences get preempted and recomputed
    prompts = [smollm.tokenizer.encode(p) for p in grounded_prompts(6)]
    params = [SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True) for _ in prompts]
    small = 1100 * 30 * 2 * 3 * 64 * 4  # tokens x layers x (K, V) x KV heads x head_dim x float32
    ref, _ = run(engine(smollm, "off", kv_cache_memory=small, max_model_len=1024), prompts, params)
    eng = engine(smollm, "ngram", kv_cache_memory=small, max_model_len=1024)
    got, _ = run(eng, prompts, params, abort_at={25: "r2"})
    assert eng.scheduler.num_preemptions_total > 0
    assert "r2" not in got and set(got) == set(ref) - {"r2"}
    assert _tokens(got) == {rid: t for rid, t in _tokens(ref).items() if rid != "r2"}
    assert eng.spec.num_accepted_tokens > 0
    assert eng.kv_cache.num_free_blocks == eng.kv_cache.num_blocks  # nothing leaked
    assert eng.proposer.num_tracked == 0  # no history left behind


def test_max_tokens_and_context_end_cut_drafts(smollm):
    # a repetitive prompt: drafts are long and accepted; output must stop exactly at max_tokens
    text = "one two three four five six seven eight nine ten " * 20
    prompt = smollm.tokenizer.encode(text)
    eng = engine(smollm, "ngram")
    ref = engine(smollm, "off")
    for max_tokens in (1, 2, 7):
        p = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        a, _ = run(eng, [prompt], [p])
        b, _ = run(ref, [prompt], [p])
        assert _tokens(a) == _tokens(b) and len(a["r0"].outputs[0].token_ids) == max_tokens
    # the context's end: max_model_len leaves room for 5 tokens
    short = engine(smollm, "ngram", max_model_len=len(prompt) + 5)
    out, _ = run(short, [prompt], [SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)])
    assert len(out["r0"].outputs[0].token_ids) == 5 and out["r0"].outputs[0].finish_reason == "length"


@pytest.fixture(scope="module")
def gemma(gemma3_f32):
    return gemma3_f32


def test_gemma3_greedy_equals_speculation_off(gemma):
    prompts = [gemma.tokenizer.encode(p) for p in grounded_prompts(20, max_chars=500)]  # its prefill is costly
    params = [SamplingParams(temperature=0.0, max_tokens=16) for _ in prompts]

    def make(method):
        return engine(gemma, method, model="gemma3-270m", kv_cache_memory=KV * 2)

    ref, _ = run(make("off"), prompts, params, check_every_step=False)
    eng = make("suffix")
    got, _ = run(eng, prompts, params)
    assert _tokens(got) == _tokens(ref)
    assert eng.spec.num_accepted_tokens > 0


# ---- draft models ---------------------------------------------------------------------------------

@pytest.mark.parametrize("draft", ["self:10", "smollm2-135m"])
def test_draft_model_greedy_equals_speculation_off(smollm, greedy_off, draft, monkeypatch):
    # self:10: the first 10 of 30 layers; smollm2-135m: a separate draft (here the target's own
    # weights loaded again, so nearly every draft stands). 20 prompts, speculating and plain mixed.
    import leanserve.model.loader as loader

    monkeypatch.setattr(loader, "load_model", lambda *a, **k: smollm)  # the second copy: no second load
    prompts, ref = greedy_off
    n = 20 if draft.startswith("self") else 8  # the second copy drafts nearly everything right: 8 prompts show it
    eng = engine(smollm, "draft", draft_model=draft)
    got, mixed = run(eng, prompts[:n], GREEDY_20[:n])
    assert _tokens(got) == {rid: t for rid, t in _tokens(ref).items() if int(rid[1:]) < n}
    st = eng.spec
    assert st.num_draft_tokens > 50 and mixed > 0
    if draft == "smollm2-135m":
        assert st.acceptance_rate > 0.9, st  # the same model: only batch-order rounding differs
    else:
        assert 0 < st.num_accepted_tokens < st.num_draft_tokens
    assert eng.proposer.num_free_blocks == eng.proposer.num_blocks  # every sequence's draft blocks returned


def test_draft_model_seeded_sampling_equals_off_and_unseeded_runs(smollm):
    prompts = [smollm.tokenizer.encode(p) for p in grounded_prompts(6)]
    seeded = [SamplingParams(temperature=0.8, seed=7 + i, max_tokens=24, top_p=0.95 if i % 2 else 1.0,
                             logprobs=1 if i == 0 else None) for i in range(6)]
    ref, _ = run(engine(smollm, "off"), prompts, seeded)
    eng = engine(smollm, "draft", draft_model="self:12")
    got, _ = run(eng, prompts, seeded)
    assert _tokens(got) == _tokens(ref)  # seeded: the draft's argmax checked against the target's own draw
    # unseeded sampling goes through the rejection sampler with the draft's distributions
    eng = engine(smollm, "draft", draft_model="self:12")
    free = [SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True, logprobs=0) for _ in prompts]
    got, _ = run(eng, prompts, free, abort_at={6: "r1"})
    assert all(len(o.outputs[0].token_ids) == 24 for rid, o in got.items()) and "r1" not in got
    assert all([lp.token_id for lp in o.outputs[0].logprobs] == o.outputs[0].token_ids for o in got.values())
    assert eng.spec.num_accepted_tokens > 0
    assert eng.proposer.num_free_blocks == eng.proposer.num_blocks


def test_a_draft_with_another_tokenizer_is_refused_in_one_line(smollm, gemma):
    from leanserve.engine.draft import TokenizerMismatch, check_same_tokenizer

    check_same_tokenizer(smollm.tokenizer, smollm.tokenizer, "smollm2-135m")
    with pytest.raises(TokenizerMismatch) as e:
        check_same_tokenizer(gemma.tokenizer, smollm.tokenizer, "smollm2-135m")
    assert "\n" not in str(e.value) and "another tokenizer than the target" in str(e.value)


def test_a_draft_model_with_another_tokenizer_stops_start_up_before_its_weights_load(smollm, gemma, monkeypatch):
    # `leanserve serve smollm2-135m --speculative draft --draft-model gemma3-270m`: the engine's
    # proposer build reads the draft's tokenizer (here the one already loaded), refuses it with a
    # ValueError the CLI prints as one line, and never loads the draft's weights
    import leanserve.model.loader as loader
    from leanserve.engine.draft import TokenizerMismatch

    monkeypatch.setattr(loader, "load_config_and_tokenizer", lambda source: (gemma.config, gemma.tokenizer, None))
    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("loaded the draft's weights"))
    with pytest.raises(TokenizerMismatch, match="draft model gemma3-270m has another tokenizer than the target"):
        engine(smollm, "draft", draft_model="gemma3-270m")
    with pytest.raises(ValueError, match="the target has 30 layers; a self-draft takes 1 to 29"):
        engine(smollm, "draft", draft_model="self:30")
