"""Request bodies of the OpenAI-compatible API, as pydantic models (they are also the OpenAPI schema).

Validation happens here, field by field, with messages a person can act on; the server turns any
failure into a 400 in OpenAI's error format. What needs the model (prompt length against the
context, token ids against the vocabulary) is checked by the server after tokenizing.

Unknown fields are ignored, as OpenAI-compatible servers do, so clients that send newer OpenAI
options keep working; options whose meaning we cannot honour (tools, suffix, JSON mode) are
refused with a 400 instead of being silently dropped.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from leanserve.types import (BOUNDS, MAX_LOGIT_BIAS, MAX_STOP_CHARS, MAX_STOP_SEQUENCES, MAX_STOP_TOKEN_IDS,
                             bounds_text)

ROLES = ("system", "developer", "user", "assistant")
MAX_MODEL_NAME_CHARS = 256
MAX_MESSAGES = 4096


def bounded(name: str, default: Any, description: str | None = None) -> Any:
    """A Field whose range is the engine's (leanserve.types.BOUNDS): one source for both."""
    lo, hi, lo_inclusive = BOUNDS[name]
    limits = {"ge": lo} if lo_inclusive else {"gt": lo}
    return Field(default, le=hi, description=description, **limits)


def _bad_unicode(v: Any, path: str = "") -> str | None:
    """The first string in a JSON value that is not valid Unicode (a lone surrogate such as \\ud800
    is valid JSON but cannot be encoded): its path, or None."""
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(v, dict):
        for k, x in v.items():
            bad = _bad_unicode(k, path) or _bad_unicode(x, f"{path}.{k}" if path else str(k))
            if bad is not None:
                return bad
    elif isinstance(v, list):
        for i, x in enumerate(v):
            bad = _bad_unicode(x, f"{path}[{i}]")
            if bad is not None:
                return bad
    return None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = Field(False, description="send one more chunk before [DONE] with the request's usage "
                                                   "(and `usage: null` on every other chunk)")


