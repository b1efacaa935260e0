"""The OpenAI-compatible HTTP API: FastAPI app around an `AsyncEngine`.

A request's path: transport guards (transport.py: Host, body size, API key) -> validate the body
(protocol.py; a 400 in OpenAI's format for anything wrong) -> check the model name -> tokenize on a
worker thread (the chat template for chat; message text never becomes control tokens) -> check the
prompt against the context -> build SamplingParams -> admission (429 with Retry-After when the
server, or the caller's share of it, is full) -> the engine thread -> a JSON answer, or server-sent
events as tokens come. A client that goes away aborts its request, which frees its KV blocks at once.
When the request leaves the engine, `Billing.close` (cost/billing.py) bills it and queues its ledger
row; the handler settles that bill once, for ``usage.cost``.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import math
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Query, Request, Security
from fastapi.responses import JSONResponse, Response, StreamingResponse

import leanserve
from leanserve.cost.basis import PriceBasis, resolve_price_basis
from leanserve.cost.billing import Billing, RequestMeta, receipt
from leanserve.cost.ledger import Ledger, key_id
from leanserve.cost.meter import HISTORY_SECONDS
from leanserve.gateway import sse
from leanserve.gateway.router import NO_TAGS, Backend, Call, Gateway, Tags
from leanserve.engine.async_engine import (AsyncEngine, EngineDeadError, EngineStepError, InvalidRequestError,
                                           QueueFullError, RequestStream, RequestTimeoutError)
from leanserve.serve import responses as R
from leanserve.serve.auth import APIKeyAuth, _bearer
from leanserve.serve.dashboard import PATH as DASHBOARD_PATH, install_dashboard
from leanserve.serve.errors import APIError, from_value_error, install_error_handlers, invalid
from leanserve.serve.metrics import CONTENT_TYPE, ServerMetrics
from leanserve.serve.protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                                      CompletionResponse, EmbeddingRequest, ErrorResponse, ModelCard, ModelList,
                                      TokenizeRequest, TokenizeResponse)
from leanserve.tokenizer import ChatTemplateError
from leanserve.types import Priority, RequestOutput, SamplingParams

# the dashboard is a static page with no data: its script asks for the key (serve/dashboard.py)
OPEN_PATHS = frozenset({"/health", "/version", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json",
                        DASHBOARD_PATH})
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
MAX_CHARS_PER_TOKEN = 32  # prompt text longer than this x the context is refused before tokenizing

log = logging.getLogger("leanserve.api")


@dataclass(frozen=True)
class ServerSettings:
    model_name: str  # the name clients send as "model"
    api_key_digests: frozenset[str] = frozenset()  # sha256 hex digests; empty: no auth
    request_timeout: float | None = 600.0  # seconds from arrival; None or 0: no limit
    price_basis: PriceBasis | None = None  # None: detected hardware or cpu-local (leanserve.cost.basis)
    ledger: Ledger | None = None  # where finished requests are recorded; None: nowhere
    max_body_bytes: int | None = None  # larger request bodies get 413; None: TransportConfig's default (serve/transport.py)
    allowed_hosts: tuple[str, ...] | None = None  # Host header allow list (any port); None: no check
    batch_price_factor: float = 1.0  # batch lines' machine time priced at this share (--batch-price-factor)


def _error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {400: "invalid request (OpenAI error format)", 401: "missing or invalid API key", 404: "unknown model",
            429: "the waiting queue is full: retry after the Retry-After header's seconds",
            500: "the model step failed", 504: "the request ran past --request-timeout"}
    return {c: {"model": ErrorResponse, "description": text[c]} for c in codes}


class _AuthMiddleware:
    """Checks the API key before anything else (body parsing included). Pure ASGI: no buffering."""

    def __init__(self, app: Any, auth: APIKeyAuth) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
            if not self.auth.check(header):
                err = APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'" if header is None
                               else "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class OpenAIServer:
    """One local model's request handlers; `LocalModel` puts them behind the gateway (gateway/router.py)."""

    def __init__(self, engine: AsyncEngine, settings: ServerSettings, metrics: ServerMetrics | None = None,
                 name: str | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.model = name or settings.model_name
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.vocab_size
        # a prompt's text is refused before tokenizing past this many characters: no tokenizer puts
        # that many characters in one token on average, so such a text can never fit the context
        self.max_prompt_chars = MAX_CHARS_PER_TOKEN * self.max_model_len
        self.token_text = R.TokenText.for_tokenizer(self.tokenizer)
        core = engine.engine
        basis = settings.price_basis or resolve_price_basis(device=engine.device)
        self.billing = Billing(basis, core.meter, self.model, core.info.num_params, core.info.weight_bytes,
                               engine.dtype, settings.ledger, settings.batch_price_factor)
        engine.on_request_done = self.billing.close  # the one door a request leaves by (cost/billing.py)
        self.metrics = (metrics or ServerMetrics()).add_model(self.model, engine, self.billing.book)
        self.created = int(time.time())

    def request_meta(self, request: Request, tags: Tags = NO_TAGS) -> tuple[RequestMeta, str | None]:
        """(the request's ledger facts, its tenant for admission: the API key when there are several).
        A batch line has no caller's header: its owner's key id comes in ``tags``."""
        kid = tags.key_id
        if kid is None and self.settings.api_key_digests:
            scheme, _, token = (request.headers.get("authorization") or "").strip().partition(" ")
            kid = key_id(token.strip()) if scheme.lower() == "bearer" else None
        tenant = kid if len(self.settings.api_key_digests) > 1 else None
        meta = RequestMeta(arrival=time.monotonic(), key_id=kid, cache=tags.cache, route=tags.route,
                           batch_id=tags.batch_id)
        return meta, tenant

    # ---- checks shared by both endpoints -------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model:
            shown = repr(model) if len(model) <= 80 else repr(model[:80]) + "..."
            raise APIError(404, f"the model {shown} does not exist; this server serves {self.model!r} "
                                "(GET /v1/models)", param="model", code="model_not_found")

    def check_length(self, num_prompt: int, max_tokens: int | None, param: str) -> None:
        m = self.max_model_len
        if num_prompt >= m:
            raise APIError(400, f"This model's maximum context length is {m} tokens, but the {param} has {num_prompt} "
                                f"tokens and at least one token must be left for the completion. Please shorten the "
                                f"{param}.", param=param, code="context_length_exceeded")
        if max_tokens is not None and num_prompt + max_tokens > m:
            raise APIError(400, f"This model's maximum context length is {m} tokens. However, you requested "
                                f"{num_prompt + max_tokens} tokens ({num_prompt} in the {param}, {max_tokens} in the "
                                f"completion). Please reduce the length of the {param} or max_tokens (at most "
                                f"{m - num_prompt} here).", param="max_tokens", code="context_length_exceeded")

    def check_chars(self, num_chars: int, param: str) -> None:
        if num_chars > self.max_prompt_chars:
            raise APIError(400, f"the {param} has {num_chars:,} characters; this model's context is "
                                f"{self.max_model_len:,} tokens, so at most {self.max_prompt_chars:,} characters are "
                                f"accepted. Please shorten the {param}.", param=param, code="context_length_exceeded")

    async def tokenize(self, fn: Callable[[], list[int]], param: str) -> list[int]:
        """Tokenize on a worker thread (a long prompt must not stall other streams); a failure caused
        by the request's own text is a 400, never a 500."""
        try:
            return await asyncio.to_thread(fn)
        except APIError:
            raise
        except ChatTemplateError as e:
            raise invalid(f"{param}: {e}", param, "invalid_value") from None
        except Exception as e:  # noqa: BLE001 - the input is the only thing that varies here
            log.warning("tokenizing the %s failed: %s: %s", param, type(e).__name__, e)
            raise invalid(f"{param}: the text could not be tokenized ({type(e).__name__}: {e})"[:500], param,
                          "invalid_value") from None

    def sampling_params(self, body: CompletionRequest | ChatCompletionRequest, num_prompt: int,
                        logprobs: int | None, prompt_logprobs: int | None = None,
                        prompt_logprobs_start: int = 0) -> SamplingParams:
        max_tokens = body.max_output_tokens
        if max_tokens is None:  # as vLLM: up to the context
            max_tokens = self.max_model_len - num_prompt
        # max_tokens 0 (echo only): the engine samples one token at the end of the prefill anyway;
        # the response leaves it out
        max_tokens = max(max_tokens, 1)
        bias = None
        if body.logit_bias:
            bias = {int(k): float(v) for k, v in body.logit_bias.items()}
            bad = [t for t in bias if t >= self.vocab_size]
            if bad:
                raise invalid(f"logit_bias: token id {bad[0]} is out of range (the vocabulary has {self.vocab_size} "
                              "tokens)", "logit_bias", "invalid_value")
        stop_ids = tuple(body.stop_token_ids or ())
        if any(t >= self.vocab_size for t in stop_ids):
            raise invalid(f"stop_token_ids: token ids must be < {self.vocab_size}", "stop_token_ids", "invalid_value")
        try:
            return SamplingParams(
                n=body.n, max_tokens=max_tokens, min_tokens=body.min_tokens, temperature=body.temperature,
                top_p=body.top_p, top_k=body.top_k, min_p=body.min_p, presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty,
                logit_bias=bias, seed=body.seed, stop=tuple(body.stop_list), stop_token_ids=stop_ids,
                ignore_eos=body.ignore_eos, logprobs=logprobs,
                include_stop_str_in_output=body.include_stop_str_in_output, prompt_logprobs=prompt_logprobs,
                prompt_logprobs_start=prompt_logprobs_start)
        except ValueError as e:
            raise from_value_error(e) from None

    # ---- endpoints -------------------------------------------------------------------------------

    async def completions(self, body: CompletionRequest, request: Request, tags: Tags = NO_TAGS) -> Response:
        self.check_model(body.model)
        prompt = body.prompt_input
        if isinstance(prompt, str):
            self.check_chars(len(prompt), "prompt")
            ids = await self.tokenize(lambda: self.tokenizer.encode(prompt), "prompt")
        else:
            bad = next((t for t in prompt if t >= self.vocab_size), None)
            if bad is not None:
                raise invalid(f"prompt: token id {bad} is out of range (the vocabulary has {self.vocab_size} tokens)",
                              "prompt", "invalid_value")
            ids = prompt
        if not ids:
            raise invalid("prompt: the prompt is empty", "prompt", "invalid_value")
        self.check_length(len(ids), body.max_tokens, "prompt")
        # prompt log-probabilities: echo with logprobs (OpenAI) and prompt_logprobs (vLLM)
        wanted = [n for n in (body.logprobs if body.echo else None, body.prompt_logprobs) if n is not None]
        params = self.sampling_params(body, len(ids), body.logprobs, max(wanted) if wanted else None,
                                      body.prompt_logprobs_start)
        return await self._generate(request, body, ids, params, chat=False, tags=tags)

    async def chat_completions(self, body: ChatCompletionRequest, request: Request, tags: Tags = NO_TAGS) -> Response:
        self.check_model(body.model)
        if not self.tokenizer.has_chat_template:
            raise invalid(f"the model {self.model!r} has no chat template; use /v1/completions", "messages",
                          "chat_template_missing")
        messages = [m.to_template() for m in body.messages]
        self.check_chars(sum(len(m["content"]) for m in messages), "messages")
        ids = await self.tokenize(lambda: self.tokenizer.encode_chat(messages), "messages")
        self.check_length(len(ids), body.max_output_tokens, "messages")
        params = self.sampling_params(body, len(ids), body.num_logprobs)
        return await self._generate(request, body, ids, params, chat=True, tags=tags)

    # ---- generation --------------------------------------------------------------------------

    async def _generate(self, request: Request, body: CompletionRequest | ChatCompletionRequest, ids: list[int],
                        params: SamplingParams, chat: bool, tags: Tags = NO_TAGS) -> Response:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        priority = Priority.BATCH if body.priority == "batch" else Priority.INTERACTIVE
        meta, tenant = self.request_meta(request, tags)
        if self.billing.stores_text:
            meta = dataclasses.replace(meta, prompt_text=await asyncio.to_thread(self.tokenizer.decode, ids))
        stream = self._add(rid, ids, params, priority, meta, tenant)
        created = int(time.time())
        if body.stream:
            gen = self._stream(rid, created, stream, body, chat)
            return StreamingResponse(gen, media_type="text/event-stream", headers=SSE_HEADERS)
        out = await self._collect(rid, stream, request)
        cost = await self.billing.settle(stream.receipt)
        if chat:
            return JSONResponse(R.chat_response(rid, created, self.model, out, self.token_text, cost))
        assert isinstance(body, CompletionRequest)
        if body.max_tokens == 0:  # echo only: the token sampled after the prompt is not part of the answer
            for c in out.outputs:
                c.text, c.token_ids, c.logprobs = "", [], [] if c.logprobs is not None else None
        echo = None
        if body.echo:
            prompt = body.prompt_input
            echo = prompt if isinstance(prompt, str) else await asyncio.to_thread(
                self.tokenizer.decode, ids, skip_special_tokens=False)
        return JSONResponse(R.completion_response(rid, created, self.model, out, self.token_text, cost, echo,
                                                  prompt_logprobs=body.prompt_logprobs is not None))

    def _add(self, rid: str, ids: list[int], params: SamplingParams, priority: Priority, meta: RequestMeta,
             tenant: str | None) -> RequestStream:
        """Admit a request to the engine; the refusals as HTTP errors."""
        try:
            return self.engine.add_request(rid, ids, params, priority, timeout=self.settings.request_timeout,
                                           meta=meta, tenant=tenant)
        except QueueFullError as e:
            self.metrics.failure("rejected")
            raise APIError(429, str(e), code="queue_full",
                           headers={"Retry-After": str(math.ceil(e.retry_after))}) from None
        except EngineDeadError as e:
            raise APIError(503, f"{e}; the server is shutting down or failed", code="engine_dead") from None
        except ValueError as e:
            raise from_value_error(e) from None

    async def embed(self, inputs: list[str | list[int]], request: Request, tags: Tags = NO_TAGS,
                    param: str = "input") -> tuple[list[list[float]], dict[str, Any]]:
        """Each input's embedding (the mean of its prompt's final hidden states, L2-normalized; one
        engine request each, billed like any other) and the summed ``usage`` of them all."""
        ids_list: list[list[int]] = []
        for item in inputs:
            if isinstance(item, str):
                self.check_chars(len(item), param)
                ids = await self.tokenize(lambda t=item: self.tokenizer.encode(t), param)
            else:
                bad = next((t for t in item if t >= self.vocab_size), None)
                if bad is not None:
                    raise invalid(f"{param}: token id {bad} is out of range (the vocabulary has {self.vocab_size} "
                                  "tokens)", param, "invalid_value")
                ids = item
            if not ids:
                raise invalid(f"{param}: an input is empty", param, "invalid_value")
            self.check_length(len(ids), 1, param)
            ids_list.append(ids)
        params = SamplingParams(max_tokens=1, temperature=0.0, embed=True)
        meta, tenant = self.request_meta(request, tags)
        streams: list[tuple[str, RequestStream]] = []
        try:
            for ids in ids_list:
                rid = f"embd-{uuid.uuid4().hex}"
                streams.append((rid, self._add(rid, ids, params, Priority.INTERACTIVE, meta, tenant)))
            results = await asyncio.gather(*(self._collect(rid, st, request) for rid, st in streams),
                                           return_exceptions=True)
        finally:
            for rid, _ in streams:
                self.engine.abort(rid)  # no-op once finished
        bills = [await self.billing.settle(st.receipt) for _, st in streams]
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            raise failed
        outs: list[RequestOutput] = results  # type: ignore[assignment]
        details = [b.get("cost_details", {}) for b in bills]
        prompt_tokens = sum(o.num_prompt_tokens for o in outs)
        usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens,
                 "cost": math.fsum(b.get("cost", 0.0) for b in bills),
                 "cost_details": {"machine_seconds": math.fsum(d.get("machine_seconds", 0.0) for d in details),
                                  "input_usd": math.fsum(d.get("input_usd", 0.0) for d in details),
                                  "output_usd": math.fsum(d.get("output_usd", 0.0) for d in details),
                                  "price_per_hour": self.billing.basis.price_per_hour,
                                  "hardware": self.billing.basis.hardware.name, **receipt()}}
        return [o.embedding or [] for o in outs], usage

    def _error_for(self, e: BaseException) -> APIError:
        if isinstance(e, RequestTimeoutError):
            self.metrics.failure("timeout")
            return APIError(504, str(e), code="timeout", type="timeout_error")
        if isinstance(e, InvalidRequestError):
            self.metrics.failure("invalid")
            return from_value_error(e)
        self.metrics.failure("engine")
        return APIError(500, str(e) if isinstance(e, EngineStepError) else f"internal error: {type(e).__name__}: {e}",
                        code="engine_error", type="server_error")

    async def _collect(self, rid: str, stream: RequestStream, request: Request) -> RequestOutput:
        """Wait for the final output; abort if the client disconnects first."""

        async def consume() -> RequestOutput:
            last = None
            async for out in stream:
                last = out
            assert last is not None
            return last

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        task = asyncio.ensure_future(consume())
        watch = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
            if not task.done():  # the client went away
                self.metrics.finished(stream, None, "abort", time.monotonic())
                raise APIError(499, "client disconnected", code="client_disconnected")
            try:
                out = task.result()
            except (InvalidRequestError, EngineStepError, RequestTimeoutError) as e:
                raise self._error_for(e) from None
            failure = R.engine_failure(out)
            if failure is not None:
                raise self._error_for(EngineStepError(failure))
            self.metrics.finished(stream, out, out.outputs[0].finish_reason or "stop", time.monotonic())
            return out
        finally:
            watch.cancel()
            if not task.done():
                task.cancel()
            self.engine.abort(rid)  # no-op once finished

    async def _stream(self, rid: str, created: int, stream: RequestStream,
                      body: CompletionRequest | ChatCompletionRequest, chat: bool) -> AsyncIterator[bytes]:
        model, tt, include_usage = self.model, self.token_text, body.include_usage
        cursors = [R.ChoiceCursor() for _ in range(body.n)]
        done = False
        try:
            if chat:
                for i in range(body.n):
                    yield R.sse(R.chat_chunk(rid, created, model, i, {"role": "assistant", "content": ""}, None, None,
                                             include_usage))
            while True:
                try:
                    out = await stream.get()
                except (InvalidRequestError, EngineStepError, RequestTimeoutError) as e:
                    err = self._error_for(e)
                    done = True
                    yield R.error_event(err.message, err.type, err.code, err.param)
                    yield R.SSE_DONE
                    return
                failure = R.engine_failure(out)
                if failure is not None:
                    err = self._error_for(EngineStepError(failure))
                    done = True
                    yield R.error_event(err.message, err.type, err.code)
                    yield R.SSE_DONE
                    return
                for c in out.outputs:
                    cur = cursors[c.index]
                    text, lps, finish = cur.advance(c)
                    if not text and finish is None and not lps:
                        continue
                    stop_reason = c.stop_reason if finish is not None else None
                    if chat:
                        lp = R.chat_logprobs(lps, tt) if lps is not None else None
                        yield R.sse(R.chat_chunk(rid, created, model, c.index, {"content": text} if text else {}, lp,
                                                 finish, include_usage, stop_reason))
                    else:
                        lp = None
                        if lps is not None:
                            lp, cur.text_offset = R.completion_logprobs(lps, tt, cur.text_offset)
                        yield R.sse(R.completion_chunk(rid, created, model, c.index, text, lp, finish, include_usage,
                                                       stop_reason))
                if out.finished:
                    break
            done = True
            self.metrics.finished(stream, out, out.outputs[0].finish_reason or "stop", time.monotonic())
            cost = await self.billing.settle(stream.receipt)
            if include_usage:
                yield R.sse(R.usage_chunk(rid, created, model, "chat.completion.chunk" if chat else "text_completion",
                                          out, cost))
            yield R.SSE_DONE
        finally:
            if not done:  # the client went away (the response task was cancelled) or a send failed
                self.metrics.finished(stream, None, "abort", time.monotonic())
            self.engine.abort(rid)  # no-op once finished

    async def tokenize_request(self, body: TokenizeRequest) -> dict[str, Any]:
        self.check_model(body.model)
        if body.messages is not None:
            if not self.tokenizer.has_chat_template:
                raise invalid(f"the model {self.model!r} has no chat template; tokenize a prompt", "messages",
                              "chat_template_missing")
            # no length check against the context: counting a long text's tokens is what /tokenize is for
            # (the body limit bounds it, and it runs on a worker thread)
            messages = [m.to_template() for m in body.messages]
            ids = await self.tokenize(lambda: self.tokenizer.encode_chat(messages), "messages")
        else:
            text = body.prompt or ""
            ids = await self.tokenize(lambda: self.tokenizer.encode(text, add_special_tokens=body.add_special_tokens),
                                      "prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": self.max_model_len}

    # ---- the rest ----------------------------------------------------------------------------

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model, "object": "model", "created": self.created, "owned_by": "leanserve",
                "max_model_len": self.max_model_len}


