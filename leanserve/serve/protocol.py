"""Request bodies of the OpenAI-compatible API, as pydantic models (they are also the OpenAPI schema).

Validation happens here, field by field, with messages a person can act on; the server turns any
failure into a 400 in OpenAI's error format. What needs the model (prompt length against the
context, token ids against the vocabulary) is checked by the server after tokenizing.

Unknown fields are ignored, as OpenAI-compatible servers do, so clients that send newer OpenAI
options keep working; options whose meaning we cannot honour (tools, echo, suffix, JSON mode) are
refused with a 400 instead of being silently dropped.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_SEQUENCES = 4  # as OpenAI
MAX_LOGPROBS = 20  # top alternatives per token (OpenAI: 5 for completions, 20 for chat)
MAX_N = 128
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
ROLES = ("system", "developer", "user", "assistant")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = Field(False, description="send one more chunk before [DONE] with the request's usage "
                                                   "(and `usage: null` on every other chunk)")


class _SamplingFields(BaseModel):
    """What both endpoints share."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = Field(None, description="the served model name (GET /v1/models); omitted: the served model")
    n: int = Field(1, ge=1, le=MAX_N, description="how many choices to generate")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 is greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling: smallest set of tokens with this much probability")
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP_SEQUENCES} strings; the text ends before "
                                                           "the first one generated")
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX,
                             description="same seed, same parameters, same prompt: same output (when sampling)")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(None, description='token id (as a string) -> bias in [-100, 100], '
                                                                  'e.g. {"50256": -100}')
    user: str | None = Field(None, max_length=512, description="an id of the end user, for your own accounting")
    stream: bool = Field(False, description="stream the answer as server-sent events")
    stream_options: StreamOptions | None = Field(None, description="only with stream: true")
    # vLLM extras
    top_k: int = Field(-1, ge=-1, description="vLLM extra: sample from the k most likely tokens; -1 or 0: all")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="vLLM extra: drop tokens below min_p x the top probability")
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="vLLM extra: > 1 discourages repeating "
                                                                         "prompt and output tokens")
    ignore_eos: bool = Field(False, description="vLLM extra: keep generating past the end-of-sequence token")
    min_tokens: int = Field(0, ge=0, description="vLLM extra: no stop (EOS or stop string) before this many tokens")
    stop_token_ids: list[int] | None = Field(None, max_length=64, description="vLLM extra: token ids that also stop")
    include_stop_str_in_output: bool = Field(False, description="vLLM extra: keep the stop string in the text")
    # leanserve extra
    priority: Literal["interactive", "batch"] = Field(
        "interactive", description="leanserve extra: batch requests fill idle capacity and are preempted first")

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, v: Any) -> Any:
        if v is None or isinstance(v, str):
            if isinstance(v, str) and not v:
                raise ValueError("a stop string must not be empty")
            return v
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise ValueError("must be a string or a list of strings")
        if len(v) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(v)}")
        if not all(v):
            raise ValueError("stop strings must not be empty")
        return v

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _check_logit_bias(cls, v: Any) -> Any:
        if v is None:
            return v
        if not isinstance(v, dict):
            raise ValueError('must be an object mapping token ids to biases, e.g. {"50256": -100}')
        if len(v) > 1024:
            raise ValueError(f"at most 1024 entries are allowed, got {len(v)}")
        for k, b in v.items():
            if not str(k).isdigit():
                raise ValueError(f"keys must be token ids (non-negative integers as strings), got {k!r}")
            if isinstance(b, bool) or not isinstance(b, int | float) or not -100 <= b <= 100:
                raise ValueError(f"biases must be numbers in [-100, 100], got {b!r} for token {k}")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _check_stop_token_ids(cls, v: list[int] | None) -> list[int] | None:
        if v and any(t < 0 for t in v):
            raise ValueError("token ids must be >= 0")
        return v

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _check_stream_options(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")


class CompletionRequest(_SamplingFields):
    """POST /v1/completions"""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="a string, a list holding one string, token ids, or a list holding one list of token ids")
    max_tokens: int | None = Field(None, ge=1, description="omitted: up to the model's context length")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description="return the log-probability of each token and of the N most likely ones")
    echo: bool = Field(False, description="not supported (must be false)")
    suffix: str | None = Field(None, description="not supported")
    best_of: int | None = Field(None, ge=1, description="only best_of == n is supported")

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, v: Any) -> Any:
        if isinstance(v, str):
            return v
        if not isinstance(v, list) or not v:
            raise ValueError("must be a string, a list of one string, or a non-empty list of token ids")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            if any(t < 0 for t in v):
                raise ValueError("token ids must be >= 0")
            return v
        if len(v) > 1 and (all(isinstance(p, str) for p in v) or all(isinstance(p, list) for p in v)):
            raise ValueError(f"one prompt per request is supported, got a list of {len(v)}; send several requests "
                             "(they are batched together) or use n")
        inner = v[0]
        if len(v) == 1 and isinstance(inner, str):
            return v
        if len(v) == 1 and isinstance(inner, list) and inner and all(isinstance(t, int) and not isinstance(t, bool) for t in inner):
            if any(t < 0 for t in inner):
                raise ValueError("token ids must be >= 0")
            return v
        raise ValueError("must be a string, a list of one string, or a non-empty list of token ids")

    @model_validator(mode="after")
    def _check(self) -> "CompletionRequest":
        self._check_stream_options()
        if self.echo:
            raise ValueError("echo: echoing the prompt is not supported by this server")
        if self.suffix:
            raise ValueError("suffix: insertion (suffix) is not supported by this server")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of: only best_of == n is supported, got best_of={self.best_of}, n={self.n}")
        return self

    @property
    def prompt_input(self) -> str | list[int]:
        """The one prompt, as text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return p
        if p and isinstance(p[0], int):
            return list(p)  # type: ignore[arg-type]
        return p[0]  # type: ignore[return-value]

    @property
    def max_output_tokens(self) -> int | None:
        return self.max_tokens


class TextContentPart(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"] = Field(..., description="developer is treated as system")
    content: str | list[TextContentPart] = Field(..., description="text, or a list of text parts (joined with newlines)")
    name: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _check(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            raise ValueError("each message must be an object with a role and content")
        role = v.get("role")
        if role is None:
            raise ValueError("role is required (one of " + ", ".join(ROLES) + ")")
        if role not in ROLES:
            hint = " (tool messages are not supported: this server has no tool calling)" if role in ("tool", "function") else ""
            raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}{hint}")
        content = v.get("content")
        if content is None:
            if v.get("tool_calls"):
                raise ValueError("tool calls are not supported by this server")
            raise ValueError(f"content is required for a {role} message")
        if isinstance(content, list):
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ValueError(f"only text content parts ({{\"type\": \"text\", \"text\": ...}}) are supported, "
                                     f"got {kind!r}")
        elif not isinstance(content, str):
            raise ValueError(f"content must be a string or a list of text parts, got {type(content).__name__}")
        return v

    def to_template(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions"""

    messages: list[ChatMessage] = Field(..., min_length=1, description="the conversation so far")
    max_tokens: int | None = Field(None, ge=1, description="deprecated by OpenAI in favour of max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1, description="omitted: up to the model's context length")
    logprobs: bool = Field(False, description="return the log-probability of each output token")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                     description="with logprobs: also the N most likely tokens at each position")
    tools: list[Any] | None = Field(None, description="not supported (must be empty)")
    tool_choice: Any = Field(None, description="not supported")
    functions: list[Any] | None = Field(None, description="not supported")
    response_format: dict[str, Any] | None = Field(None, description='only {"type": "text"} is supported')

    @model_validator(mode="after")
    def _check(self) -> "ChatCompletionRequest":
        self._check_stream_options()
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: logprobs must be true when top_logprobs is set")
        if self.tools or self.functions:
            raise ValueError("tools: tool and function calling are not supported by this server")
        if self.tool_choice not in (None, "none", "auto"):
            raise ValueError("tool_choice: tool calling is not supported by this server")
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            raise ValueError("response_format: only {\"type\": \"text\"} is supported by this server")
        return self

    @property
    def max_output_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        """SamplingParams.logprobs: None (none), 0 (only the chosen token) or the top-N count."""
        if not self.logprobs:
            return None
        return self.top_logprobs or 0


