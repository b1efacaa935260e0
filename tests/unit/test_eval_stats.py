"""Paired statistics pinned to cases worked out by hand: McNemar's exact p, bootstrap intervals whose
every resample gives the same value, and a two-item case whose resample distribution is known."""

from __future__ import annotations

import math

import pytest

from leanserve.eval.stats import mcnemar_exact, paired_bootstrap_diff, paired_bootstrap_ppl_ratio, perplexity


def outcomes(both: int, only_a: int, only_b: int, neither: int) -> tuple[list[bool], list[bool]]:
    a = [True] * both + [True] * only_a + [False] * only_b + [False] * neither
    b = [True] * both + [False] * only_a + [True] * only_b + [False] * neither
    return a, b


@pytest.mark.parametrize("only_a, only_b, p", [
    (10, 2, 2 * (1 + 12 + 66) / 2**12),  # = 0.0386: 2 x P(Binomial(12, 1/2) <= 2)
    (2, 10, 2 * (1 + 12 + 66) / 2**12),  # symmetric
    (0, 6, 2 / 2**6),  # = 0.03125
    (5, 5, 1.0),  # 2 x P(X <= 5) > 1: capped at 1
    (0, 0, 1.0),  # no discordant pair: no evidence of a difference
    (1, 0, 1.0),
])
def test_mcnemar_exact_binomial(only_a, only_b, p):
    a, b = outcomes(7, only_a, only_b, 4)  # concordant pairs do not count
    result = mcnemar_exact(a, b)
    assert (result.only_a, result.only_b) == (only_a, only_b)
    assert result.p_value == pytest.approx(p, abs=1e-15)


def test_mcnemar_b10_c2_is_0_0386():
    assert round(mcnemar_exact(*outcomes(0, 10, 2, 0)).p_value, 4) == 0.0386


def test_bootstrap_of_identical_runs_is_zero():
    a = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    ci = paired_bootstrap_diff(a, list(a))
    assert (ci.estimate, ci.low, ci.high) == (0.0, 0.0, 0.0)


def test_bootstrap_of_a_constant_paired_difference_is_that_difference():
    a = [0.0, 1.0, 0.0, 0.0, 1.0]
    ci = paired_bootstrap_diff(a, [x + 0.25 for x in a])  # every item, so every resample, differs by 0.25
    assert (ci.estimate, ci.low, ci.high) == (0.25, 0.25, 0.25)


def test_bootstrap_two_items_known_distribution():
    # differences (0, 1): a resample's mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so the 2.5% and
    # 97.5% percentiles of 2000 resamples are 0 and 1 (each end has ~500 resamples, far above 50)
    ci = paired_bootstrap_diff([0.0, 0.0], [0.0, 1.0])
    assert (ci.estimate, ci.low, ci.high) == (0.5, 0.0, 1.0)


def test_bootstrap_is_seeded():
    a = [float(i % 2) for i in range(40)]
    b = [float(i % 3 == 0) for i in range(40)]
    first = paired_bootstrap_diff(a, b, seed=1)
    assert paired_bootstrap_diff(a, b, seed=1) == first
    assert paired_bootstrap_diff(a, b, seed=2) != first
    assert first.low < first.estimate < first.high


def test_perplexity_ratio_identical_and_doubled():
    nll, tokens = [10.0, 3.5, 7.25], [5, 2, 4]
    same = paired_bootstrap_ppl_ratio(nll, tokens, nll, tokens)
    assert (same.estimate, same.low, same.high) == (1.0, 1.0, 1.0)
    # B's NLL is A's + ln 2 per token, in every item: every resample's perplexity ratio is exactly 2
    doubled = paired_bootstrap_ppl_ratio(nll, tokens, [n + t * math.log(2) for n, t in zip(nll, tokens)], tokens)
    assert doubled.estimate == pytest.approx(2.0, rel=1e-12)
    assert doubled.low == pytest.approx(2.0, rel=1e-12) and doubled.high == pytest.approx(2.0, rel=1e-12)
    assert perplexity(nll, tokens) == pytest.approx(math.exp(20.75 / 11))


def test_paired_samples_must_match():
    with pytest.raises(ValueError, match="one length"):
        paired_bootstrap_diff([1.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="one length"):
        mcnemar_exact([True], [True, False])
    with pytest.raises(ValueError):
        paired_bootstrap_ppl_ratio([1.0], [1], [1.0, 2.0], [1, 1])
