"""The contract between the server side (`AsyncEngine`) and an engine core (`LLMEngine`, or a test fake).

An engine core is driven from one thread. The caller adds requests (token ids, already validated
SamplingParams), calls ``step()`` while anything is unfinished, and aborts what its clients gave up
on. Everything the caller needs comes back in return values: no attribute to probe after a call,
no parsing of ids.

    add_request(id, prompt ids, params, priority)        ValueError (a message for the user) if it
                                                          can never run; nothing was queued then
    step() -> StepResult                                  outputs of the requests that progressed,
                                                          and the ids of every request it ran
    step() raises StepError(request_ids)                  the requests that step was running; the
                                                          core has already dropped them and is
                                                          consistent again (the caller fails them)
    abort_request(id, reason) -> RequestOutput | None     the request's final output (unfinished
                                                          choices end with ``reason``; its
                                                          machine-seconds final), None if unknown

A request leaves the core exactly once: in a finished output of ``step()``, in the return of
``abort_request``, or named by a ``StepError`` (whose ``outputs`` carry the final outputs of the
requests it names, with their machine-seconds). That is what lets the server bill every request
exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from leanserve.cost.meter import CostMeter
from leanserve.types import Priority, RequestOutput, SamplingParams

if TYPE_CHECKING:
    from leanserve.tokenizer import LeanTokenizer


@dataclass(frozen=True)
class ModelInfo:
    """What the server needs to know of the model an engine core serves (fixed once built)."""

    max_model_len: int  # prompt + output tokens of one request
    vocab_size: int  # width of the logits: token ids, logit_bias keys and stop_token_ids are below it
    kv_cache_tokens: int
    max_num_seqs: int  # sequences in one batch
    dtype: str  # "bfloat16", "float32", ...
    device: str  # "cpu", "cuda:0", ...
    num_params: int = 0  # of the weights, for achieved FLOP/s
    weight_bytes: int = 0  # bytes a step reads, for achieved bandwidth
    hidden_size: int = 0  # the width of a prompt embedding (SamplingParams.embed)
    # small steps read the weights' quantized blocks (CPU, GGUF): ((rows, bytes), ...), each the weight
    # bytes a step of at most that many tokens reads (CausalLM.small_step_reads); () where none
    small_step_reads: tuple[tuple[int, int], ...] = ()
    kv_cache_dtype: str = ""  # the KV cache's element type: dtype's, or "int8" (the 8-bit cache)
    kv_cache_tokens_unquantized: int = 0  # tokens the same memory would hold in dtype (the 8-bit cache's gain)

    def kv_cache_summary(self) -> str:
        """'65,536 tokens' or, for the 8-bit cache, '123,360 tokens in int8 (1.88x the 65,536 of bfloat16)'."""
        text = f"{self.kv_cache_tokens:,} tokens"
        if self.kv_cache_dtype and self.kv_cache_dtype != self.dtype and self.kv_cache_tokens_unquantized:
            text += (f" in {self.kv_cache_dtype} ({self.kv_cache_tokens / self.kv_cache_tokens_unquantized:.2f}x the "
                     f"{self.kv_cache_tokens_unquantized:,} of {self.dtype})")
        return text


@dataclass
class StepResult:
    outputs: list[RequestOutput] = field(default_factory=list)  # requests that progressed (finished ones last time)
    scheduled: list[str] = field(default_factory=list)  # ids of the requests the step ran, each once


class StepError(RuntimeError):
    """A step failed. ``request_ids``: the requests it was running, already dropped by the core;
    ``outputs``: their final outputs (finish reason "error"), for billing."""

    def __init__(self, message: str, request_ids: list[str], outputs: list[RequestOutput] | None = None) -> None:
        super().__init__(message)
        self.request_ids = request_ids
        self.outputs = outputs or []


class EngineCore(Protocol):
    tokenizer: LeanTokenizer
    info: ModelInfo
    meter: CostMeter  # machine-seconds per step and per request (leanserve.cost.meter)

    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams,
                    priority: Priority = Priority.INTERACTIVE, tenant: str | None = None) -> None: ...

    def step(self) -> StepResult: ...

    def abort_request(self, request_id: str, reason: str = "abort") -> RequestOutput | None: ...

    def has_unfinished(self) -> bool: ...

    def stats(self) -> dict[str, Any]: ...