class _SamplingFields(BaseModel):
    """What both endpoints share."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = Field(None, max_length=MAX_MODEL_NAME_CHARS,
                              description="the served model name (GET /v1/models); omitted: the served model")
    n: int = bounded("n", 1, "how many choices to generate")
    temperature: float = bounded("temperature", 1.0, "0 (or below 1e-5) is greedy")
    top_p: float = bounded("top_p", 1.0, "nucleus sampling: smallest set of tokens with this much probability")
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP_SEQUENCES} strings; the text ends before "
                                                           "the first one generated")
    seed: int | None = bounded("seed", None, "same seed, same parameters, same prompt: same output (when sampling)")
    presence_penalty: float = bounded("presence_penalty", 0.0)
    frequency_penalty: float = bounded("frequency_penalty", 0.0)
    logit_bias: dict[str, float] | None = Field(None, description='token id (as a string) -> bias in [-100, 100], '
                                                                  'e.g. {"50256": -100}')
    user: str | None = Field(None, max_length=512, description="an id of the end user, for your own accounting")
    stream: bool = Field(False, description="stream the answer as server-sent events")
    stream_options: StreamOptions | None = Field(None, description="only with stream: true")
    # vLLM extras
    top_k: int = bounded("top_k", -1, "vLLM extra: sample from the k most likely tokens; -1 or 0: all")
    min_p: float = bounded("min_p", 0.0, "vLLM extra: drop tokens below min_p x the top probability")
    repetition_penalty: float = bounded("repetition_penalty", 1.0, "vLLM extra: > 1 discourages repeating prompt "
                                                                   "and output tokens")
    ignore_eos: bool = Field(False, description="vLLM extra: keep generating past the end-of-sequence token")
    min_tokens: int = bounded("min_tokens", 0, "vLLM extra: no stop (EOS or stop string) before this many tokens")
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS,
                                             description="vLLM extra: token ids that also stop")
    include_stop_str_in_output: bool = Field(False, description="vLLM extra: keep the stop string in the text")
    # leanserve extra
    priority: Literal["interactive", "batch"] = Field(
        "interactive", description="leanserve extra: batch requests fill idle capacity and are preempted first")

    @model_validator(mode="before")
    @classmethod
    def _check_unicode(cls, v: Any) -> Any:
        bad = _bad_unicode(v)
        if bad is not None:
            raise ValueError(f"{bad.split('.')[0].split('[')[0]}: the text at {bad} is not valid Unicode (it holds a "
                             "lone UTF-16 surrogate such as \\ud800)")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, v: Any) -> Any:
        if v is None or isinstance(v, str):
            if isinstance(v, str) and not v:
                raise ValueError("a stop string must not be empty")
            if isinstance(v, str) and len(v) > MAX_STOP_CHARS:
                raise ValueError(f"stop strings must be at most {MAX_STOP_CHARS} characters")
            return v
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise ValueError("must be a string or a list of strings")
        if len(v) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(v)}")
        if not all(v):
            raise ValueError("stop strings must not be empty")
        if any(len(x) > MAX_STOP_CHARS for x in v):
            raise ValueError(f"stop strings must be at most {MAX_STOP_CHARS} characters")
        return v

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _check_logit_bias(cls, v: Any) -> Any:
        if v is None:
            return v
        if not isinstance(v, dict):
            raise ValueError('must be an object mapping token ids to biases, e.g. {"50256": -100}')
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries are allowed, got {len(v)}")
        lo, hi, _ = BOUNDS["logit_bias"]
        for k, b in v.items():
            # ASCII digits only: str.isdigit() also accepts "\u0661" (Arabic-Indic one) and "\u00b2"
            if not (isinstance(k, str) and 0 < len(k) <= 10 and k.isascii() and k.isdigit()):
                raise ValueError(f"keys must be token ids (non-negative integers as strings), got {str(k)[:40]!r}")
            if isinstance(b, bool) or not isinstance(b, int | float) or not lo <= b <= hi:
                raise ValueError(f"biases must be numbers in {bounds_text('logit_bias')}, got {b!r} for token {k}")
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
    max_tokens: int | None = Field(None, ge=0, le=BOUNDS["max_tokens"][1],
                                   description="omitted: up to the model's context length; 0 only with echo (the "
                                               "prompt's log-probabilities alone)")
    logprobs: int | None = bounded("logprobs", None, "return the log-probability of each token and of the N most "
                                                     "likely ones")
    echo: bool = Field(False, description="return the prompt before the completion; with logprobs, the prompt "
                                          "tokens' log-probabilities too (the first token's is null)")
    prompt_logprobs: int | None = bounded("prompt_logprobs", None, "vLLM extra: the log-probability, rank and N "
                                                                   "most likely alternatives of each prompt token")
    prompt_logprobs_start: int = bounded("prompt_logprobs_start", 0, "leanserve extra: prompt log-probabilities "
                                                                      "(echo or prompt_logprobs) only from this token "
                                                                      "on (null before); the tokens before may come "
                                                                      "from the prefix cache")
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
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: must be >= 1 (0 only with echo: true)")
        if self.stream and (self.echo or self.prompt_logprobs is not None):
            raise ValueError(f"{'echo' if self.echo else 'prompt_logprobs'}: not supported with stream: true")
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

    messages: list[ChatMessage] = Field(..., min_length=1, max_length=MAX_MESSAGES,
                                        description="the conversation so far")
    max_tokens: int | None = bounded("max_tokens", None, "deprecated by OpenAI in favour of max_completion_tokens")
    max_completion_tokens: int | None = bounded("max_tokens", None, "omitted: up to the model's context length")
    logprobs: bool = Field(False, description="return the log-probability of each output token")
    top_logprobs: int | None = bounded("logprobs", None, "with logprobs: also the N most likely tokens at each "
                                                         "position")
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


class _UnicodeChecked(BaseModel):
    """A request body whose every text must be valid Unicode (a 400 naming where, not a 500 later)."""

    @model_validator(mode="before")
    @classmethod
    def _check_unicode(cls, v: Any) -> Any:
        bad = _bad_unicode(v)
        if bad is not None:
            raise ValueError(f"{bad.split('.')[0].split('[')[0]}: the text at {bad} is not valid Unicode")
        return v


class TokenizeRequest(_UnicodeChecked):
    """POST /tokenize (vLLM's shape): a prompt's token ids, or a conversation's through the chat template."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, max_length=MAX_MODEL_NAME_CHARS)
    prompt: str | None = Field(None, description="text to tokenize")
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=MAX_MESSAGES,
                                               description="or a conversation, through the chat template")
    add_special_tokens: bool = Field(True, description="with prompt: add BOS as the model does")

    @model_validator(mode="after")
    def _check(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("prompt: give exactly one of prompt and messages")
        return self


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit on inputs per request


class EmbeddingRequest(_UnicodeChecked):
    """POST /v1/embeddings: one vector per input, the mean of the prompt's final hidden states (L2-normalized)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, max_length=MAX_MODEL_NAME_CHARS)
    input: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="a text, texts, token ids, or lists of token ids (at most 2048 inputs)")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="float: a list of numbers; base64: little-endian float32 bytes, base64-encoded")
    dimensions: int | None = Field(None, ge=1, description="must equal the model's hidden size if given (the "
                                                           "vectors are not truncatable)")
    user: str | None = None

    @property
    def inputs(self) -> list[str | list[int]]:
        """The inputs as a list: texts or token-id lists."""
        x = self.input
        if isinstance(x, str):
            return [x]
        if x and all(isinstance(t, int) for t in x):
            return [list(x)]  # type: ignore[arg-type]
        return list(x)  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _check(self) -> "EmbeddingRequest":
        items = self.inputs
        if not items:
            raise ValueError("input: give at least one input")
        if len(items) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"input: at most {MAX_EMBEDDING_INPUTS} inputs per request, got {len(items)}")
        for i, item in enumerate(items):
            if len(item) == 0:
                raise ValueError(f"input: input {i} is empty")
            if isinstance(item, list) and any(t < 0 for t in item):
                raise ValueError(f"input: input {i} has a negative token id")
        return self


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


# ---- responses (documentation only: the server writes them as plain dicts) ----------------------

class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(..., description="prompt tokens whose KV came from the prefix cache")


class CostDetails(BaseModel):
    machine_seconds: float = Field(..., description="engine time charged to the request: each step's time split "
                                                    "over its requests by tokens computed (cached tokens cost none)")
    input_usd: float = Field(..., description="the prompt tokens' share of cost")
    output_usd: float = Field(..., description="the generated tokens' share of cost")
    price_per_hour: float
    hardware: str = Field(..., description="the catalog entry of the price basis")


class CompletionTokensDetails(BaseModel):
    accepted_prediction_tokens: int = Field(..., description="draft tokens the model accepted (its own tokens)")
    rejected_prediction_tokens: int = Field(..., description="draft tokens verified and rejected")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = Field(..., description="summed over the n choices")
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails | None = Field(
        None, description="with speculative decoding: draft tokens accepted and rejected (OpenAI's predicted-output counts)")
    cost: float | None = Field(None, description="what the request cost, USD: its machine-seconds at the server's "
                                                 "price (leanserve extra, OpenRouter's convention; docs/cost.md)")
    cost_details: CostDetails | None = Field(None, description="how cost was made (leanserve extra)")


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None] = Field(..., description="with echo, null for the first prompt token")
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    prompt_logprobs: list[dict[str, dict[str, Any]] | None] | None = Field(
        None, description="vLLM extra, with prompt_logprobs: per prompt token, null or {token id: {logprob, rank, "
                          "decoded_token}}")
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
    owned_by: str = Field("leanserve", description="leanserve (a local model or a route) or upstream:NAME")
    max_model_len: int | None = Field(None, description="a local model's context length")
    upstream: dict[str, Any] | None = Field(None, description="an upstream API: its model name and list prices")
    route: dict[str, Any] | None = Field(None, description="a cascade: its models, score and threshold")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
