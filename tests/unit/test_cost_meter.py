"""The attribution rule of the cost meter, pinned with exact numbers."""

from __future__ import annotations

import pytest

from leanserve.cost.meter import CostMeter


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_step_time_splits_by_tokens_computed():
    m = CostMeter(FakeClock())
    m.record_step(0.9, {"a": 8, "b": 1})  # a prefill chunk of 8 beside one decode token
    assert m.charged("a") == pytest.approx(0.8)
    assert m.charged("b") == pytest.approx(0.1)
    m.record_step(0.2, {"a": 1, "b": 1})
    assert m.charged("a") == pytest.approx(0.9)
    assert m.charged("b") == pytest.approx(0.2)


def test_charges_sum_to_busy_time_and_idle_is_the_rest():
    clock = FakeClock()
    m = CostMeter(clock)
    steps = [(0.31, {"a": 5, "b": 3}), (0.07, {"b": 1, "c": 1}), (0.5, {"c": 16})]
    for seconds, tokens in steps:
        m.record_step(seconds, tokens)
    clock.t += 2.0
    snap = m.snapshot()
    assert snap.busy_seconds == pytest.approx(0.88)
    assert sum(m.charged(r) for r in "abc") == pytest.approx(snap.busy_seconds)
    assert snap.idle_seconds == pytest.approx(2.0 - 0.88)
    assert snap.utilization == pytest.approx(0.44)
    assert snap.steps == 3


def test_pop_forgets_and_unknown_is_free():
    m = CostMeter(FakeClock())
    m.record_step(1.0, {"a": 1})
    assert m.pop("a") == pytest.approx(1.0)
    assert m.charged("a") == 0.0 and m.pop("a") == 0.0


def test_empty_step_is_busy_but_charges_nobody():
    m = CostMeter(FakeClock())
    m.record_step(0.25, {})
    assert m.snapshot().busy_seconds == pytest.approx(0.25)
    with pytest.raises(ValueError):
        m.record_step(-1.0, {"a": 1})


def test_prefill_and_decode_shares_split_each_request_charge():
    m = CostMeter(FakeClock())
    # a: 6 prompt tokens + nothing else; b: 1 decode token; c: last 2 prompt tokens + its first decode token
    m.record_step(1.0, {"a": 6, "b": 1, "c": 3}, {"a": 6, "c": 2})
    assert m.charged("a") == pytest.approx(0.6) and m.charged_prefill("a") == pytest.approx(0.6)
    assert m.charged("b") == pytest.approx(0.1) and m.charged_prefill("b") == 0.0
    assert m.charged("c") == pytest.approx(0.3) and m.charged_prefill("c") == pytest.approx(0.2)
    snap = m.snapshot()
    assert (snap.prefill_tokens, snap.decode_tokens, snap.tokens_computed) == (8, 2, 10)
    assert snap.prefill_seconds == pytest.approx(0.8) and snap.decode_seconds == pytest.approx(0.2)
    assert m.pop_split("c") == pytest.approx((0.3, 0.2))
    assert m.charged_prefill("c") == 0.0 and m.charged("c") == 0.0
    m.record_step(0.5, {"a": 1})  # no prefill map: all decode; the existing API is unchanged
    assert m.charged_prefill("a") == pytest.approx(0.6) and m.charged("a") == pytest.approx(1.1)


def test_snapshot_over_a_window_counts_only_recent_steps():
    clock = FakeClock()
    m = CostMeter(clock)
    m.record_step(0.5, {"a": 4}, {"a": 4})
    clock.t += 100
    m.record_step(0.25, {"a": 1})
    w = m.snapshot(window=10)
    assert (w.busy_seconds, w.steps, w.prefill_tokens, w.decode_tokens) == (0.25, 1, 0, 1)
    assert w.wall_seconds == 10 and w.utilization == pytest.approx(0.025)
    total = m.snapshot()
    assert total.busy_seconds == 0.75 and total.steps == 2 and total.wall_seconds == pytest.approx(100)
    with pytest.raises(ValueError):
        m.snapshot(window=0)
