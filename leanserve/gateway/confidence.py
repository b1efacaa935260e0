"""How sure a model was of its answer, from the log-probabilities of the tokens it chose.

A cascade (gateway/cascade.py) accepts the cheapest model's answer when its score reaches the
route's threshold, and `leanserve eval cascade` picks that threshold; both use these functions, so
the threshold measured offline means the same thing in the server.

    score = SCORES[name](token_logprobs)        # higher: more confident; -inf: nothing to judge

Scores (pluggable: add a function to SCORES):

* ``mean_logprob``: the mean log-probability of the answer's tokens (the geometric mean probability
  in log space); long answers are not punished for their length.
* ``min_logprob``: the least likely token's log-probability; one doubtful token sends the request on.

An answer with no tokens, or whose text is empty or only whitespace, scores -inf (it is never
accepted): a model that stops at once emits one end-of-sequence token, often confidently, and there
is nothing to accept (measured: SmolLM2-135M stops at once on 1,584 of 3,000 TriviaQA questions).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

ScoreFn = Callable[[Sequence[float]], float]


def mean_logprob(logprobs: Sequence[float]) -> float:
    return math.fsum(logprobs) / len(logprobs) if logprobs else -math.inf


def min_logprob(logprobs: Sequence[float]) -> float:
    return min(logprobs) if logprobs else -math.inf


SCORES: dict[str, ScoreFn] = {"mean_logprob": mean_logprob, "min_logprob": min_logprob}
DEFAULT_SCORE = "mean_logprob"


def get_score(name: str) -> ScoreFn:
    try:
        return SCORES[name]
    except KeyError:
        raise ValueError(f"unknown confidence score {name!r}; one of: {', '.join(sorted(SCORES))}") from None


def answer_score(name: str, text: str, logprobs: Sequence[float]) -> float:
    """Score ``name`` of an answer: -inf when its text is empty or whitespace, else over its tokens."""
    if not text.strip():
        return -math.inf
    return get_score(name)(logprobs)


def choice_text(endpoint: str, response: dict[str, Any], index: int = 0) -> str:
    """The text of choice ``index`` of a response ("chat": message.content; "completions": text)."""
    choice = next((c for c in response.get("choices") or [] if c.get("index", 0) == index), None) or {}
    if endpoint == "chat":
        return (choice.get("message") or {}).get("content") or ""
    return choice.get("text") or ""


def token_logprobs(endpoint: str, response: dict[str, Any], index: int = 0) -> list[float]:
    """The chosen tokens' log-probabilities of choice ``index`` of a response (OpenAI's shapes):
    ``chat``: choices[i].logprobs.content[*].logprob; ``completions``: choices[i].logprobs.token_logprobs.
    Tokens without a number (None) are skipped. An answer without logprobs gives []."""
    choices = response.get("choices") or []
    choice = next((c for c in choices if c.get("index", 0) == index), None)
    lp = (choice or {}).get("logprobs") or {}
    if endpoint == "chat":
        values = [e.get("logprob") for e in (lp.get("content") or [])]
    else:
        values = list(lp.get("token_logprobs") or [])
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)]
