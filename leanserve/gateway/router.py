"""The gateway: every model the server answers for, the response cache in front of them, cascades,
and the receipts of what each lever saved.

    POST /v1/chat/completions {"model": NAME, ...}
      -> Gateway.handle: NAME is a backend (a local engine: serve/api.py LocalModel; an upstream API:
         UpstreamModel) or a route (a cascade over backends)
      -> the response cache (gateway/cache.py), when the answer is determined and the caller did not
         opt out: a hit is answered at $0 and billed as such; a miss is stored once answered
      -> one backend, or the cascade: the cheapest model first, its answer kept when its confidence
         (gateway/confidence.py) reaches the route's threshold, else the next model; every attempt
         billed, the route taken in the response
      -> usage.cost (the sum of the attempts) and usage.cost_details' receipt: saved_usd and its
         parts (prefix_cache, response_cache, routing), each also in the ledger and /v1/cost

Backends speak OpenAI's shapes as plain dicts: a whole response, or chunk dicts for a stream. A
backend raises `APIError` for anything that fails before its first chunk and yields an ``{"error":
...}`` dict for a failure after it. Responses pass through as the backend made them, except that a
streamed request is always asked for its usage (the gateway needs the bill; the client gets the
usage chunk only if it asked).
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from leanserve.cost.accounting import Billed, BilledBook
from leanserve.cost.billing import receipt
from leanserve.cost.ledger import Ledger, LedgerRecord, key_id
from leanserve.gateway import sse
from leanserve.gateway.cache import ResponseCache, cache_key, cacheable
from leanserve.gateway.confidence import DEFAULT_SCORE, answer_score, choice_text, get_score, token_logprobs
from leanserve.gateway.semantic import SemanticIndex, normalize_text, semantic_group, semantic_text
from leanserve.gateway.upstream import Upstream
from leanserve.serve.errors import APIError
from leanserve.serve.protocol import StreamOptions

log = logging.getLogger("leanserve.gateway")

CACHE_HEADER = "x-leanserve-cache"
ROUTE_HEADER = "x-leanserve-route"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
LEDGER_WAIT_S = 5.0
# a cascade's early model refusing for a reason of its own (a larger model may not): ask the next
ESCALATE_CODES = frozenset({"context_length_exceeded", "chat_template_missing"})


@dataclass(frozen=True)
class Tags:
    """What the gateway knows of a request that its ledger row should say."""

    cache: str | None = None  # the response cache's verdict: miss, bypass
    route: str | None = None  # the cascade it is an attempt of
    batch_id: str | None = None  # a batch line (/v1/batches): its batch
    key_id: str | None = None  # a batch line: its owner's API key id (there is no caller's header)


NO_TAGS = Tags()


@dataclass(frozen=True)
class Call:
    """One request as the gateway hands it to a backend."""

    endpoint: str  # "chat" | "completions"
    body: Any  # the validated request (serve/protocol.py), what a local model reads
    raw: dict[str, Any]  # the JSON as the client sent it, what an upstream is sent
    request: Request  # the HTTP request (its API key, its disconnect)
    tags: Tags = NO_TAGS
    scope: str | None = None  # the caller's API key id: the response cache's scope
    lookup_usd: float = 0.0  # what the semantic stage's embedding of this request cost (in its bill)
    semantic: tuple[str, list[float]] | None = None  # (group, vector): stored beside the entry once answered

    def with_(self, *, model: str | None = None, stream: bool | None = None, logprobs: bool = False,
              tags: Tags | None = None) -> Call:
        """The same request changed for an attempt: another model, streamed or not (a stream always
        asks for its usage), the chosen tokens' logprobs (a cascade's confidence needs them)."""
        upd: dict[str, Any] = {}
        raw = dict(self.raw)
        if model is not None:
            upd["model"] = raw["model"] = model
        if stream is not None:
            upd["stream"] = raw["stream"] = stream
            upd["stream_options"] = StreamOptions(include_usage=True) if stream else None
            if stream:
                raw["stream_options"] = {"include_usage": True}
            else:
                raw.pop("stream_options", None)
        if logprobs:
            if self.endpoint == "chat":
                upd["logprobs"] = raw["logprobs"] = True
            elif self.body.logprobs is None:
                upd["logprobs"] = raw["logprobs"] = 0
        return replace(self, body=self.body.model_copy(update=upd), raw=raw, tags=tags or self.tags)

    @property
    def wants_logprobs(self) -> bool:
        return bool(self.body.logprobs) if self.endpoint == "chat" else self.body.logprobs is not None


class Backend(Protocol):
    """A model the gateway can send a request to: a local engine or an upstream API."""

    name: str
    kind: str  # "local" | "upstream"
    book: BilledBook  # what it billed (the gateway adds cache hits and routing receipts)

    def card(self) -> dict[str, Any]: ...  # its entry in /v1/models

    async def complete(self, call: Call) -> dict[str, Any]: ...  # a whole response (APIError on failure)

    def stream(self, call: Call) -> AsyncIterator[dict[str, Any]]: ...  # chunks (its usage chunk last)

    def estimate_usd(self, prompt_tokens: int, completion_tokens: int) -> float | None: ...


@dataclass(frozen=True)
class CascadeSpec:
    """A route that tries its models in order (cheapest first) and keeps the first confident answer."""

    name: str
    models: tuple[str, ...]
    threshold: float = -0.5  # accept when score >= threshold
    score: str = DEFAULT_SCORE

    def __post_init__(self) -> None:
        if not self.name or len(self.models) < 2:
            raise ValueError(f"cascade {self.name!r}: needs a name and at least two models")
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"cascade {self.name!r}: a model appears twice")
        if not math.isfinite(self.threshold):
            raise ValueError(f"cascade {self.name!r}: the threshold must be a finite number")
        get_score(self.score)


def parse_cascade(text: str, threshold: float, score: str) -> CascadeSpec:
    """``NAME=MODEL1,MODEL2[,...]`` (the flag's value) -> a CascadeSpec; ValueError with one line."""
    name, eq, models = text.partition("=")
    if not eq or not name.strip():
        raise ValueError(f"--cascade {text!r}: expected NAME=MODEL1,MODEL2 (cheapest first)")
    return CascadeSpec(name.strip(), tuple(m.strip() for m in models.split(",") if m.strip()), threshold, score)


def _usage(resp: dict[str, Any]) -> dict[str, Any]:
    return resp.get("usage") or {}


def _cost(resp: dict[str, Any]) -> float:
    c = _usage(resp).get("cost")
    return float(c) if isinstance(c, (int, float)) else 0.0


def _saved(resp: dict[str, Any]) -> dict[str, float]:
    s = (_usage(resp).get("cost_details") or {}).get("saved") or {}
    return {k: float(s.get(k) or 0.0) for k in ("prefix_cache", "response_cache", "routing")}


def _strip_logprobs(resp: dict[str, Any]) -> None:
    for c in resp.get("choices") or []:
        c["logprobs"] = None


class Gateway:
    """Routes by model name; owns the response cache, the cascades and the receipts they write."""

    def __init__(self, backends: list[Backend], cascades: list[CascadeSpec] = (), cache: ResponseCache | None = None,
                 ledger: Ledger | None = None, semantic: SemanticIndex | None = None,
                 embedder: str | None = None) -> None:
        self.backends: dict[str, Backend] = {}
        for b in backends:
            if b.name in self.backends:
                raise ValueError(f"two models are named {b.name!r}: give one another name")
            self.backends[b.name] = b
        self.cascades: dict[str, CascadeSpec] = {}
        self.route_books: dict[str, BilledBook] = {}  # cache hits of a route are billed to the route
        for c in cascades:
            if c.name in self.backends or c.name in self.cascades:
                raise ValueError(f"cascade {c.name!r}: the name is taken by a model or another cascade")
            unknown = [m for m in c.models if m not in self.backends]
            if unknown:
                raise ValueError(f"cascade {c.name!r} names an unknown model {unknown[0]!r}; served: "
                                 f"{', '.join(self.backends)}")
            self.cascades[c.name] = c
            self.route_books[c.name] = BilledBook()
        if not self.backends:
            raise ValueError("the gateway needs at least one model")
        self.default = next(iter(self.backends))
        self.cache = cache
        self.ledger = ledger
        if semantic is not None and (cache is None or embedder not in self.backends
                                     or not hasattr(self.backends[embedder], "embed")):
            raise ValueError(f"the semantic cache needs the response cache and a local model to embed with "
                             f"(got {embedder!r})")
        self.semantic = semantic
        self.embedder = embedder
        self.created = int(time.time())
        self.lookups = {"hit": 0, "semantic_hit": 0, "miss": 0, "bypass": 0, "off": 0}
        self.routes: dict[tuple[str, str], int] = {}  # (route, answered by) -> requests

    # ---- names ---------------------------------------------------------------------------------

    def book(self, name: str) -> BilledBook:
        return self.route_books[name] if name in self.route_books else self.backends[name].book

    def books(self) -> dict[str, BilledBook]:
        return {**{n: b.book for n, b in self.backends.items()}, **self.route_books}

    def resolve(self, model: str | None) -> str:
        name = model if model is not None else self.default
        if name in self.backends or name in self.cascades:
            return name
        shown = repr(name) if len(name) <= 80 else repr(name[:80]) + "..."
        raise APIError(404, f"the model {shown} does not exist; this server serves "
                            f"{', '.join(repr(n) for n in self.names())} (GET /v1/models)", param="model",
                       code="model_not_found")

    def names(self) -> list[str]:
        return [*self.backends, *self.cascades]

    def cards(self) -> list[dict[str, Any]]:
        cards = [b.card() for b in self.backends.values()]
        for c in self.cascades.values():
            cards.append({"id": c.name, "object": "model", "created": self.created, "owned_by": "leanserve",
                          "route": {"kind": "cascade", "models": list(c.models), "score": c.score,
                                    "threshold": c.threshold}})
        return cards

    def card(self, model: str) -> dict[str, Any]:
        name = self.resolve(model)
        return next(c for c in self.cards() if c["id"] == name)

    # ---- a request -----------------------------------------------------------------------------

    async def handle(self, endpoint: str, body: Any, request: Request, internal: Tags | None = None) -> Response:
        """One request: an HTTP one, or (``internal``: its owner's key id and batch) one the server makes
        itself, a batch line, which takes the same path (routes, the cache, bills) but is never streamed."""
        name = self.resolve(body.model)
        raw = await request.json()
        if not isinstance(raw, dict):  # the body was validated as an object; a defensive check
            raise APIError(400, "the request body must be a JSON object")
        scope = internal.key_id if internal is not None else caller_key_id(request)
        call = Call(endpoint, body, raw, request, tags=internal or NO_TAGS, scope=scope)
        verdict, key = self._lookup_key(name, call, scope)
        if key is not None:
            entry = await asyncio.to_thread(self.cache.get, key)  # type: ignore[union-attr]
            if entry is not None:
                self.lookups["hit"] += 1
                return await self._hit(name, call, scope, entry)
            if self.semantic is not None:
                call, hit = await self._semantic_lookup(name, call)
                if hit is not None:
                    self.lookups["semantic_hit"] += 1
                    return hit
        self.lookups[verdict] += 1
        call = replace(call, tags=replace(call.tags, cache=verdict if self.cache is not None and verdict != "off" else None))
        headers = {CACHE_HEADER: verdict} if self.cache is not None else {}
        if name in self.cascades:
            return await self._cascade(self.cascades[name], call, key, headers)
        backend = self.backends[name]
        if body.stream:
            chunks = backend.stream(call.with_(stream=True))
            return await self._stream_out(call, name, chunks, key, headers, None)
        resp = await backend.complete(call.with_(stream=False))
        self._mark(resp, headers, call)
        await self._store(call, key, name, resp)
        return JSONResponse(resp, headers=headers)

    def _lookup_key(self, name: str, call: Call, scope: str | None) -> tuple[str, str | None]:
        """(the cache verdict before looking: miss, bypass or off; the entry's key, None: don't look)."""
        if self.cache is None:
            return "off", None
        h = call.request.headers
        opt_out = (h.get(CACHE_HEADER, "").strip().lower() in ("bypass", "no-store", "off")
                   or any(d.strip().lower() in ("no-cache", "no-store") for d in h.get("cache-control", "").split(",")))
        if opt_out:
            return "bypass", None
        if not cacheable(call.raw):
            return "off", None
        return "miss", cache_key(scope, name, call.endpoint, call.raw)

    def _mark(self, resp: dict[str, Any], headers: dict[str, str], call: Call) -> None:
        """With the cache on, every answer's cost_details says what the cache did (hit, miss, bypass, off),
        and its cost includes the semantic stage's lookup, when there was one."""
        usage = resp.get("usage")
        if CACHE_HEADER in headers and usage:
            details = usage.setdefault("cost_details", {})
            details["cache"] = headers[CACHE_HEADER]
            if call.semantic is not None:
                details["lookup_usd"] = call.lookup_usd
                usage["cost"] = float(usage.get("cost") or 0.0) + call.lookup_usd

    async def complete_internal(self, endpoint: str, body: Any, raw: dict[str, Any], tags: Tags) -> dict[str, Any]:
        """A request the server makes itself (a batch line): the whole response as a dict, or APIError."""
        resp = await self.handle(endpoint, body, internal_request(raw), tags)
        return json.loads(bytes(resp.body))

    async def _semantic_lookup(self, name: str, call: Call) -> tuple[Call, Response | None]:
        """The second stage after an exact miss: embed the request's text (billed: its own ledger row,
        its cost in this answer's), find the nearest stored text of the same group."""
        assert self.semantic is not None and self.embedder is not None
        grp = semantic_group(call.scope, name, call.endpoint, call.raw)
        if grp is None:
            return call, None
        text = normalize_text(semantic_text(call.endpoint, call.raw) or "")
        if not text:
            return call, None
        embedder = self.backends[self.embedder]
        try:
            vectors, usage = await embedder.embed([text], call.request, Tags(cache="lookup"))  # type: ignore[attr-defined]
        except APIError as e:  # e.g. a text past the embedding model's context: the exact stage alone
            log.info("semantic cache lookup skipped: %s", e.message)
            return call, None
        call = replace(call, lookup_usd=float(usage.get("cost") or 0.0), semantic=(grp, vectors[0]))
        found = await asyncio.to_thread(self.semantic.search, grp, vectors[0])
        if found is None:
            return call, None
        entry = await asyncio.to_thread(self.cache.get, found[0])  # type: ignore[union-attr]
        if entry is None:  # expired or evicted since: forget its vector
            await asyncio.to_thread(self.semantic.drop, grp, found[0])
            return call, None
        return call, await self._hit(name, call, call.scope, entry, similarity=found[1])

    async def _store(self, call: Call, key: str | None, name: str, resp: dict[str, Any]) -> None:
        if key is None or self.cache is None:
            return
        try:
            stored = await asyncio.to_thread(self.cache.put, key, name, resp, _cost(resp) - call.lookup_usd,
                                             scope=call.scope)
            if stored and call.semantic is not None and self.semantic is not None:
                await asyncio.to_thread(self.semantic.add, call.semantic[0], key, call.semantic[1])
        except Exception as e:  # noqa: BLE001 - a full disk must not fail an answered request
            log.warning("could not store a response in the cache: %s", e)

    # ---- cache hits ----------------------------------------------------------------------------

    async def _hit(self, name: str, call: Call, scope: str | None, entry: Any, similarity: float | None = None) -> Response:
        """Answer from the cache: the stored response under a new id, $0 (a semantic hit: what its
        lookup's embedding cost), its receipt the first answer's cost."""
        resp = copy.deepcopy(entry.response)
        rid = f"{'chatcmpl' if call.endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        first_id = resp.get("id")
        resp["id"], resp["created"] = rid, int(time.time())
        usage = resp.setdefault("usage", {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0})
        verdict = "hit" if similarity is None else "semantic-hit"
        usage["cost"] = call.lookup_usd
        usage["cost_details"] = {"machine_seconds": 0.0, "input_usd": 0.0, "output_usd": 0.0, "price_per_hour": 0.0,
                                 "hardware": "response-cache", "cache": verdict,
                                 "cached_response_id": first_id, "cached_at": entry.created,
                                 **receipt(response_cache=entry.cost_usd)}
        if similarity is not None:
            usage["cost_details"].update(similarity=similarity, lookup_usd=call.lookup_usd)
        usage.pop("completion_tokens_details", None)
        rec = LedgerRecord(id=rid, ts=time.time(), key_id=scope, model=name,
                           prompt_tokens=int(usage.get("prompt_tokens") or 0),
                           cached_tokens=0, output_tokens=int(usage.get("completion_tokens") or 0),
                           machine_seconds=0.0, prefill_seconds=0.0, cost_usd=0.0, price_per_hour=0.0,
                           hardware="response-cache", latency_s=0.0, finish_reason=_finish(resp), input_usd=0.0,
                           cache="hit", route=name if name in self.cascades else None,
                           saved_cache_usd=entry.cost_usd, batch_id=call.tags.batch_id)
        await self.record(self.book(name), rec)
        headers = {CACHE_HEADER: verdict}
        if not call.body.stream:
            return JSONResponse(resp, headers=headers)
        chunks = sse.replay(call.endpoint, resp, include_usage=call.body.include_usage)
        body = b"".join(sse.encode(c) for c in chunks) + sse.DONE
        return Response(body, media_type="text/event-stream", headers={**SSE_HEADERS, **headers})

    async def record(self, book: BilledBook, rec: LedgerRecord) -> None:
        """Bill a row the engines do not (a cache hit, an upstream's answer) and wait for the ledger."""
        book.bill(rec)
        if self.ledger is not None:
            fut = self.ledger.record(rec)
            try:
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), LEDGER_WAIT_S)
            except Exception as e:  # noqa: BLE001 - the writer logged it; answer anyway
                log.warning("ledger row of %s not confirmed: %s", rec.id, e)

    # ---- streams -------------------------------------------------------------------------------

    async def _stream_out(self, call: Call, name: str, chunks: AsyncIterator[dict[str, Any]], key: str | None,
                          headers: dict[str, str], on_usage: Any) -> Response:
        """Pass a backend's chunks to the client (errors before the first one become the HTTP answer);
        keep the usage chunk only if the client asked; store the assembled answer on a clean end.
        ``on_usage(usage)`` may amend the usage chunk (a cascade's sum and route) first."""
        try:
            first = await chunks.__anext__()
        except StopAsyncIteration:
            raise APIError(502, "the model sent an empty stream", code="upstream_error", type="server_error") from None
        except BaseException:
            await chunks.aclose()
            raise
        want_usage = call.body.include_usage

        async def gen() -> AsyncIterator[bytes]:
            seen: list[dict[str, Any]] = []
            ok = True
            try:
                chunk: dict[str, Any] | None = first
                while chunk is not None:
                    if "error" in chunk:
                        ok = False
                        yield sse.encode(chunk)
                        break
                    usage = chunk.get("usage")
                    if usage:
                        self._mark(chunk, headers, call)
                        if on_usage is not None:
                            on_usage(chunk)
                    seen.append(chunk)
                    if want_usage:
                        yield sse.encode(chunk)
                    elif not usage:
                        out = dict(chunk)
                        out.pop("usage", None)
                        yield sse.encode(out)
                    chunk = await _next(chunks)
                if ok and key is not None:  # before [DONE]: a client that asks again at once finds it
                    await self._store(call, key, name, sse.assemble(call.endpoint, seen))
                yield sse.DONE
            finally:
                await chunks.aclose()

        return StreamingResponse(gen(), media_type="text/event-stream", headers={**SSE_HEADERS, **headers})

    # ---- cascades ------------------------------------------------------------------------------

    async def _cascade(self, route: CascadeSpec, call: Call, key: str | None, headers: dict[str, str]) -> Response:
        """Try the route's models in order; keep the first answer whose confidence reaches the threshold
        (the last model's answer is always kept). Every attempt is billed; the response says the route."""
        tags = replace(call.tags, route=route.name)
        attempts: list[dict[str, Any]] = []
        spent = 0.0
        saved = {"prefix_cache": 0.0, "response_cache": 0.0, "routing": 0.0}
        for name in route.models[:-1]:
            backend = self.backends[name]
            try:
                resp = await backend.complete(call.with_(model=name, stream=False, logprobs=True, tags=tags))
            except APIError as e:
                if e.status < 500 and e.status not in (408, 429) and e.code not in ESCALATE_CODES:
                    raise  # the request itself is wrong: the next model would refuse it too
                attempts.append({"model": name, "error": e.message, "accepted": False, "cost": 0.0})
                continue
            scores = [answer_score(route.score, choice_text(call.endpoint, resp, c.get("index", 0)),
                                   token_logprobs(call.endpoint, resp, c.get("index", 0)))
                      for c in resp.get("choices") or []]
            score = min(scores) if scores else -math.inf
            accepted = score >= route.threshold
            cost = _cost(resp)
            spent += cost
            for k, v in _saved(resp).items():
                saved[k] += v
            attempts.append({"model": name, "score": score if math.isfinite(score) else None, "accepted": accepted,
                             "cost": cost, "id": resp.get("id")})
            if accepted:
                return await self._answer(route, call, key, headers, resp, attempts, spent, saved)
        last = route.models[-1]
        backend = self.backends[last]
        final_call = call.with_(model=last, tags=tags)
        attempts.append({"model": last, "accepted": True, "cost": None, "id": None})
        if call.body.stream:
            chunks = backend.stream(final_call.with_(stream=True))

            def on_usage(chunk: dict[str, Any]) -> None:
                self._settle_route(route, chunk, attempts, spent, saved, last_backend=last)

            return await self._stream_out(call, route.name, chunks, key,
                                          {**headers, ROUTE_HEADER: _route_header(attempts)}, on_usage)
        resp = await backend.complete(final_call.with_(stream=False))
        self._settle_route(route, resp, attempts, spent, saved, last_backend=last)
        self._mark(resp, headers, call)
        await self._store(call, key, route.name, resp)
        return JSONResponse(resp, headers={**headers, ROUTE_HEADER: _route_header(attempts)})

    async def _answer(self, route: CascadeSpec, call: Call, key: str | None, headers: dict[str, str],
                      resp: dict[str, Any], attempts: list[dict[str, Any]], spent: float,
                      saved: dict[str, float]) -> Response:
        """An early model's answer was kept: say so, price the routing receipt, answer as asked."""
        answered = attempts[-1]["model"]
        usage = resp.get("usage") or {}
        estimate = self.backends[route.models[-1]].estimate_usd(int(usage.get("prompt_tokens") or 0),
                                                                int(usage.get("completion_tokens") or 0))
        routing = estimate - spent if estimate is not None else 0.0
        self._book_routing(route, answered, resp.get("id"), routing)
        saved = {**saved, "routing": saved["routing"] + routing}
        if not call.wants_logprobs:
            _strip_logprobs(resp)
        resp["route"] = {"name": route.name, "answered_by": answered, "attempts": attempts,
                         "largest_model_estimate_usd": estimate}
        details = usage.setdefault("cost_details", {})
        details.update(receipt(**saved))
        usage["cost"] = spent
        self._mark(resp, headers, call)
        self.routes[(route.name, answered)] = self.routes.get((route.name, answered), 0) + 1
        await self._store(call, key, route.name, resp)
        headers = {**headers, ROUTE_HEADER: _route_header(attempts)}
        if not call.body.stream:
            return JSONResponse(resp, headers=headers)
        chunks = sse.replay(call.endpoint, resp, include_usage=call.body.include_usage)
        body = b"".join(sse.encode(c) for c in chunks) + sse.DONE
        return Response(body, media_type="text/event-stream", headers={**SSE_HEADERS, **headers})

    def _settle_route(self, route: CascadeSpec, resp: dict[str, Any], attempts: list[dict[str, Any]], spent: float,
                      saved: dict[str, float], last_backend: str) -> None:
        """The last model answered (a whole response or its usage chunk): the bill is the sum of the
        attempts, routing saved minus what the earlier attempts cost."""
        usage = resp.get("usage") or {}
        cost = _cost(resp)
        attempts[-1].update(cost=cost, id=resp.get("id"))
        routing = -spent
        self._book_routing(route, last_backend, resp.get("id"), routing)
        mine = _saved(resp)
        total = {k: saved[k] + mine[k] for k in saved}
        total["routing"] += routing
        details = usage.setdefault("cost_details", {})
        details.update(receipt(**total))
        usage["cost"] = spent + cost
        resp["route"] = {"name": route.name, "answered_by": last_backend, "attempts": attempts,
                         "largest_model_estimate_usd": cost}
        self.routes[(route.name, last_backend)] = self.routes.get((route.name, last_backend), 0) + 1

    def _book_routing(self, route: CascadeSpec, model: str, row_id: str | None, usd: float) -> None:
        """The routing receipt goes on the answering attempt's row, in the ledger and the live totals."""
        self.backends[model].book.add_saved_routing(usd)
        if self.ledger is not None and row_id is not None:
            self.ledger.amend(row_id, route=route.name, saved_routing_usd=usd)

    # ---- reports -------------------------------------------------------------------------------

    def report(self, window: float, local_report: Any = None) -> dict[str, Any]:
        """GET /v1/cost: each model's (and route's) figures and their sums."""
        models = {}
        for name, book in self.books().items():
            kind = "route" if name in self.route_books else self.backends[name].kind
            models[name] = {"kind": kind, "since_start": book.report(None), "window": book.report(window)}
        total, total_w = Billed(), Billed()
        for book in self.books().values():
            total.merge(book.billed(None))
            total_w.merge(book.billed(window))
        out: dict[str, Any] = {"object": "cost", "models": models,
                               "since_start": {"window_seconds": None, **total.figures()},
                               "window": {"window_seconds": window, **total_w.figures()}}
        if self.cache is not None:
            out["response_cache"] = {**self.cache.stats(), "lookups": dict(self.lookups)}
            if self.semantic is not None:
                out["response_cache"]["semantic"] = {"model": self.embedder, **self.semantic.stats()}
        return out

    def collector(self) -> Collector:
        return _GatewayCollector(self)


