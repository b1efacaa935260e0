"""Scheduler: token budget, chunked prefill, seat cap, priorities, preemption, abort, and a stress run."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import pytest

from leanserve.config import SchedulerConfig
from leanserve.engine.kv_cache import KVCacheManager
from leanserve.engine.scheduler import Scheduler
from leanserve.types import Priority, Request, RequestStatus, SamplingParams, SchedulerOutput

BS = 4
TOKEN = 7  # what the fake model samples
BATCH = Priority.BATCH


def req(rid: str, tokens: list[int] | int, priority: Priority = Priority.INTERACTIVE) -> Request:
    """An int prompt is that many tokens unique to the request id (no accidental prefix hits)."""
    base = 1000 * sum(map(ord, rid))
    prompt = list(range(base, base + tokens)) if isinstance(tokens, int) else list(tokens)
    return Request(rid, prompt, SamplingParams(), priority=priority)


@pytest.fixture
def make_sched() -> Iterator[Callable[..., Scheduler]]:
    """Builds schedulers and checks every one of them again when the test ends."""
    made: list[Scheduler] = []

    def make(
        num_blocks: int = 16,
        budget: int = 16,
        max_num_seqs: int = 8,
        max_model_len: int | None = None,
        chunked: bool = True,
        caching: bool = True,
        batch_beside: int | None = None,
    ) -> Scheduler:
        kv = KVCacheManager(num_blocks, BS, caching)
        config = SchedulerConfig(budget, max_num_seqs, max_model_len or num_blocks * BS, chunked, batch_beside)
        s = Scheduler(config, kv)
        made.append(s)
        return s

    yield make
    for s in made:
        s.check_integrity()


def step(s: Scheduler, token: int = TOKEN) -> SchedulerOutput:
    """One engine step with a fake model; integrity checked before and after the update."""
    out = s.schedule()
    s.check_integrity()
    s.update(out, {x.request.request_id: token for x in out.scheduled if x.samples})
    s.check_integrity()
    return out


def chunks(out: SchedulerOutput) -> dict[str, int]:
    return {x.request.request_id: x.num_new_tokens for x in out.scheduled}


def tables(out: SchedulerOutput) -> dict[str, list[int]]:
    return {x.request.request_id: x.block_ids for x in out.scheduled}


def test_decodes_first_then_prefill_chunks_of_exact_sizes(make_sched) -> None:
    s = make_sched(budget=10)
    a, b = req("a", 6), req("b", 20)
    s.add_request(a)
    s.add_request(b)
    out = s.schedule()
    assert chunks(out) == {"a": 6, "b": 4} and out.num_batched_tokens == 10
    assert [x.samples for x in out.scheduled] == [True, False]  # only before update: it reads live state
    s.update(out, {"a": TOKEN})
    assert a.output_token_ids == [TOKEN] and b.output_token_ids == []
    assert chunks(step(s)) == {"a": 1, "b": 9}
    s.add_request(req("c", 8))
    out = step(s)
    assert chunks(out) == {"a": 1, "b": 7, "c": 2}
    assert b.num_computed_tokens == 20 and b.output_token_ids == [TOKEN]  # the last chunk sampled
    assert chunks(step(s)) == {"a": 1, "b": 1, "c": 6}
    assert chunks(step(s)) == {"a": 1, "b": 1, "c": 1}
    assert a.num_computed_tokens == 10 and a.num_tokens == 11


def test_update_returns_the_requests_that_got_a_token(make_sched) -> None:
    s = make_sched(budget=8)
    s.add_request(req("a", 4))
    s.add_request(req("b", 10))
    out = s.schedule()
    got = s.update(out, {"a": 5, "b": 6})  # b's chunk does not sample: its token is ignored
    assert [r.request_id for r in got] == ["a"]
    assert s.get_request("a").output_token_ids == [5]
    assert s.get_request("b").output_token_ids == []
    out = s.schedule()
    with pytest.raises(ValueError, match="no token was sampled"):
        s.update(out, {"b": 1})
    assert s.get_request("b").num_computed_tokens == 4  # nothing applied
    s.update(out, {"a": 1, "b": 1})


def test_max_num_seqs_caps_running_requests(make_sched) -> None:
    s = make_sched(max_num_seqs=2)
    for rid in "abc":
        s.add_request(req(rid, 4))
    assert chunks(step(s)) == {"a": 4, "b": 4}
    assert (s.num_running, s.num_waiting) == (2, 1)
    assert chunks(step(s)) == {"a": 1, "b": 1}
    assert s.finish_request("a", RequestStatus.FINISHED_STOPPED)
    assert chunks(step(s)) == {"b": 1, "c": 4}


def test_waiting_request_that_does_not_fit_blocks_later_ones(make_sched) -> None:
    s = make_sched(num_blocks=4)
    s.add_request(req("a", 10))
    assert tables(step(s)) == {"a": [0, 1, 2]}
    s.add_request(req("b", 8))  # needs 2 blocks, 1 is free
    s.add_request(req("c", 3))  # would fit, but must not pass b
    assert chunks(step(s)) == {"a": 1}
    assert s.get_request("c").status is RequestStatus.WAITING
    s.finish_request("a", RequestStatus.FINISHED_STOPPED)
    assert chunks(step(s)) == {"b": 8, "c": 3}


def test_without_chunked_prefill_a_prompt_waits_for_the_whole_budget(make_sched) -> None:
    s = make_sched(budget=16, max_model_len=16, chunked=False)
    s.add_request(req("a", 8))
    s.add_request(req("b", 10))
    assert chunks(step(s)) == {"a": 8}
    assert chunks(step(s)) == {"a": 1, "b": 10}


def test_same_step_prefix_hit(make_sched) -> None:
    s = make_sched(budget=32)
    a, b = req("a", list(range(9))), req("b", list(range(9)))
    s.add_request(a)
    s.add_request(b)
    out = step(s)
    assert chunks(out) == {"a": 9, "b": 1}
    assert tables(out) == {"a": [0, 1, 2], "b": [0, 1, 3]}
    assert (a.num_cached_tokens, b.num_cached_tokens) == (0, 8)
    assert s.kv_cache.prefix_cache_hits == 8
    assert b.output_token_ids == [TOKEN]


def test_prefix_hit_after_the_first_request_finished(make_sched) -> None:
    s = make_sched()
    s.add_request(req("a", list(range(10))))
    step(s)
    s.finish_request("a", RequestStatus.FINISHED_LENGTH)
    assert s.kv_cache.usage == 0.0
    b = req("b", list(range(8)) + [42, 43])
    s.add_request(b)
    out = step(s)
    assert chunks(out) == {"b": 2} and tables(out) == {"b": [0, 1, 3]}
    assert b.num_cached_tokens == 8


def test_prefix_caching_off_computes_everything(make_sched) -> None:
    s = make_sched(budget=32, caching=False)
    s.add_request(req("a", list(range(9))))
    s.add_request(req("b", list(range(9))))
    out = step(s)
    assert chunks(out) == {"a": 9, "b": 9}
    assert s.get_request("b").num_cached_tokens == 0


def test_interactive_runs_before_batch(make_sched) -> None:
    s = make_sched(budget=4)
    s.add_request(req("x", 8, BATCH))  # arrives first
    s.add_request(req("y", 8))
    assert chunks(step(s)) == {"y": 4}
    assert chunks(step(s)) == {"y": 4}
    assert chunks(step(s)) == {"y": 1, "x": 3}
    assert chunks(step(s)) == {"y": 1, "x": 3}
    assert chunks(step(s)) == {"y": 1, "x": 2}


def test_interactive_admission_comes_before_batch_decodes(make_sched) -> None:
    s = make_sched(budget=8)
    s.add_request(req("x", 4, BATCH))
    assert chunks(step(s)) == {"x": 4}
    s.add_request(req("y", 10))
    out = step(s)
    assert chunks(out) == {"y": 8}
    assert s.get_request("x").status is RequestStatus.RUNNING  # skipped this step, not preempted
    assert chunks(step(s)) == {"y": 2, "x": 1}


def test_batch_sequences_beside_interactive_ones_are_capped(make_sched) -> None:
    s = make_sched(budget=32, batch_beside=1)
    for rid in ("x1", "x2", "x3"):
        s.add_request(req(rid, 2, BATCH))
    assert chunks(step(s)) == {"x1": 2, "x2": 2, "x3": 2}  # alone, batch work fills the step
    s.add_request(req("y", 3))
    assert chunks(step(s)) == {"y": 3, "x1": 1}  # beside interactive work: one batch sequence
    assert chunks(step(s)) == {"y": 1, "x1": 1}  # the others keep their seats, and wait
    assert s.get_request("x2").status is RequestStatus.RUNNING and s.get_request("x3").num_computed_tokens == 2
    s.finish_request("y", RequestStatus.FINISHED_STOPPED)
    assert chunks(step(s)) == {"x1": 1, "x2": 1, "x3": 1}
    s.add_request(req("z", 2))
    s.add_request(req("w", 2, BATCH))  # a waiting batch request is not admitted past the cap either
    assert chunks(step(s)) == {"z": 2, "x1": 1}


def test_no_batch_sequence_beside_interactive_ones_with_a_cap_of_0(make_sched) -> None:
    s = make_sched(budget=32, batch_beside=0)
    s.add_request(req("x", 2, BATCH))
    s.add_request(req("y", 2))
    assert chunks(step(s)) == {"y": 2}
    s.finish_request("y", RequestStatus.FINISHED_STOPPED)
    assert chunks(step(s)) == {"x": 2}


def test_running_request_preempts_the_latest_one(make_sched) -> None:
    s = make_sched(num_blocks=4)
    s.add_request(req("a", 8))
    s.add_request(req("b", 8))
    assert tables(step(s)) == {"a": [0, 1], "b": [2, 3]}
    b = s.get_request("b")
    out = step(s)  # a's 9th token needs a block: b goes, a takes b's tail block
    assert out.preempted_ids == ["b"] and tables(out) == {"a": [0, 1, 3]}
    assert (b.status, b.num_computed_tokens, b.num_preemptions) == (RequestStatus.PREEMPTED, 0, 1)
    assert b.output_token_ids == [TOKEN]  # kept: it is recomputed, not regenerated
    assert s.kv_cache.get_block_ids("b") == []
    assert (s.num_running, s.num_waiting) == (1, 1)
    s.finish_request("a", RequestStatus.FINISHED_STOPPED)
    out = step(s)  # b's first block survived: recompute starts at 4
    assert chunks(out) == {"b": 5} and tables(out) == {"b": [2, 3, 1]}
    assert b.status is RequestStatus.RUNNING and b.num_computed_tokens == 9
    assert b.num_cached_tokens == 0  # the first scheduling's value
    assert b.output_token_ids == [TOKEN, TOKEN]


def test_running_request_preempts_itself_when_it_is_the_latest(make_sched) -> None:
    s = make_sched(num_blocks=4)
    s.add_request(req("a", 6))
    s.add_request(req("b", 8))
    assert tables(step(s)) == {"a": [0, 1], "b": [2, 3]}
    out = step(s)  # a fits its blocks; b needs a third block and nobody later can give one
    assert chunks(out) == {"a": 1} and out.preempted_ids == ["b"]
    assert s.kv_cache.free_queue() == [3, 2]
    out = step(s)  # b's blocks are its own hits: no spare block to add, so it waits
    assert chunks(out) == {"a": 1} and out.preempted_ids == []
    assert s.get_request("b").status is RequestStatus.PREEMPTED
    s.finish_request("a", RequestStatus.FINISHED_STOPPED)
    out = step(s)
    assert chunks(out) == {"b": 1} and tables(out) == {"b": [2, 3, 1]}


def test_preempted_request_is_not_readmitted_in_the_same_step(make_sched) -> None:
    s = make_sched(num_blocks=4, budget=32)
    s.add_request(req("a", 7))
    s.add_request(req("b", 4))
    assert tables(step(s)) == {"a": [0, 1], "b": [2]}
    s.add_request(req("c", 1))
    out = step(s)
    assert out.preempted_ids == [] and tables(out) == {"a": [0, 1], "b": [2, 3]}
    out = step(s)  # a needs a 3rd block: b is preempted, a takes b's tail block
    assert tables(out) == {"a": [0, 1, 3]} and out.preempted_ids == ["b"]
    # Block 2 is free now and c needs only one block, but c may not pass b, which sits out this step.
    assert s.kv_cache.free_queue() == [2]
    assert s.get_request("c").status is RequestStatus.WAITING


def test_interactive_request_preempts_running_batch_to_start(make_sched) -> None:
    s = make_sched(num_blocks=4)
    b = req("b", list(range(8)), BATCH)
    s.add_request(b)
    assert tables(step(s)) == {"b": [0, 1]}
    assert tables(step(s)) == {"b": [0, 1, 2]}
    s.add_request(req("i", 8))
    out = step(s)
    assert out.preempted_ids == ["b"] and chunks(out) == {"i": 8}
    assert tables(out) == {"i": [3, 2]}  # b's unnamed partial block goes first
    assert b.status is RequestStatus.PREEMPTED and b.num_preemptions == 1
    s.finish_request("i", RequestStatus.FINISHED_STOPPED)
    out = step(s)  # b's two full blocks are still cached: only 2 of its 10 tokens are recomputed
    assert chunks(out) == {"b": 2} and tables(out) == {"b": [0, 1, 2]}
    assert b.num_computed_tokens == 10 and b.output_token_ids == [TOKEN] * 3


def test_interactive_request_takes_a_seat_from_batch(make_sched) -> None:
    s = make_sched(max_num_seqs=1)
    s.add_request(req("x", 4, BATCH))
    step(s)
    s.add_request(req("y", 4))
    out = step(s)
    assert out.preempted_ids == ["x"] and chunks(out) == {"y": 4}


def test_waiting_requests_never_preempt_their_own_class_or_higher(make_sched) -> None:
    s = make_sched(num_blocks=4)
    s.add_request(req("a", 12))
    step(s)
    s.add_request(req("b", 8))  # INTERACTIVE behind INTERACTIVE: waits
    out = step(s)
    assert out.preempted_ids == [] and chunks(out) == {"a": 1}
    s.abort_request("b")
    s.add_request(req("x", 8, BATCH))  # BATCH: waits too
    out = step(s)
    assert out.preempted_ids == [] and chunks(out) == {"a": 1}


def test_abort_waiting_running_and_preempted(make_sched) -> None:
    s = make_sched(num_blocks=4)
    s.add_request(req("a", 6))
    s.add_request(req("b", 8))
    step(s)
    step(s)  # b preempted itself
    s.add_request(req("w", 4))
    assert [s.get_request(r).status for r in "abw"] == [RequestStatus.RUNNING, RequestStatus.PREEMPTED, RequestStatus.WAITING]
    aborted = [s.get_request(r) for r in "abw"]
    for rid in "wba":
        assert s.abort_request(rid)
        s.check_integrity()
    assert all(r.status is RequestStatus.FINISHED_ABORTED for r in aborted)
    assert not s.abort_request("a") and not s.abort_request("nobody")
    assert not s.has_unfinished and (s.num_running, s.num_waiting) == (0, 0)
    assert s.kv_cache.usage == 0.0 and s.kv_cache.num_free_blocks == 4
    assert s.schedule().is_empty


def test_abort_between_schedule_and_update(make_sched) -> None:
    s = make_sched()
    s.add_request(req("a", 4))
    s.add_request(req("b", 4))
    out = s.schedule()
    s.abort_request("a")
    got = s.update(out, {"b": 1})
    assert [r.request_id for r in got] == ["b"]
    assert out.scheduled[0].request.num_computed_tokens == 0  # a was not advanced


def test_add_request_rejects_what_could_never_run(make_sched) -> None:
    s = make_sched(num_blocks=4, max_model_len=12)
    with pytest.raises(ValueError, match="13 prompt tokens, more than max_model_len \\(12\\)"):
        s.add_request(req("long", 13))
    with pytest.raises(ValueError, match="empty prompt"):
        s.add_request(req("empty", 0))
    s.add_request(req("a", 12))
    with pytest.raises(ValueError, match="already"):
        s.add_request(req("a", 3))
    with pytest.raises(ValueError, match="KV cache capacity"):
        Scheduler(SchedulerConfig(max_model_len=17), KVCacheManager(4, BS))


def test_finish_request_needs_a_finished_status(make_sched) -> None:
    s = make_sched()
    s.add_request(req("a", 4))
    with pytest.raises(ValueError, match="finished status"):
        s.finish_request("a", RequestStatus.RUNNING)


def test_scheduler_integrity_check_can_fail(make_sched) -> None:
    s = make_sched()
    s.add_request(req("a", 4))
    step(s)
    s.get_request("a").status = RequestStatus.WAITING
    with pytest.raises(AssertionError, match="running list as WAITING"):
        s.check_integrity()
    s.get_request("a").status = RequestStatus.RUNNING


# ---- randomized stress -----------------------------------------------------------------------


class FakeKV:
    """Slot contents as the model would leave them: for each slot, the prefix hash it was written with."""

    def __init__(self, block_size: int) -> None:
        self.bs = block_size
        self.slots: dict[tuple[int, int], int] = {}

    @staticmethod
    def prefix_hashes(tokens: list[int]) -> list[int]:
        out, h = [], 0
        for t in tokens:
            h = hash((h, t))
            out.append(h)
        return out

    def run(self, out: SchedulerOutput) -> None:
        """Write every scheduled token's KV, then check every read sees its own prefix."""
        for x in out.scheduled:
            r, hashes = x.request, self.prefix_hashes(x.request.all_token_ids)
            for p in range(r.num_computed_tokens, r.num_computed_tokens + x.num_new_tokens):
                self.slots[(x.block_ids[p // self.bs], p % self.bs)] = hashes[p]
        for x in out.scheduled:
            r, hashes = x.request, self.prefix_hashes(x.request.all_token_ids)
            for p in range(r.num_computed_tokens + x.num_new_tokens):
                got = self.slots.get((x.block_ids[p // self.bs], p % self.bs))
                assert got == hashes[p], f"request {r.request_id} reads wrong KV at position {p}"


@pytest.mark.parametrize("seed", range(8))
def test_randomized_stress(seed: int) -> None:
    rng = random.Random(seed)
    bs = rng.choice([1, 2, 4, 4])
    num_blocks = rng.randint(6, 24)
    max_model_len = rng.randint(num_blocks * bs // 2, num_blocks * bs)
    chunked = seed % 3 != 2
    budget = rng.randint(1, 40) if chunked else rng.randint(max_model_len, max_model_len + 20)
    config = SchedulerConfig(budget, rng.randint(1, 6), max_model_len, chunked, [None, 0, 1, 2][seed % 4])
    kv = KVCacheManager(num_blocks, bs, enable_prefix_caching=seed % 4 != 3)
    s = Scheduler(config, kv)
    fake = FakeKV(bs)
    prefixes = [[rng.randrange(3) for _ in range(rng.randint(0, 12))] for _ in range(4)]
    next_id = 0

    def add() -> None:
        nonlocal next_id
        prompt = rng.choice(prefixes) + [rng.randrange(3) for _ in range(rng.randint(0, 10))]
        prompt = (prompt or [1])[:max_model_len]
        priority = rng.choice(list(Priority))
        s.add_request(Request(f"r{next_id}", prompt, SamplingParams(max_tokens=rng.randint(1, 12)), priority=priority))
        next_id += 1

    def abort_one() -> None:
        live = [r for r in (s.get_request(f"r{i}") for i in range(next_id)) if r is not None]
        if live:
            assert s.abort_request(rng.choice(live).request_id)

    def one_step() -> SchedulerOutput:
        was_busy = s.has_unfinished
        out = s.schedule()
        s.check_integrity()
        assert was_busy == (not out.is_empty), "a step with unfinished requests scheduled nothing"
        ids = [x.request.request_id for x in out.scheduled]
        assert len(ids) == len(set(ids)) and not set(ids) & set(out.preempted_ids)
        assert out.num_batched_tokens == sum(x.num_new_tokens for x in out.scheduled) <= budget
        assert all(x.num_new_tokens >= 1 for x in out.scheduled)
        assert s.num_running <= config.max_num_seqs
        for x in out.scheduled:
            assert len(x.block_ids) * bs >= x.request.num_computed_tokens + x.num_new_tokens
            assert x.request.num_computed_tokens + x.num_new_tokens <= x.request.num_tokens
        fake.run(out)  # the runner executes the whole step, even for requests aborted meanwhile
        if rng.random() < 0.05:
            abort_one()
        got = s.update(out, {x.request.request_id: rng.randrange(3) for x in out.scheduled if x.samples})
        for r in got:  # the engine's stop checks
            if r.num_output_tokens >= r.sampling_params.max_tokens or r.num_tokens >= max_model_len:
                s.finish_request(r.request_id, RequestStatus.FINISHED_LENGTH)
            elif rng.random() < 0.05:
                s.finish_request(r.request_id, RequestStatus.FINISHED_STOPPED)
        s.check_integrity()
        return out

    preemptions = 0
    for _ in range(400):
        for _ in range(rng.choice([0, 0, 1, 1, 2])):
            add()
        if rng.random() < 0.05:
            abort_one()
        if rng.random() < 0.01:
            kv.reset_prefix_cache()
        preemptions += len(one_step().preempted_ids)
    for _ in range(2000):  # drain: everything must finish, nothing may hang
        if not s.has_unfinished:
            break
        one_step()
    assert not s.has_unfinished
    assert kv.usage == 0.0 and kv.num_free_blocks == num_blocks and kv.request_ids() == []
    assert next_id > 100
    s.check_integrity()
