"""Is a difference between two runs real? Paired statistics on the items both runs scored.

- `paired_bootstrap_diff`: 95% CI of mean(B) - mean(A) (accuracy, exact match), items resampled
  with replacement, the same resample for both runs (paired), percentile interval.
- `paired_bootstrap_ppl_ratio`: 95% CI of perplexity(B) / perplexity(A), resampling windows or
  documents with their NLL and token counts (perplexity = exp(sum NLL / sum tokens)).
- `mcnemar_exact`: McNemar's exact two-sided p-value for paired right/wrong outcomes: only the
  discordant items count (b: right in A only, c: right in B only); under "no difference" each is
  equally likely, so p = min(1, 2 * P(Binomial(b + c, 1/2) <= min(b, c))).

Seeded, so the same inputs give the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

RESAMPLES = 2000
CONFIDENCE = 0.95
_CHUNK = 250  # resamples drawn at once (bounds memory: CHUNK x items indices)


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    confidence: float = CONFIDENCE
    resamples: int = RESAMPLES

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class McNemar:
    only_a: int  # b: right in A, wrong in B
    only_b: int  # c: wrong in A, right in B
    p_value: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _resampled_indices(n: int, resamples: int, seed: int):
    """Index arrays of shape (chunk, n), ``resamples`` rows in all, from one seeded generator."""
    rng = np.random.default_rng(seed)
    left = resamples
    while left > 0:
        k = min(_CHUNK, left)
        yield rng.integers(0, n, size=(k, n))
        left -= k


def _interval(estimate: float, samples: np.ndarray, confidence: float, resamples: int) -> Interval:
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])  # linear interpolation
    return Interval(float(estimate), float(low), float(high), confidence, resamples)


def paired_bootstrap_diff(a: Sequence[float], b: Sequence[float], resamples: int = RESAMPLES, seed: int = 0,
                          confidence: float = CONFIDENCE) -> Interval:
    """mean(b) - mean(a) over paired items, with its bootstrap percentile interval."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired samples must be non-empty and of one length, got {len(a)} and {len(b)}")
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    samples = np.concatenate([d[idx].mean(axis=1) for idx in _resampled_indices(len(d), resamples, seed)])
    return _interval(float(d.mean()), samples, confidence, resamples)


def perplexity(nll: Sequence[float], tokens: Sequence[int]) -> float:
    n = sum(tokens)
    return math.exp(sum(nll) / n) if n else math.nan


def paired_bootstrap_ppl_ratio(nll_a: Sequence[float], tokens_a: Sequence[int], nll_b: Sequence[float],
                               tokens_b: Sequence[int], resamples: int = RESAMPLES, seed: int = 0,
                               confidence: float = CONFIDENCE) -> Interval:
    """perplexity(B) / perplexity(A) over paired windows or documents, with its bootstrap interval."""
    n = len(nll_a)
    if not n or any(len(x) != n for x in (tokens_a, nll_b, tokens_b)):
        raise ValueError("paired perplexity samples must be non-empty and of one length")
    na, ta = np.asarray(nll_a, dtype=np.float64), np.asarray(tokens_a, dtype=np.float64)
    nb, tb = np.asarray(nll_b, dtype=np.float64), np.asarray(tokens_b, dtype=np.float64)

    def log_ratio(sa: Any, sta: Any, sb: Any, stb: Any) -> Any:
        return sb / stb - sa / sta  # log(ppl_b / ppl_a)

    estimate = math.exp(log_ratio(na.sum(), ta.sum(), nb.sum(), tb.sum()))
    parts = []
    for idx in _resampled_indices(n, resamples, seed):
        with np.errstate(invalid="ignore", divide="ignore"):
            parts.append(np.exp(log_ratio(na[idx].sum(1), ta[idx].sum(1), nb[idx].sum(1), tb[idx].sum(1))))
    samples = np.concatenate(parts)
    samples = samples[np.isfinite(samples)]  # a resample of only empty documents has no perplexity
    if samples.size == 0:
        return Interval(estimate, math.nan, math.nan, confidence, resamples)
    return _interval(estimate, samples, confidence, resamples)


def mcnemar_exact(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> McNemar:
    """McNemar's exact (binomial) two-sided test on paired right/wrong outcomes."""
    if len(a_correct) != len(b_correct):
        raise ValueError(f"paired outcomes must be of one length, got {len(a_correct)} and {len(b_correct)}")
    only_a = sum(1 for x, y in zip(a_correct, b_correct) if x and not y)
    only_b = sum(1 for x, y in zip(a_correct, b_correct) if y and not x)
    n = only_a + only_b
    if n == 0:
        return McNemar(0, 0, 1.0)
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1))
    return McNemar(only_a, only_b, min(1.0, 2 * tail / 2**n))