async def _next(chunks: AsyncIterator[dict[str, Any]]) -> dict[str, Any] | None:
    try:
        return await chunks.__anext__()
    except StopAsyncIteration:
        return None


def _finish(resp: dict[str, Any]) -> str:
    choices = resp.get("choices") or [{}]
    return choices[0].get("finish_reason") or "stop"


def _route_header(attempts: list[dict[str, Any]]) -> str:
    parts = []
    for a in attempts:
        state = "answered" if a["accepted"] else "error" if "error" in a else "escalated"
        score = a.get("score")
        parts.append(f"{a['model']}={state}" + (f"({score:.4f})" if isinstance(score, float) else ""))
    return ", ".join(parts)


def internal_request(raw: dict[str, Any]) -> Request:
    """An HTTP request the server makes to itself: ``raw`` as its JSON body, no headers, and a client
    that never goes away (nothing can disconnect it; abort it by cancelling its task)."""
    body = json.dumps(raw).encode("utf-8")
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # never: an internal request has no client to lose
        raise AssertionError("unreachable")

    scope = {"type": "http", "method": "POST", "path": "/internal", "headers": [], "query_string": b""}
    return Request(scope, receive)


def caller_key_id(request: Request) -> str | None:
    """The id of the API key a request carries (None without one): its cache scope, its files' owner."""
    scheme, _, token = (request.headers.get("authorization") or "").strip().partition(" ")
    return key_id(token.strip()) if scheme.lower() == "bearer" and token.strip() else None


