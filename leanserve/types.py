"""Plain data passed between layers. No torch import here.

The one counting model: every request has ``num_computed_tokens`` catching up with
``num_tokens`` (prompt + generated so far). Prefill, chunked prefill, prefix-cache hits,
preemption (which resets ``num_computed_tokens`` to 0) and decode are the same arithmetic.
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import Any


class Priority(enum.IntEnum):
    """Lower value is served first. ``BATCH`` work fills idle capacity and is preempted first."""

    INTERACTIVE = 0
    BATCH = 1


# The valid range of each numeric sampling field, written once: SamplingParams checks them, the HTTP
# schema (serve/protocol.py) is built from them, so the engine refuses exactly what the server does.
# (low, high, low_inclusive). Ranges follow OpenAI where it has the field, vLLM otherwise, and shut out
# values that only produce garbage (a repetition penalty of 1e-300 divides logits by zero).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MAX = 2**31 - 1
MAX_N = 16  # choices per request: each one is a sequence in the batch and counts toward admission
MAX_LOGPROBS = 20  # top alternatives per token (OpenAI: 5 for completions, 20 for chat)
MAX_STOP_SEQUENCES = 4  # as OpenAI
MAX_STOP_CHARS = 1024  # per stop string: a streamed response holds back that many characters
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS = 1024  # entries
GREEDY_TEMPERATURE = 1e-5  # below this a temperature is greedy (vLLM's epsilon): 1e-45 would overflow
BOUNDS: dict[str, tuple[float, float, bool]] = {
    "n": (1, MAX_N, True),
    "max_tokens": (1, INT32_MAX, True),
    "min_tokens": (0, INT32_MAX, True),
    "temperature": (0.0, 2.0, True),
    "top_p": (0.0, 1.0, False),  # (0, 1]: tiny values keep only the most likely token
    "top_k": (-1, INT32_MAX, True),  # -1 or 0: off; past the vocabulary: off
    "min_p": (0.0, 1.0, True),
    "presence_penalty": (-2.0, 2.0, True),
    "frequency_penalty": (-2.0, 2.0, True),
    "repetition_penalty": (0.01, 10.0, True),
    "logprobs": (0, MAX_LOGPROBS, True),
    "prompt_logprobs": (0, MAX_LOGPROBS, True),
    "prompt_logprobs_start": (0, INT32_MAX, True),
    "seed": (INT64_MIN, INT64_MAX, True),
    "logit_bias": (-100.0, 100.0, True),  # each value
}


def in_bounds(name: str, value: float) -> bool:
    lo, hi, lo_inclusive = BOUNDS[name]
    return (lo <= value if lo_inclusive else lo < value) and value <= hi


def bounds_text(name: str) -> str:
    lo, hi, lo_inclusive = BOUNDS[name]
    return f"{'[' if lo_inclusive else '('}{_num(lo)}, {_num(hi)}]"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclass(frozen=True)
class SamplingParams:
    """What to generate and when to stop; validated on construction (ValueError names the field)."""

    n: int = 1
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    temperature: float = 1.0  # below GREEDY_TEMPERATURE: greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs to return per token (0: only the chosen)
    include_stop_str_in_output: bool = False
    # log-probabilities of the prompt's own tokens (vLLM's prompt_logprobs: the top-N alternatives
    # too), for prompt tokens from prompt_logprobs_start on; tokens before it may come from the
    # prefix cache and get none (the first token never has one)
    prompt_logprobs: int | None = None
    prompt_logprobs_start: int = 0
    # an embedding of the prompt (/v1/embeddings): the mean of its tokens' final hidden states, L2-
    # normalized; every prompt token is computed (none from the prefix cache)
    embed: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        for name in ("n", "max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "presence_penalty",
                     "frequency_penalty", "repetition_penalty", "logprobs", "seed", "prompt_logprobs",
                     "prompt_logprobs_start"):
            v = getattr(self, name)
            if v is None and name in ("max_tokens", "logprobs", "seed", "prompt_logprobs"):
                continue
            is_int = name in ("n", "max_tokens", "min_tokens", "top_k", "logprobs", "seed", "prompt_logprobs",
                              "prompt_logprobs_start")
            ok_type = isinstance(v, int) if is_int else isinstance(v, int | float)
            _check(ok_type and not isinstance(v, bool), name, f"must be {'an integer' if is_int else 'a number'}, "
                                                              f"got {v!r}")
            _check(math.isfinite(v) and in_bounds(name, v), name, f"must be in {bounds_text(name)}, got {v}")
        _check(self.top_k in (-1, 0) or self.top_k >= 1, "top_k", f"must be -1 (disabled) or >= 0, got {self.top_k}")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
               f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        if self.logit_bias:
            _check(len(self.logit_bias) <= MAX_LOGIT_BIAS, "logit_bias",
                   f"at most {MAX_LOGIT_BIAS} entries are allowed, got {len(self.logit_bias)}")
            for tok, bias in self.logit_bias.items():
                _check(isinstance(tok, int) and not isinstance(tok, bool) and tok >= 0, "logit_bias",
                       f"keys must be token ids >= 0, got {tok!r}")
                _check(isinstance(bias, int | float) and math.isfinite(bias) and in_bounds("logit_bias", bias),
                       "logit_bias", f"values must be in {bounds_text('logit_bias')}, got {bias}")
        _check(len(self.stop) <= MAX_STOP_SEQUENCES, "stop",
               f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(self.stop)}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "stop strings must be non-empty strings")
        _check(all(len(s) <= MAX_STOP_CHARS for s in self.stop), "stop",
               f"stop strings must be at most {MAX_STOP_CHARS} characters")
        _check(len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS, "stop_token_ids",
               f"at most {MAX_STOP_TOKEN_IDS} ids are allowed, got {len(self.stop_token_ids)}")
        _check(all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= INT32_MAX for t in self.stop_token_ids),
               "stop_token_ids", "must be token ids >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name} {message}")


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort", "error")


@dataclass(eq=False)
class Request:
    """One sequence being generated. ``n > 1`` is fanned out into n Requests by the engine."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    priority: Priority = Priority.INTERACTIVE
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prompt tokens found in the prefix cache at first scheduling; -1: not yet
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    tenant: str | None = None  # who sent it (an API key's name), for anything shared across requests
    # draft tokens for the next step (speculative decoding): not part of the sequence until verified
    spec_token_ids: list[int] = field(default_factory=list)
    # the draft distributions they were drawn from ((k, vocab), a draft model's), or None: point drafts
    spec_draft_probs: Any = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def max_cached_tokens(self) -> int:
        """Tokens the prefix cache may supply: never the last (a step must run the model to sample),
        nor any position whose logits a prompt logprob needs."""
        limit = self.num_tokens - 1
        p = self.sampling_params
        if p.prompt_logprobs is not None:
            limit = min(limit, max(p.prompt_logprobs_start, 1) - 1)
        if p.embed:
            limit = 0
        return limit


