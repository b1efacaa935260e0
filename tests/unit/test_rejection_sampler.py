"""Speculative sampling's acceptance rule (sampling/rejection.py): the emitted token is distributed
as the target's own draw, whatever the draft distribution; without the correction step it is not."""

from __future__ import annotations

import pytest
import torch

from leanserve.sampling import rejection
from leanserve.sampling.rejection import rejection_sample, residual

N = 100_000
# chi-square critical value at p = 0.001 with 7 degrees of freedom (8 categories)
CHI2_CRIT_7DF = 24.322


def chi_square(tokens: torch.Tensor, p: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=p.numel()).double()
    expected = p.double() * tokens.numel()
    return float(((counts - expected) ** 2 / expected).sum())


def setup(k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    v = 8
    p = torch.softmax(torch.randn(k + 1, v, generator=g) * 1.5, dim=-1)
    q = torch.softmax(torch.randn(k, v, generator=g) * 1.5, dim=-1)  # a draft that disagrees with p
    drafts = torch.stack([torch.multinomial(q[i], N, replacement=True, generator=g) for i in range(k)], dim=1)
    return p, q, drafts


def first_emitted(p, q, drafts, seed=1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    accepted, nxt = rejection_sample(p.expand(N, -1, -1), q.expand(N, -1, -1), drafts, gen)
    return torch.where(accepted > 0, drafts[:, 0], nxt)


@pytest.mark.parametrize("k", [1, 3])
def test_first_token_follows_the_target_distribution(k):
    p, q, drafts = setup(k)
    stat = chi_square(first_emitted(p, q, drafts), p[0])
    assert stat < CHI2_CRIT_7DF, stat


def test_without_the_correction_step_it_does_not(monkeypatch):
    p, q, drafts = setup(1)
    monkeypatch.setattr(rejection, "residual", lambda p_, q_: p_)  # resample from p itself on rejection
    stat = chi_square(first_emitted(p, q, drafts), p[0])
    assert stat > 10 * CHI2_CRIT_7DF, stat


def test_second_token_after_an_accepted_first_follows_the_target():
    # drafts at row 1 come from q[1] whatever token 0 was (fixed rows): given the first draft stood,
    # the second emitted token must follow p[1]
    p, q, drafts = setup(2, seed=3)
    gen = torch.Generator().manual_seed(2)
    accepted, nxt = rejection_sample(p.expand(N, -1, -1), q.expand(N, -1, -1), drafts, gen)
    stood = accepted >= 1
    second = torch.where(accepted[stood] >= 2, drafts[stood, 1], nxt[stood])
    assert stood.sum() > 20_000
    assert chi_square(second, p[1]) < CHI2_CRIT_7DF


def test_acceptance_probability_is_min_one_p_over_q():
    p = torch.tensor([[[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]]])
    q = torch.tensor([[[0.25, 0.25, 0.5]]])
    gen = torch.Generator().manual_seed(0)
    n = 20_000
    # draft 0 (p >= q): always stands; draft 2 (p = 0): never, and the residual never gives 2
    acc0, _ = rejection_sample(p.expand(n, -1, -1), q.expand(n, -1, -1), torch.zeros(n, 1, dtype=torch.long), gen)
    assert bool((acc0 == 1).all())
    acc2, nxt2 = rejection_sample(p.expand(n, -1, -1), q.expand(n, -1, -1), torch.full((n, 1), 2), gen)
    assert bool((acc2 == 0).all()) and set(nxt2.tolist()) <= {0, 1}


def test_residual_is_the_normalized_positive_part_and_p_where_none():
    p = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    q = torch.tensor([[0.2, 0.3, 0.5], [0.2, 0.3, 0.5]])
    r = residual(p, q)
    assert r[0].tolist() == pytest.approx([1.0, 0.0, 0.0])
    assert r[1].tolist() == pytest.approx([0.2, 0.3, 0.5])  # p == q: nothing left over, p itself


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="shapes"):
        rejection_sample(torch.ones(1, 3, 4) / 4, torch.ones(1, 3, 4) / 4, torch.zeros(1, 2, dtype=torch.long))


def test_a_seeded_generator_makes_it_reproducible():
    p, q, drafts = setup(2)
    a = rejection_sample(p.expand(64, -1, -1), q.expand(64, -1, -1), drafts[:64], torch.Generator().manual_seed(5))
    b = rejection_sample(p.expand(64, -1, -1), q.expand(64, -1, -1), drafts[:64], torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