class _GatewayCollector(Collector):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def collect(self) -> Iterator[Metric]:
        g = self.gateway
        c = CounterMetricFamily("leanserve:response_cache_lookups", "Requests by the response cache's verdict "
                                "(hit, miss, bypass: the client opted out, off: output not determined).",
                                labels=["result"])
        for result, n in g.lookups.items():
            c.add_metric([result], float(n))
        yield c
        if g.cache is not None:
            stats = g.cache.stats()
            for name, doc, key in (("response_cache_entries", "Entries in the response cache.", "entries"),
                                   ("response_cache_bytes", "Bytes of the response cache's entries.", "bytes")):
                gauge = GaugeMetricFamily(f"leanserve:{name}", doc)
                gauge.add_metric([], float(stats[key]))
                yield gauge
        r = CounterMetricFamily("leanserve:route_requests", "Cascade requests by the model that answered.",
                                labels=["route", "answered_by"])
        for (route, model), n in g.routes.items():
            r.add_metric([route, model], float(n))
        yield r


# ---- upstream models -------------------------------------------------------------------------

@dataclass
class UpstreamModel:
    """An upstream API as a backend: its answers billed at its list price (or its own usage.cost), a
    ledger row each, under our own response id."""

    upstream: Upstream
    gateway_record: Any = None  # Gateway.record, set by the gateway's owner
    book: BilledBook = field(default_factory=BilledBook)
    kind: str = "upstream"
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def name(self) -> str:
        return self.upstream.name

    def card(self) -> dict[str, Any]:
        spec = self.upstream.spec
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": f"upstream:{self.name}",
                "upstream": {"model": spec.model, "input_usd_per_mtok": spec.input_usd_per_mtok,
                             "output_usd_per_mtok": spec.output_usd_per_mtok}}

    def estimate_usd(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        s = self.upstream.spec
        return (prompt_tokens * s.input_usd_per_mtok + completion_tokens * s.output_usd_per_mtok) / 1e6

    def _rename(self, obj: dict[str, Any], rid: str) -> None:
        obj["id"] = rid
        obj["model"] = self.name

    async def complete(self, call: Call) -> dict[str, Any]:
        t0 = time.monotonic()
        rid = _new_id(call)
        resp = await self.upstream.complete(call.endpoint, call.raw)
        self._rename(resp, rid)
        await self._bill(call, rid, resp.get("usage"), _finish(resp), time.monotonic() - t0)
        return resp

    async def stream(self, call: Call) -> AsyncIterator[dict[str, Any]]:
        t0 = time.monotonic()
        rid = _new_id(call)
        chunks = self.upstream.stream(call.endpoint, call.raw)
        usage, finish, billed = None, None, False
        try:
            async for chunk in chunks:
                if "error" not in chunk:
                    self._rename(chunk, rid)
                    for c in chunk.get("choices") or []:
                        finish = c.get("finish_reason") or finish
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                        await self._bill(call, rid, usage, finish or "stop", time.monotonic() - t0)
                        billed = True
                yield chunk
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]
            if not billed:  # the client went away or the stream failed: what the upstream charged is unknown
                await self._bill(call, rid, None, "abort", time.monotonic() - t0)

    async def _bill(self, call: Call, rid: str, usage: dict[str, Any] | None, finish: str, latency: float) -> None:
        if usage is None:
            usage = {}
        if "cost" not in usage:
            usage.update(self.upstream.cost(usage or None))
        details = usage.get("cost_details") or {}
        usage.setdefault("cost_details", details)
        details.update(receipt())
        cost = float(usage.get("cost") or 0.0)
        rec = LedgerRecord(id=rid, ts=time.time(), key_id=call.scope, model=self.name,
                           prompt_tokens=int(usage.get("prompt_tokens") or 0), cached_tokens=0,
                           output_tokens=int(usage.get("completion_tokens") or 0), machine_seconds=0.0,
                           prefill_seconds=0.0, cost_usd=cost, price_per_hour=0.0, hardware=f"upstream:{self.name}",
                           latency_s=latency, finish_reason=finish, input_usd=details.get("input_usd"),
                           cache=call.tags.cache, route=call.tags.route, batch_id=call.tags.batch_id)
        if self.gateway_record is not None:
            await self.gateway_record(self.book, rec)
        else:
            self.book.bill(rec)


def _new_id(call: Call) -> str:
    return f"{'chatcmpl' if call.endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
