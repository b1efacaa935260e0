"""What an evaluation needs from a model, whoever serves it: tokenize, score, generate, and what it cost.

Every task reduces to these three calls, so the scoring code is one path for every backend:

    tokenize(text)                     the model's token ids (BOS as the model adds it, if asked)
    score([ScoreRequest(ids, start)])  log p(ids[i] | ids[:i]) for i in [start, len(ids)), and
                                       whether each of those tokens was the argmax (greedy)
    generate([GenerateRequest(...)])   greedy text, cut at the first stop string, with the log-probability
                                       of each generated token and what that one request cost

Two backends implement it: `InProcessBackend` (the engine in this process, with its options) and
`ServerBackend` (any OpenAI-compatible server: prompt logprobs through ``echo`` + ``logprobs`` on
/v1/completions, tokens through /tokenize). Multiple-choice items share their context: requests
are sent in an order that lets the prefix cache compute each context once, and a scored request
asks only for the logprobs it needs (``start``), so the context may come from the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class ScoreRequest:
    token_ids: tuple[int, ...]  # context + continuation
    start: int  # score tokens [start, len(token_ids)); 1 <= start < len(token_ids)

    def __post_init__(self) -> None:
        if not 1 <= self.start < len(self.token_ids):
            raise ValueError(f"start must be in [1, {len(self.token_ids)}), got {self.start}")


@dataclass(frozen=True)
class Score:
    logprobs: tuple[float, ...]  # natural log, one per scored token
    greedy: bool  # every scored token was its position's most likely token

    @property
    def total(self) -> float:
        return sum(self.logprobs)


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    max_tokens: int
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Generation:
    """One greedy answer: its text, the log-probability of each token the model chose (in order,
    the end-of-sequence token too when one ended it: what a server returns as
    ``choices[0].logprobs.token_logprobs``), and what this request alone cost."""

    text: str
    token_logprobs: tuple[float, ...]  # natural log; () when the backend returned none
    usd: float | None = None  # None: unknown (a server that reports no usage.cost)
    machine_seconds: float | None = None  # None: unknown


@dataclass
class CostTally:
    """What the backend's calls cost so far, from the engine's meter or the server's ``usage.cost``."""

    machine_seconds: float = 0.0
    usd: float | None = 0.0  # None: the server reported no cost
    prompt_tokens: int = 0
    output_tokens: int = 0
    requests: int = 0
    wall_seconds: float = 0.0

    def add(self, other: CostTally) -> None:
        self.machine_seconds += other.machine_seconds
        self.usd = None if self.usd is None or other.usd is None else self.usd + other.usd
        self.prompt_tokens += other.prompt_tokens
        self.output_tokens += other.output_tokens
        self.requests += other.requests
        self.wall_seconds += other.wall_seconds


class EvalBackend(Protocol):
    max_length: int  # tokens a scored or generated sequence may hold (the model's context)

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def score(self, requests: list[ScoreRequest]) -> list[Score]: ...

    def generate(self, requests: list[GenerateRequest]) -> list[Generation]: ...

    def cost(self) -> CostTally: ...  # cumulative since the backend was made

    def describe(self) -> dict[str, Any]: ...  # the configuration to report beside the numbers

    def close(self) -> None: ...

