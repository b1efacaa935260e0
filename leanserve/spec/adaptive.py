"""How many drafts each sequence gets in a step, from measurement. Torch-free.

A step's time is close to ``a + b * tokens`` (``StepCostModel`` fits a and b to the engine's own
recent decode steps). A draft token costs ``b`` in the step (plus what proposing it costs) and
yields a token with the probability that it and every draft before it are accepted: ``alpha^j``
for the j-th draft of a sequence whose drafts stand with probability ``alpha``
(``Acceptance``, per sequence). ``plan_drafts`` adds drafts, the likeliest first, while each one
raises the step's expected tokens per second. So a memory-bound step (one or a few sequences: ``a``
dominates) takes drafts even at modest acceptance, a compute-bound one (many tokens: ``b * tokens``
dominates) takes few or none, and a sequence whose drafts keep failing gets none.
"""

from __future__ import annotations

import heapq


class StepCostModel:
    """Least squares of step seconds on step tokens, each older step weighing ``decay`` less. Until
    the steps seen differ enough in size to tell the slope, ``b = prior_slope * a`` (a CPU decode
    step measured here: 5 tokens cost ~2x one, so b ~ 0.25-0.35 a)."""

    def __init__(self, decay: float = 0.98, prior_slope: float = 0.25) -> None:
        self.decay, self.prior_slope = decay, prior_slope
        self._w = self._x = self._y = self._xx = self._xy = 0.0
        self.num_steps = 0

    def observe(self, tokens: int, seconds: float) -> None:
        d = self.decay
        self._w = d * self._w + 1
        self._x = d * self._x + tokens
        self._y = d * self._y + seconds
        self._xx = d * self._xx + tokens * tokens
        self._xy = d * self._xy + tokens * seconds
        self.num_steps += 1

    def coefficients(self) -> tuple[float, float] | None:
        """(a, b) in seconds, or None before any step."""
        if self._w == 0:
            return None
        mx, my = self._x / self._w, self._y / self._w
        var = self._xx / self._w - mx * mx
        if var >= 0.5:  # steps of different sizes: fit the slope
            b = max(0.0, (self._xy / self._w - mx * my) / var)
            a = my - b * mx
            if a > 0:
                return a, b
        a = my / (1 + self.prior_slope * mx)
        return a, self.prior_slope * a


class Acceptance:
    """One sequence's chance that a draft token stands: accepted / tried, where a verify of k drafts
    with m accepted tried m + 1 of them (m if all stood), both sums forgetting (``decay`` per
    verify, and per step without drafts, so a sequence cut off drifts back to ``prior`` and tries again)."""

    def __init__(self, decay: float = 0.8, prior_weight: float = 1.0) -> None:
        self.decay, self.prior_weight = decay, prior_weight
        self.hits = self.trials = 0.0

    def update(self, k: int, accepted: int) -> None:
        self.hits = self.decay * self.hits + accepted
        self.trials = self.decay * self.trials + accepted + (1 if accepted < k else 0)

    def idle(self) -> None:
        self.hits *= self.decay
        self.trials *= self.decay

    def value(self, prior: float) -> float:
        return (self.hits + self.prior_weight * prior) / (self.trials + self.prior_weight)


def plan_drafts(alphas: list[float], limits: list[int], base_tokens: int, a: float, b: float,
                draft_cost: float = 0.0) -> list[int]:
    """Drafts per sequence for one step. ``base_tokens``: the step's tokens without drafts (each
    decoding sequence's one, prefill chunks), each worth one; the j-th draft of sequence i is worth
    ``alphas[i] ** j`` and costs ``b + draft_cost`` seconds. Greedy, likeliest first: a draft goes
    in while it raises expected tokens per second, (Y + g) / (T + c) > Y / T, i.e. g * T > c * Y."""
    ks = [0] * len(alphas)
    cost = b + draft_cost
    time, worth = a + b * base_tokens, float(base_tokens)
    heap = [(-al, i) for i, (al, lim) in enumerate(zip(alphas, limits)) if lim > 0 and al > 0]
    heapq.heapify(heap)
    while heap:
        neg_gain, i = heapq.heappop(heap)
        gain = -neg_gain
        if gain * time <= cost * worth:
            break  # the likeliest draft left does not pay: none after it does
        ks[i] += 1
        time += cost
        worth += gain
        if ks[i] < limits[i]:
            heapq.heappush(heap, (-(alphas[i] ** (ks[i] + 1)), i))
    return ks