# ---- responses (documentation only: the server writes them as plain dicts) ----------------------

class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(..., description="prompt tokens whose KV came from the prefix cache")


class CostUsage(BaseModel):
    usd: float = Field(..., description="machine_seconds x price_per_hour / 3600 (leanserve extra; docs/cost.md)")
    machine_seconds: float = Field(..., description="engine time charged to the request: each step's time split "
                                                    "over its requests by tokens computed (cached tokens cost none)")
    price_per_hour: float
    hardware: str = Field(..., description="the catalog entry of the price basis")
    input_usd: float = Field(..., description="the prompt tokens' share of usd")
    output_usd: float = Field(..., description="the generated tokens' share of usd")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = Field(..., description="summed over the n choices")
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    cost: CostUsage | None = Field(None, description="what the request cost (leanserve extra)")


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None
    stop_reason: str | int | None = Field(None, description="vLLM extra: the stop string or token id that matched")


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(None, description="null on stream chunks (and present on the last one with "
                                                  "stream_options.include_usage)")


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobEntry] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"]
    stop_reason: str | int | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a streamed chat completion; the stream ends with `data: [DONE]`."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ErrorBody(BaseModel):
    message: str
    type: str = Field(..., description="invalid_request_error, authentication_error, rate_limit_error, "
                                       "timeout_error or server_error")
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "leanserve"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
