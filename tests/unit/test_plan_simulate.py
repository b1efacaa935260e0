"""The simulator replays engine/scheduler.py's policy: pinned step by step with a constant-time step."""

from __future__ import annotations

import pytest

from leanserve.plan.roofline import ModelShape, Step
from leanserve.plan.simulate import Limits, SimRequest, percentile, simulate

SHAPE = ModelShape("tiny", 2, 8, 16, 2, 1, 4, 10)
WINDOWED = ModelShape("tiny-sw", 2, 8, 16, 2, 1, 4, 10, layer_windows=(None, 4))


class Recorder:
    """Every step the simulator times, each taking one second."""

    def __init__(self) -> None:
        self.steps: list[Step] = []

    def __call__(self, step: Step) -> float:
        self.steps.append(step)
        return 1.0


def test_one_request_chunked_prefill_then_decode():
    rec = Recorder()
    r = SimRequest(0.0, prompt=10, output=3)
    res = simulate(SHAPE, rec, Limits(max_num_batched_tokens=4), [r])
    # chunks of 4, 4 and 2 tokens; the last one samples the first token; two decode steps
    assert rec.steps == [Step(0, (0,), ((0, 4, False),)), Step(0, (0,), ((4, 4, False),)),
                         Step(0, (0,), ((8, 2, True),)), Step(1, (11,), ()), Step(1, (12,), ())]
    assert (r.first_token, r.finish, r.ttft, r.tpot) == (3.0, 5.0, 3.0, 1.0)
    s = res.summary()
    assert s["output_throughput"] == pytest.approx(3 / 5)
    assert s["mean_batch"] == 1.0 and res.steps == 5


def test_decodes_first_then_prompts_in_arrival_order():
    rec = Recorder()
    a, b = SimRequest(0.0, 3, 2), SimRequest(0.0, 3, 2)
    simulate(SHAPE, rec, Limits(max_num_batched_tokens=4), [a, b])
    assert rec.steps == [
        Step(0, (0,), ((0, 3, True), (0, 1, False))),  # a whole, b gets the budget's last token
        Step(1, (4,), ((1, 2, True),)),  # a decodes at context 4, b's prompt ends
        Step(1, (4,), ()),  # b decodes
    ]
    assert (a.first_token, a.finish, b.first_token, b.finish) == (1.0, 2.0, 2.0, 3.0)


def test_sliding_window_contexts():
    rec = Recorder()
    simulate(WINDOWED, rec, Limits(), [SimRequest(0.0, 5, 3)])
    # decode contexts 6 and 7; the windowed layer reads at most 4
    assert [s.decode_kv for s in rec.steps[1:]] == [(6, 4), (7, 4)]


def test_seats_limit_admissions():
    rec = Recorder()
    reqs = [SimRequest(0.0, 2, 2) for _ in range(3)]
    simulate(SHAPE, rec, Limits(max_num_seqs=2), reqs)
    assert rec.steps[0] == Step(0, (0,), ((0, 2, True), (0, 2, True)))  # the third waits for a seat
    assert reqs[2].first_token == 3.0  # admitted after the first two finish at t=2


def test_prefix_cache_hit_skips_whole_blocks():
    rec = Recorder()
    r = SimRequest(0.0, prompt=10, output=1, cached=9)
    simulate(SHAPE, rec, Limits(block_size=4), [r])
    assert rec.steps == [Step(0, (0,), ((8, 2, True),))]  # 9 cached tokens = 2 whole blocks of 4
    full = SimRequest(0.0, prompt=8, output=1, cached=8)
    rec2 = Recorder()
    simulate(SHAPE, rec2, Limits(block_size=4), [full])
    assert rec2.steps == [Step(0, (0,), ((4, 4, True),))]  # the last block is computed to sample


def test_preemption_when_the_kv_cache_runs_out():
    rec = Recorder()
    # 4 blocks of 2 tokens: both prompts (2 tokens each) fit; decoding needs a block each at once
    a, b = SimRequest(0.0, 2, 4), SimRequest(0.0, 2, 4)
    res = simulate(SHAPE, rec, Limits(kv_cache_tokens=8, block_size=2), [a, b])
    assert res.preemptions >= 1
    assert a.finish is not None and b.finish is not None  # both still complete
    assert b.preemptions >= 1 and a.preemptions == 0  # the newest is the one preempted
    assert sum(1 for s in rec.steps for p in s.prefill if p[0] == 0 and p[1] > 2) >= 1  # b recomputed its tokens


def test_closed_loop_clients_send_the_next_request_when_one_ends():
    rec = Recorder()
    reqs = [SimRequest(0.0, 2, 1) for _ in range(4)]
    res = simulate(SHAPE, rec, Limits(), reqs, concurrency=2)
    assert [r.arrival for r in reqs] == [0.0, 0.0, 1.0, 1.0]
    assert [r.finish for r in reqs] == [1.0, 1.0, 2.0, 2.0]
    assert res.duration_s == 2.0


def test_open_loop_arrivals_and_idle_gaps():
    rec = Recorder()
    reqs = [SimRequest(5.0, 2, 1), SimRequest(0.0, 2, 1)]
    res = simulate(SHAPE, rec, Limits(), reqs)
    assert (reqs[1].finish, reqs[0].finish) == (1.0, 6.0)  # the idle machine waits for the next arrival
    assert res.busy_s == 2.0 and res.duration_s == 6.0
    assert res.summary()["utilization"] == pytest.approx(2 / 6)


def test_a_prompt_larger_than_the_cache_never_runs():
    res = simulate(SHAPE, Recorder(), Limits(kv_cache_tokens=8, block_size=4), [SimRequest(0.0, 20, 1)])
    assert res.requests[0].finish is None and res.summary()["completed"] == 0


def test_percentile():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6)
    with pytest.raises(ValueError):
        percentile([], 50)
