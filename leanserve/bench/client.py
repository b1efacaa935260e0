"""The HTTP side: one streaming request timed chunk by chunk, and the load shapes that send many.

Talks only HTTP to an OpenAI-compatible server (leanserve, vLLM, llama.cpp's server, ...):
- POST /v1/chat/completions or /v1/completions with ``stream: true`` and
  ``stream_options: {"include_usage": true}``; SSE ``data:`` lines are parsed as they arrive.
- TTFT is taken at the first chunk that carries content, ITL at each later content chunk. A role-only
  chunk (empty content) or a usage-only chunk does not count as a token.
- Output tokens come from the final ``usage.completion_tokens`` when the server sends it; otherwise
  the number of content chunks (one token per chunk is what most servers stream; a server that
  batches several tokens per chunk is then under-counted, and the record says which way it was counted).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import httpx

from leanserve.bench.metrics import RequestRecord
from leanserve.bench.workloads import Conversation, approx_tokens, build_messages, render_prompt


class BenchError(RuntimeError):
    """The benchmark cannot run (server unreachable, model unknown, warm-up failed)."""


@dataclass(frozen=True)
class ClientConfig:
    base_url: str  # scheme://host:port, without /v1
    model: str
    endpoint: str = "chat"  # chat | completions
    api_key: str | None = None
    ignore_eos: bool = False
    temperature: float = 0.0
    timeout_s: float = 600.0  # longest wait for any byte from the server
    save_texts: bool = False

    @property
    def url(self) -> str:
        path = "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"
        return self.base_url + path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass(frozen=True)
class LoadSpec:
    """How requests are offered. ``request_rate`` inf: as fast as ``concurrency`` allows (closed loop);
    finite: Poisson arrivals (gamma inter-arrival times of shape ``burstiness``; 1.0 is Poisson)."""

    concurrency: int | None = None  # max requests in flight; None: unlimited
    request_rate: float = math.inf
    burstiness: float = 1.0
    num_prompts: int | None = None  # conversations to send; None: until duration_s
    duration_s: float | None = None  # no new request starts after this many seconds
    label: str = ""

    def __post_init__(self) -> None:
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if not self.request_rate > 0:
            raise ValueError(f"request rate must be > 0, got {self.request_rate}")
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            raise ValueError(f"burstiness must be > 0, got {self.burstiness}")
        if self.num_prompts is None and self.duration_s is None:
            raise ValueError("a run needs --num-prompts or --duration")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {self.num_prompts}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration must be > 0 seconds, got {self.duration_s}")
        if self.num_prompts is None and self.concurrency is None and math.isinf(self.request_rate):
            raise ValueError("with --duration and no --num-prompts, set --concurrency or --request-rate")

    def to_dict(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "request_rate": None if math.isinf(self.request_rate) else self.request_rate,
            "burstiness": self.burstiness,
            "num_prompts": self.num_prompts,
            "duration_s": self.duration_s,
            "label": self.label,
        }


def normalize_base_url(url: str) -> str:
    """'http://h:8000/v1/' -> 'http://h:8000'. ValueError for anything that is not http(s)://host."""
    u = url.strip().rstrip("/")
    if u.endswith("/v1"):
        u = u[: -len("/v1")]
    parsed = httpx.URL(u) if u else None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"--base-url must look like http://HOST:PORT, got {url!r}")
    return u


def make_client(max_connections: int | None = None, timeout_s: float = 600.0) -> httpx.AsyncClient:
    # trust_env=False: never route benchmark traffic through a proxy from the environment.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=max_connections or 1000)
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 30.0)), limits=limits,
                             trust_env=False)


def _error_message(body: bytes) -> str:
    text = body.decode("utf-8", errors="replace").strip()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return text[:300]
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:300]
        if isinstance(err, str):
            return err[:300]
        if obj.get("detail"):
            return str(obj["detail"])[:300]
        if obj.get("message"):
            return str(obj["message"])[:300]
    return text[:300]