class LocalModel:
    """A local engine as a gateway backend (gateway/router.py `Backend`): the request goes through
    `OpenAIServer`'s own handlers, its answer comes back as OpenAI's dicts."""

    kind = "local"

    def __init__(self, server: OpenAIServer) -> None:
        self.server = server
        self.name = server.model
        self.book = server.billing.book

    def card(self) -> dict[str, Any]:
        return self.server.model_card()

    def estimate_usd(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        rates = self.book.usd_per_token()
        return None if rates is None else prompt_tokens * rates[0] + completion_tokens * rates[1]

    async def embed(self, texts: list[str | list[int]], request: Request,
                    tags: Tags = NO_TAGS) -> tuple[list[list[float]], dict[str, Any]]:
        """Embeddings for the gateway's semantic cache stage (billed like /v1/embeddings)."""
        return await self.server.embed(texts, request, tags)

    async def _respond(self, call: Call) -> Response:
        if call.endpoint == "chat":
            return await self.server.chat_completions(call.body, call.request, call.tags)
        return await self.server.completions(call.body, call.request, call.tags)

    async def complete(self, call: Call) -> dict[str, Any]:
        resp = await self._respond(call)
        return json.loads(bytes(resp.body))

    async def stream(self, call: Call) -> AsyncIterator[dict[str, Any]]:
        resp = await self._respond(call)
        assert isinstance(resp, StreamingResponse)
        body = resp.body_iterator
        events = sse.parse_events(body)  # type: ignore[arg-type]
        try:
            async for event in events:
                yield event
        finally:  # the client went away: closing the handler's generator aborts the request
            await events.aclose()
            await body.aclose()  # type: ignore[attr-defined]


def build_app(engines: AsyncEngine | dict[str, AsyncEngine], settings: ServerSettings,
              on_ready: Callable[[], None] | None = None, upstreams: list[Backend] = (),
              cascades: list[Any] = (), cache: Any = None, semantic: Any = None,
              semantic_model: str | None = None, batch_store: Any = None,
              batch_max_in_flight: int | None = None) -> FastAPI:
    """The app over one engine or several (name -> engine), upstream backends, cascades and a response
    cache (gateway/); its lifespan starts the engine threads (if not started) and stops them at shutdown."""
    if not isinstance(engines, dict):
        engines = {settings.model_name: engines}
    server_metrics = ServerMetrics()
    servers = {name: OpenAIServer(e, settings, server_metrics, name) for name, e in engines.items()}
    gateway = Gateway([*(LocalModel(s) for s in servers.values()), *upstreams], list(cascades), cache,
                      settings.ledger, semantic, semantic_model)
    for b in upstreams:
        b.gateway_record = gateway.record  # type: ignore[attr-defined]
        server_metrics.add_model(b.name, None, b.book)
    for name, book in gateway.route_books.items():
        server_metrics.add_model(name, None, book)
    server_metrics.registry.register(gateway.collector())
    auth = APIKeyAuth(settings.api_key_digests)
    runner = None
    if batch_store is not None:
        from leanserve.batch.runner import DEFAULT_MAX_IN_FLIGHT, BatchRunner

        runner = BatchRunner(batch_store, gateway, batch_max_in_flight or DEFAULT_MAX_IN_FLIGHT)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for engine in engines.values():
            if not engine.is_running:
                engine.start()
        runner_task = asyncio.ensure_future(runner.run()) if runner is not None else None
        if on_ready is not None:
            on_ready()
        yield
        if runner_task is not None:  # lines in flight are cancelled: they stay pending, a restart resumes them
            runner_task.cancel()
            await asyncio.gather(runner_task, return_exceptions=True)
        for engine in engines.values():
            engine.shutdown()
        for b in upstreams:
            await b.upstream.aclose()  # type: ignore[attr-defined]
        if batch_store is not None:
            batch_store.close()
        if semantic is not None:
            semantic.close()
        if cache is not None:
            cache.close()
        if settings.ledger is not None:
            settings.ledger.close()

    def local(model: str | None, path: str = "/tokenize") -> OpenAIServer:
        name = gateway.resolve(model)
        if name not in servers:
            raise APIError(400, f"{name!r} is not a local model: {path} needs one of {', '.join(map(repr, servers))}",
                           param="model", code="invalid_value")
        return servers[name]

    app = FastAPI(
        title="leanserve", version=leanserve.__version__, lifespan=lifespan,
        summary="OpenAI-compatible LLM server focused on cost per token",
        description=f"Serving {', '.join(f'`{n}`' for n in gateway.names())}. Errors use OpenAI's format `{{\"error\": {{\"message\", \"type\", "
                    "\"param\", \"code\"}}}`. Streams are server-sent events ending with `data: [DONE]`. "
                    "See docs/serving.md.")
    app.state.servers = servers
    app.state.server = next(iter(servers.values()))  # the default model's
    app.state.gateway = gateway
    install_error_handlers(app)
    from leanserve.serve.transport import install_transport_guards  # Host check and body limit, outermost
    larger = None
    if batch_store is not None:
        from leanserve.batch.store import MAX_FILE_BYTES

        larger = {"/v1/files": MAX_FILE_BYTES + 2**20}  # the file plus its multipart framing
    install_transport_guards(app, settings, larger)
    if auth.enabled:
        app.add_middleware(_AuthMiddleware, auth=auth)
    secured = [Security(_bearer)] if auth.enabled else []  # the check is the middleware; this documents it

    @app.get("/health", tags=["ops"], summary="200 when every engine loop is running")
    async def health() -> Response:
        dead = [n for n, e in engines.items() if not e.is_running]
        if dead:
            return APIError(503, f"the engine loop of {', '.join(dead)} is not running", code="engine_dead").response()
        return JSONResponse({"status": "ok"})

    @app.get("/version", tags=["ops"])
    async def version() -> dict[str, str]:
        return {"version": leanserve.__version__}

    @app.get("/metrics", tags=["ops"], dependencies=secured, summary="Prometheus metrics (leanserve: prefix)")
    async def metrics() -> Response:
        return Response(server_metrics.render(), media_type=CONTENT_TYPE)

    install_dashboard(app)

    @app.get("/v1/cost", tags=["cost"], dependencies=secured, responses=_error_responses(401),
             summary="cost figures since start and over a sliding window (docs/cost.md)")
    async def cost(window: float = Query(60.0, gt=0, le=HISTORY_SECONDS,
                                         description="seconds of the sliding window (whole seconds)")) -> Response:
        report = gateway.report(window)
        if len(servers) == 1 and len(gateway.names()) == 1:  # one local model: its full figures on top
            report.update(next(iter(servers.values())).billing.report(window))
        return JSONResponse(report)

    @app.get("/v1/models", tags=["openai"], dependencies=secured, response_model=ModelList, response_model_exclude_none=True,
             responses=_error_responses(401))
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": gateway.cards()}

    @app.get("/v1/models/{model_id:path}", tags=["openai"], dependencies=secured, response_model=ModelCard, response_model_exclude_none=True,
             responses=_error_responses(401, 404))
    async def get_model(model_id: str) -> dict[str, Any]:
        return gateway.card(model_id)

    @app.post("/v1/completions", tags=["openai"], dependencies=secured,
              responses={200: {"model": CompletionResponse, "description": "the completion; with stream: true, "
                               "text/event-stream of chunks in this shape (usage null), then data: [DONE]",
                               "content": {"text/event-stream": {}}},
                         **_error_responses(400, 401, 404, 429, 500, 504)})
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        return await gateway.handle("completions", body, request)

    @app.post("/v1/chat/completions", tags=["openai"], dependencies=secured,
              responses={200: {"model": ChatCompletionResponse, "description": "the completion; with stream: true, "
                               "text/event-stream of chat.completion.chunk objects, then data: [DONE]",
                               "content": {"text/event-stream": {}}},
                         **_error_responses(400, 401, 404, 429, 500, 504)})
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
        return await gateway.handle("chat", body, request)

    @app.post("/v1/embeddings", tags=["openai"], dependencies=secured,
              responses={200: {"description": "one embedding per input, and the usage with its cost"},
                         **_error_responses(400, 401, 404, 429, 500, 504)},
              summary="embeddings of texts or token ids from a local model (mean of the final hidden states)")
    async def create_embedding(body: EmbeddingRequest, request: Request) -> dict[str, Any]:
        server = local(body.model, "/v1/embeddings")
        width = server.engine.engine.info.hidden_size
        if body.dimensions is not None and body.dimensions != width:
            raise invalid(f"dimensions: {server.model} gives {width}-dimensional embeddings, which cannot be "
                          f"shortened (got dimensions={body.dimensions})", "dimensions", "invalid_value")
        vectors, usage = await server.embed(body.inputs, request)
        data = [{"object": "embedding", "index": i,
                 "embedding": v if body.encoding_format == "float"
                 else base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode("ascii")}
                for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": server.model, "usage": usage}

    @app.post("/tokenize", tags=["openai"], dependencies=secured, response_model=TokenizeResponse,
              responses=_error_responses(400, 401, 404), summary="token ids of a prompt or conversation (vLLM's shape)")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        server = local(body.model)
        return await server.tokenize_request(body.model_copy(update={"model": server.model}))

    if runner is not None:
        from leanserve.batch.api import install_batch_routes

        install_batch_routes(app, batch_store, runner, secured)
        app.state.batch_runner = runner
    _drop_422_from_openapi(app)
    return app


def _drop_422_from_openapi(app: FastAPI) -> None:
    """FastAPI documents a 422 for every body; this server answers bad bodies with a 400 instead."""
    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = base()
            for path in schema.get("paths", {}).values():
                for op in path.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
