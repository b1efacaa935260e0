"""How many drafts a step takes (spec/adaptive.py): the step-cost fit, per-sequence acceptance, and
the plan that adds drafts while they raise expected tokens per second."""

from __future__ import annotations

import pytest

from leanserve.spec.adaptive import Acceptance, StepCostModel, plan_drafts


def test_step_cost_fit_recovers_a_and_b():
    m = StepCostModel(decay=1.0)
    assert m.coefficients() is None
    for n in (1, 5, 9, 1, 5, 9):
        m.observe(n, 0.010 + 0.003 * n)
    a, b = m.coefficients()
    assert a == pytest.approx(0.010) and b == pytest.approx(0.003)


def test_step_cost_uses_the_prior_slope_until_sizes_differ():
    m = StepCostModel(decay=1.0, prior_slope=0.25)
    for _ in range(10):
        m.observe(1, 0.0125)
    a, b = m.coefficients()
    assert a == pytest.approx(0.010) and b == pytest.approx(0.0025)  # a + b = the measured 12.5 ms


def test_step_cost_forgets_old_steps():
    m = StepCostModel(decay=0.5)
    for _ in range(30):
        m.observe(1, 1.0)
        m.observe(5, 2.0)
    for _ in range(30):
        m.observe(1, 0.5)
        m.observe(5, 0.9)
    a, b = m.coefficients()
    assert a == pytest.approx(0.4, abs=1e-3) and b == pytest.approx(0.1, abs=1e-3)


def test_acceptance_counts_tries_up_to_the_first_rejection_and_drifts_back_when_idle():
    acc = Acceptance(decay=1.0, prior_weight=1.0)
    assert acc.value(0.5) == 0.5
    acc.update(4, 4)  # all stood: 4 of 4 tried
    acc.update(4, 1)  # one stood, the second failed: 1 of 2 tried
    assert (acc.hits, acc.trials) == (5, 6)
    assert acc.value(0.5) == pytest.approx(5.5 / 7)
    low = Acceptance(decay=0.5)
    low.update(4, 0)
    before = low.value(0.6)
    for _ in range(20):
        low.idle()
    assert before < 0.4 and low.value(0.6) == pytest.approx(0.6, abs=1e-4)


def test_plan_memory_bound_single_sequence_takes_drafts_by_acceptance():
    # one sequence, a = 10 ms, b = 3 ms: the j-th draft pays while alpha^j * T > b * Y. At 0.9 the
    # 6th: 0.531 * 28 = 14.9 > 3 * 4.69 = 14.1; the 7th: 0.478 * 31 = 14.8 < 3 * 5.22 = 15.7
    assert plan_drafts([0.9], [8], 1, 0.010, 0.003) == [6]
    assert plan_drafts([0.6], [8], 1, 0.010, 0.003) == [2]
    assert plan_drafts([0.2], [8], 1, 0.010, 0.003) == [0]
    assert plan_drafts([0.9], [3], 1, 0.010, 0.003) == [3]  # never past the sequence's room


def test_plan_compute_bound_batch_takes_none_and_likeliest_go_first():
    # 64 tokens already in the step: a draft must be near-certain to pay
    assert plan_drafts([0.7, 0.7], [4, 4], 64, 0.010, 0.003) == [0, 0]
    # two sequences, one good one bad: the good one's drafts come first
    ks = plan_drafts([0.9, 0.3], [4, 4], 2, 0.010, 0.003)
    assert ks[0] >= 3 and ks[1] == 0


def test_plan_counts_what_proposing_costs():
    free = plan_drafts([0.8], [8], 1, 0.010, 0.003)
    dear = plan_drafts([0.8], [8], 1, 0.010, 0.003, draft_cost=0.006)
    assert free[0] > dear[0] >= 0