async def fetch_model_ids(client: httpx.AsyncClient, base_url: str, api_key: str | None = None) -> list[str]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url + "/v1/models"
    try:
        resp = await client.get(url, headers=headers)
    except httpx.HTTPError as e:
        raise BenchError(f"cannot reach {url}: {type(e).__name__}: {e}") from None
    if resp.status_code != 200:
        raise BenchError(f"GET {url} answered HTTP {resp.status_code}: {_error_message(resp.content)}")
    try:
        data = resp.json().get("data") or []
        return [str(m["id"]) for m in data if isinstance(m, dict) and m.get("id")]
    except (ValueError, AttributeError):
        raise BenchError(f"GET {url} did not return an OpenAI model list") from None


async def send_request(
    client: httpx.AsyncClient,
    cfg: ClientConfig,
    messages: list[dict[str, str]],
    max_tokens: int | None,
    record: RequestRecord,
    run_t0: float,
) -> tuple[RequestRecord, str]:
    """Send one streaming request and fill ``record`` with its timings. Returns (record, generated text)."""
    chat = cfg.endpoint == "chat"
    payload: dict[str, Any] = {
        "model": cfg.model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": cfg.temperature,
    }
    if chat:
        payload["messages"] = messages
        prompt_text = "".join(m["content"] for m in messages)
    else:
        payload["prompt"] = prompt_text = render_prompt(messages)
    if max_tokens is not None:
        payload["max_tokens"] = max_tokens
    if cfg.ignore_eos:
        payload["ignore_eos"] = True
    record.requested_output_tokens = max_tokens
    record.input_tokens = approx_tokens(prompt_text)
    record.input_tokens_source = "estimate"

    parts: list[str] = []
    ttft: float | None = None
    last_content: float | None = None
    usage_out: int | None = None
    usage_in: int | None = None
    st = time.perf_counter()
    record.start_s = st - run_t0
    try:
        async with client.stream("POST", cfg.url, json=payload, headers=cfg.headers) as resp:
            if resp.status_code != 200:
                body = await resp.aread()
                record.error_kind = f"http_{resp.status_code}"
                record.error = _error_message(body)
                return record, ""
            async for line in resp.aiter_lines():
                line = line.strip()
                if not line.startswith("data:"):
                    continue  # blank separators, ': keep-alive' comments, 'event:' lines
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    obj = json.loads(data)
                except json.JSONDecodeError:
                    continue
                if not isinstance(obj, dict):
                    continue
                if obj.get("error") and not obj.get("choices"):
                    err = obj["error"]
                    record.error_kind = "stream_error"
                    record.error = str(err.get("message") if isinstance(err, dict) else err)[:300]
                    return record, "".join(parts)
                now = time.perf_counter()
                text = ""
                choices = obj.get("choices") or []
                if choices and isinstance(choices[0], dict):
                    if chat:
                        delta = choices[0].get("delta") or {}
                        text = delta.get("content") or delta.get("reasoning_content") or ""
                    else:
                        text = choices[0].get("text") or ""
                if text:
                    if ttft is None:
                        ttft = now - st
                    else:
                        assert last_content is not None
                        record.itl_s.append(now - last_content)
                    last_content = now
                    record.num_chunks += 1
                    parts.append(text)
                usage = obj.get("usage")
                if isinstance(usage, dict):
                    if usage.get("completion_tokens") is not None:
                        usage_out = int(usage["completion_tokens"])
                    if usage.get("prompt_tokens") is not None:
                        usage_in = int(usage["prompt_tokens"])
                    details = usage.get("prompt_tokens_details")
                    if isinstance(details, dict) and details.get("cached_tokens") is not None:
                        record.cached_tokens = int(details["cached_tokens"])
                    out_details = usage.get("completion_tokens_details")
                    if isinstance(out_details, dict):  # speculative decoding's predicted-output counts
                        for key in ("accepted_prediction_tokens", "rejected_prediction_tokens"):
                            v = out_details.get(key)
                            if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                                setattr(record, key, v)
                    cost = usage.get("cost")  # USD as a number (leanserve, OpenRouter)
                    if isinstance(cost, int | float) and not isinstance(cost, bool) and math.isfinite(cost):
                        record.server_cost_usd = float(cost)
    except httpx.TimeoutException as e:
        record.error_kind, record.error = "timeout", f"{type(e).__name__}: no data for {cfg.timeout_s:g} s"
        return record, "".join(parts)
    except (httpx.TransportError, httpx.StreamError) as e:
        record.error_kind, record.error = "connection", f"{type(e).__name__}: {e}"[:300]
        return record, "".join(parts)

    if ttft is None or last_content is None:
        record.error_kind, record.error = "no_content", "the stream ended without any content chunk"
        return record, ""
    record.success = True
    record.ttft_s = ttft
    record.e2el_s = last_content - st  # vLLM's latency: request sent -> last content chunk
    if usage_out is not None:
        record.output_tokens, record.output_tokens_source = usage_out, "usage"
    else:
        record.output_tokens, record.output_tokens_source = record.num_chunks, "chunks"
    if usage_in is not None:
        record.input_tokens, record.input_tokens_source = usage_in, "usage"
    text = "".join(parts)
    if cfg.save_texts:
        record.generated_text = text
    return record, text