@dataclass
class ScheduledRequest:
    """One request's share of a step: compute tokens [num_computed_tokens, +num_new_tokens)."""

    request: Request
    num_new_tokens: int  # draft tokens included
    block_ids: list[int]  # the request's whole block table after this step's allocation
    spec_token_ids: list[int] = field(default_factory=list)  # the last len() new tokens: drafts to verify

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the known tokens (and its drafts), so the step
        samples: one token per draft plus one."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens + len(self.spec_token_ids)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)
    num_batched_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token_id, logprob) of the top-n alternatives, best first
    rank: int | None = None  # 1 + how many tokens were likelier (prompt logprobs); 1: the argmax


@dataclass
class StepOutput:
    """The runner's answer to one SchedulerOutput: a sampled token for each request that samples."""

    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)
    # speculative decoding: the drafts the target accepted, which come before the sampled token
    accepted: dict[str, list[int]] = field(default_factory=dict)
    accepted_logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)
    # request id -> (prompt index, logprob of that prompt token given the ones before it)
    prompt_logprobs: dict[str, list[tuple[int, TokenLogprob]]] = field(default_factory=dict)
    # request id -> its prompt's embedding, in the step that computed the prompt's last token
    embeddings: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" | None while running
    logprobs: list[TokenLogprob] | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended it


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    finished: bool = False
    error: str | None = None
    machine_seconds: float = 0.0  # engine time charged to this request so far (leanserve.cost.meter)
    prefill_seconds: float = 0.0  # of machine_seconds, the share of its prompt tokens (the rest: decode)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token when asked for
    # speculative decoding, summed over the choices: draft tokens the target verified, and accepted
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    embedding: list[float] | None = None  # with SamplingParams.embed, once the prompt is computed

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)