def interarrival_gaps(rate: float, burstiness: float, seed: int) -> Iterator[float]:
    """Seconds between request arrivals: gamma(shape=burstiness, scale=1/(rate*burstiness)), mean 1/rate.
    burstiness 1 is a Poisson process; as in `vllm bench serve`. The first request goes at time 0."""
    rng = random.Random(seed)
    theta = 1.0 / (rate * burstiness)
    while True:
        yield rng.gammavariate(burstiness, theta)


async def run_load(
    client: httpx.AsyncClient,
    cfg: ClientConfig,
    conversations: Iterable[Conversation],
    load: LoadSpec,
    seed: int = 0,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> tuple[list[RequestRecord], float]:
    """Offer ``conversations`` under ``load``. Returns (records in completion order, wall seconds)."""
    records: list[RequestRecord] = []
    t0 = time.perf_counter()
    deadline = t0 + load.duration_s if load.duration_s is not None else None

    def past_deadline() -> bool:
        return deadline is not None and time.perf_counter() >= deadline

    async def run_conversation(conv: Conversation) -> None:
        answers: list[str] = []
        for turn in range(len(conv.turns)):
            if turn > 0 and past_deadline():
                return
            rec = RequestRecord(request_id=f"{conv.conversation_id}-{turn}", conversation_id=conv.conversation_id,
                                turn=turn)
            if turn > 0 and not records_by_conv.get(conv.conversation_id, True):
                rec.error_kind, rec.error = "previous_turn_failed", "turn not sent: the previous turn failed"
                rec.start_s = time.perf_counter() - t0
            else:
                messages = build_messages(conv, turn, answers)
                rec, text = await send_request(client, cfg, messages, conv.output_lens[turn], rec, t0)
                answers.append(text)
            records_by_conv[conv.conversation_id] = rec.success
            records.append(rec)
            if on_done:
                on_done(rec)

    records_by_conv: dict[int, bool] = {}
    source: Iterator[Conversation] = iter(conversations)
    if math.isinf(load.request_rate):
        if load.concurrency is None:
            convs = list(source)
            await asyncio.gather(*(run_conversation(c) for c in convs))
        else:
            async def worker() -> None:
                while not past_deadline():
                    conv = next(source, None)
                    if conv is None:
                        return
                    await run_conversation(conv)
            await asyncio.gather(*(worker() for _ in range(load.concurrency)))
    else:
        gate = asyncio.Semaphore(load.concurrency) if load.concurrency else None

        async def guarded(conv: Conversation) -> None:
            if gate is None:
                await run_conversation(conv)
                return
            async with gate:
                await run_conversation(conv)

        tasks: list[asyncio.Task[None]] = []
        gaps = interarrival_gaps(load.request_rate, load.burstiness, seed)
        next_at = t0
        for conv in source:
            if deadline is not None and next_at >= deadline:
                break
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(guarded(conv)))
            next_at += next(gaps)
        await asyncio.gather(*tasks)
    return records, time.perf_counter() - t0
