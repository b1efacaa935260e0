"""An upstream: any OpenAI-compatible API (OpenAI, another leanserve, vLLM...) served as one model here.

    --upstream NAME=URL[,model=REMOTE][,key_env=VAR][,input=USD_PER_MTOK][,output=USD_PER_MTOK]
                       [,timeout=S][,retries=N]

A request for model NAME is forwarded to ``URL/chat/completions`` or ``URL/completions`` (URL is the
API base, including /v1) with ``"model"`` replaced by REMOTE (default NAME) and the key from the
environment variable VAR sent as ``Authorization: Bearer``. Its bill is the upstream's own
``usage.cost`` when it reports one, else the list price (``input``/``output``, USD per million tokens)
times the tokens in its ``usage``.

Every failure reaches the client as an `APIError` (OpenAI's error format):

    upstream answered 4xx (JSON error)   same status, "upstream NAME: <its message>", its type/code/param
    upstream answered 4xx (other body)   same status, the status and the first 200 characters of the body
    upstream answered 429                429, its Retry-After passed through
    5xx, malformed JSON, broken stream   502 upstream_error
    connect error, DNS, refused          502 upstream_unreachable
    timeout (connect, read, pool)        504 upstream_timeout

Retries: at most ``spec.retries`` more attempts, and only where the upstream cannot have begun the
work (a connect error or connect timeout) or said so (429, 502, 503, 504), never once a response body
was read. Backoff 0.25 s, 0.5 s, 1 s, then 2 s each. Once a stream has yielded a chunk the client's
response has begun, so a later failure is yielded as one ``{"error": {...}}`` dict, then the stream ends.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from leanserve import env
from leanserve.serve.errors import APIError

ENDPOINTS = {"chat": "/chat/completions", "completions": "/completions"}
RETRY_STATUSES = frozenset({429, 502, 503, 504})
BACKOFF_FIRST_S = 0.25
BACKOFF_MAX_S = 2.0
CHECK_TIMEOUT_MAX_S = 10.0  # check() at start-up and every connect phase wait at most this long
MAX_RETRIES = 10
MAX_CONNECTIONS = 64
ERROR_TEXT_CHARS = 200  # of a non-JSON error body, in the client's message


@dataclass(frozen=True)
class UpstreamSpec:
    name: str  # the model name clients ask for here
    url: str  # the API base, e.g. http://127.0.0.1:8001/v1 (no trailing '/')
    model: str  # the model name sent upstream
    key_env: str | None = None  # the environment variable that holds the key
    input_usd_per_mtok: float = 0.0  # list price, USD per million prompt tokens
    output_usd_per_mtok: float = 0.0  # list price, USD per million completion tokens
    timeout_s: float = 60.0
    retries: int = 2


# ---- --upstream NAME=URL,opt=value... ----------------------------------------------------------

def _price(key: str, value: str) -> float:
    try:
        price = float(value)
    except ValueError:
        raise ValueError(f"{key}={value!r} is not a number (USD per million tokens)") from None
    if not math.isfinite(price) or price < 0:
        raise ValueError(f"{key}={value!r} must be a finite price >= 0 (USD per million tokens)")
    return price


def parse_upstream(text: str) -> UpstreamSpec:
    """``NAME=URL[,key=value...]`` -> UpstreamSpec; ValueError with a one-line message naming the bad part."""
    if "=" not in text:
        raise ValueError(f"--upstream {text!r}: expected NAME=URL[,model=...,key_env=...]: no '='")
    name, _, rest = text.partition("=")
    name = name.strip()
    if not name:
        raise ValueError(f"--upstream {text!r}: empty name before '='")
    url, *options = rest.split(",")
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--upstream {name}: URL {url!r} must be http(s)://host[:port]/... (the API base, with /v1)")
    fields: dict[str, Any] = {}
    for option in options:
        key, eq, value = (s.strip() for s in option.partition("="))
        if not eq:
            raise ValueError(f"--upstream {name}: option {option!r} must be key=value")
        if key in ("model", "key_env") and not value:
            raise ValueError(f"--upstream {name}: empty value for {key}")
        if key == "model":
            fields["model"] = value
        elif key == "key_env":
            fields["key_env"] = value
        elif key in ("input", "output"):
            fields[f"{key}_usd_per_mtok"] = _price(key, value)
        elif key == "timeout":
            try:
                timeout = float(value)
            except ValueError:
                timeout = math.nan
            if not (math.isfinite(timeout) and timeout > 0):
                raise ValueError(f"--upstream {name}: timeout={value!r} must be a number of seconds > 0")
            fields["timeout_s"] = timeout
        elif key == "retries":
            if not value.isdigit() or int(value) > MAX_RETRIES:
                raise ValueError(f"--upstream {name}: retries={value!r} must be an integer in 0..{MAX_RETRIES}")
            fields["retries"] = int(value)
        else:
            raise ValueError(f"--upstream {name}: unknown option {key!r} "
                             "(one of: model, key_env, input, output, timeout, retries)")
    fields.setdefault("model", name)
    return UpstreamSpec(name=name, url=url, **fields)


# ---- server-sent events ------------------------------------------------------------------------

async def _sse_data(body: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """The ``data`` of each event in an SSE byte stream (multi-line data joined by '\\n'; comments and
    other fields skipped). An event left unterminated at the end of the stream is still yielded: a
    truncated JSON payload then fails to parse, which the caller reports."""
    buffer = b""
    data: list[str] = []
    async for piece in body:
        buffer += piece
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = raw.rstrip(b"\r").decode("utf-8", errors="replace")
            if not line:
                if data:
                    yield "\n".join(data)
                data = []
            elif line.startswith("data:"):
                data.append(line[6:] if line.startswith("data: ") else line[5:])
    if buffer.strip().startswith(b"data:"):
        line = buffer.rstrip(b"\r").decode("utf-8", errors="replace")
        data.append(line[6:] if line.startswith("data: ") else line[5:])
    if data:
        yield "\n".join(data)


# ---- the client --------------------------------------------------------------------------------

class UpstreamError(Exception):
    """A start-up failure (missing key, unreachable upstream, rejected key): one line for the operator."""


def _reason(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _error_fields(payload: Any) -> dict[str, Any] | None:
    """OpenAI's ``{"error": {"message", ...}}`` (or ``{"error": "message"}``) out of a decoded body."""
    if not isinstance(payload, dict):
        return None
    err = payload.get("error")
    if isinstance(err, str):
        return {"message": err}
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return err
    return None


class Upstream:
    """One OpenAI-compatible API behind model ``spec.name``. Its httpx client is made on first use in the
    running event loop (the server's loop is not running when the Upstream is built) and remade if a
    later call runs in another loop; `aclose` closes it."""

    def __init__(self, spec: UpstreamSpec, environ: Mapping[str, str] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.spec = spec
        self.name = spec.name
        self._key: str | None = None
        if spec.key_env is not None:
            self._key = (environ.get(spec.key_env) if environ is not None else env.named(spec.key_env)) or None
            if self._key is None:
                raise UpstreamError(f"upstream {spec.name}: the environment variable {spec.key_env} is not set")
        self._transport = transport
        self._sleep = sleep  # injectable so tests do not wait out the backoff
        self._client: httpx.AsyncClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None

    # -- plumbing

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._key}"} if self._key else {}

    def _new_client(self, timeout: httpx.Timeout) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=self._transport, timeout=timeout, headers=self._headers(),
                                 limits=httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=16))

    def _get_client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            # a client left in a finished loop cannot be closed from this one; its sockets die with that loop
            timeout = httpx.Timeout(self.spec.timeout_s, connect=min(CHECK_TIMEOUT_MAX_S, self.spec.timeout_s))
            self._client, self._client_loop = self._new_client(timeout), loop
        return self._client

    def _backoff(self, attempt: int) -> float:
        return min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** attempt)

    def _body(self, endpoint: str, body: dict[str, Any], stream: bool) -> tuple[str, dict[str, Any]]:
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {sorted(ENDPOINTS)}, got {endpoint!r}")
        sent = dict(body)  # shallow: only top-level keys change
        sent["model"] = self.spec.model
        sent["stream"] = stream
        sent.pop("stream_options", None)
        if stream:
            sent["stream_options"] = {"include_usage": True}  # so the bill is known
        return self.spec.url + ENDPOINTS[endpoint], sent

    def _unreachable(self, e: Exception) -> APIError:
        return APIError(502, f"upstream {self.name} is unreachable: {_reason(e)}", code="upstream_unreachable",
                        type="server_error")

    def _timeout(self, e: Exception) -> APIError:
        return APIError(504, f"upstream {self.name} timed out ({_reason(e)})", code="upstream_timeout",
                        type="timeout_error")

    def _bad_gateway(self, detail: str) -> APIError:
        return APIError(502, f"upstream {self.name}: {detail}", code="upstream_error", type="server_error")

    async def _open(self, url: str, body: dict[str, Any]) -> httpx.Response:
        """POST and return a 2xx response with its body not yet read (the caller closes it). Retries connect
        failures and 429/502/503/504 answers; raises APIError for everything else and after the last try."""
        client = self._get_client()
        for attempt in range(self.spec.retries + 1):
            last = attempt == self.spec.retries
            try:
                response = await client.send(client.build_request("POST", url, json=body), stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                if last:
                    raise (self._timeout(e) if isinstance(e, httpx.TimeoutException) else self._unreachable(e)) from e
                await self._sleep(self._backoff(attempt))
                continue
            except httpx.TimeoutException as e:  # pool/write/read timeout: the request may be running
                raise self._timeout(e) from e
            except httpx.TransportError as e:
                raise self._bad_gateway(f"the request failed ({_reason(e)})") from e
            if response.is_success:
                return response
            if response.status_code in RETRY_STATUSES and not last:
                await response.aclose()
                await self._sleep(self._backoff(attempt))
                continue
            try:
                await response.aread()
            except httpx.TimeoutException as e:
                raise self._timeout(e) from e
            except httpx.TransportError as e:
                raise self._bad_gateway(f"answered HTTP {response.status_code}, then the body failed "
                                        f"({_reason(e)})") from e
            finally:
                await response.aclose()
            raise self._status_error(response)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _status_error(self, response: httpx.Response) -> APIError:
        status, text = response.status_code, response.text
        try:
            err = _error_fields(json.loads(text))
        except ValueError:
            err = None
        said = f"HTTP {status}" + (f": {text[:ERROR_TEXT_CHARS]}" if text.strip() else "")
        if 400 <= status < 500:
            headers = None
            if status == 429 and "retry-after" in response.headers:
                headers = {"Retry-After": response.headers["retry-after"]}
            if err is None:
                return APIError(status, f"upstream {self.name} answered {said}", headers=headers)
            return APIError(status, f"upstream {self.name}: {err['message']}", param=err.get("param"),
                            code=err.get("code"), type=err.get("type"), headers=headers)
        if err is not None:
            said = f"HTTP {status}: {err['message']}"
        return APIError(502, f"upstream {self.name} answered {said}", code="upstream_error", type="server_error")

    # -- the API

    async def check(self) -> None:
        """At start-up: ``GET {url}/models`` answers 2xx within min(timeout, 10) s. The remote model need
        not be listed (some APIs list thousands, others hide fine-tunes). A client of its own, closed
        here, so that the check may run in a loop other than the server's."""
        where = f"upstream {self.name} at {self.spec.url}"
        async with self._new_client(httpx.Timeout(min(self.spec.timeout_s, CHECK_TIMEOUT_MAX_S))) as client:
            try:
                response = await client.get(self.spec.url + "/models")
            except httpx.HTTPError as e:
                raise UpstreamError(f"{where} is unreachable: {_reason(e)}") from e
        if response.status_code in (401, 403):
            how = f"the key in {self.spec.key_env}" if self._key else "no key (add key_env=VAR)"
            raise UpstreamError(f"{where} rejected the key: HTTP {response.status_code} with {how}")
        if not response.is_success:
            raise UpstreamError(f"{where} answered HTTP {response.status_code} on GET /models: "
                                f"{response.text[:ERROR_TEXT_CHARS]}".replace("\n", " "))

    def cost(self, usage: dict[str, Any] | None) -> dict[str, Any]:
        """The fields to add to a response's ``usage``: list price times tokens when a price was given
        (what the operator pays); else the upstream's own numeric ``cost`` when it sends one (its split
        into input/output is then unknown: None); else $0, price source "unknown"."""
        spec = self.spec
        details: dict[str, Any] = {"input_usd": 0.0, "output_usd": 0.0, "price_source": "unknown",
                                   "hardware": f"upstream:{self.name}",
                                   "input_usd_per_mtok": spec.input_usd_per_mtok,
                                   "output_usd_per_mtok": spec.output_usd_per_mtok}
        if usage is None:
            return {"cost": 0.0, "cost_details": details}
        theirs = usage.get("cost")
        priced = spec.input_usd_per_mtok > 0 or spec.output_usd_per_mtok > 0
        if not priced and isinstance(theirs, (int, float)) and not isinstance(theirs, bool) and math.isfinite(theirs):
            details.update(input_usd=None, output_usd=None, price_source="upstream")
            return {"cost": float(theirs), "cost_details": details}

        def tokens(key: str) -> int:
            n = usage.get(key)
            return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 0

        input_x = tokens("prompt_tokens") * spec.input_usd_per_mtok
        output_x = tokens("completion_tokens") * spec.output_usd_per_mtok
        details.update(input_usd=input_x / 1e6, output_usd=output_x / 1e6, price_source="list_price")
        # one division for the total, so 1000 x 0.15 + 500 x 0.6 is exactly 0.00045
        return {"cost": (input_x + output_x) / 1e6, "cost_details": details}

    async def complete(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        """A non-streaming request (``endpoint``: "chat" or "completions"); the upstream's JSON, its ``model``
        as the upstream wrote it and ``usage.cost``/``cost_details`` added. A response without a ``usage``
        object keeps none (no token counts to invent); `cost(None)` is its bill."""
        url, sent = self._body(endpoint, body, stream=False)
        response = await self._open(url, sent)
        try:
            raw = await response.aread()
        except httpx.TimeoutException as e:
            raise self._timeout(e) from e
        except httpx.TransportError as e:
            raise self._bad_gateway(f"the response broke off ({_reason(e)})") from e
        finally:
            await response.aclose()
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise self._bad_gateway(f"answered with malformed JSON: {raw[:ERROR_TEXT_CHARS]!r}")
        if isinstance(data.get("usage"), dict):
            data["usage"].update(self.cost(data["usage"]))
        return data

    async def stream(self, endpoint: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """A streaming request: the upstream's chunks in order, the one with a ``usage`` object given its
        cost. Before the first chunk a failure raises APIError; after it, one error dict ends the stream.
        The upstream response is closed however the iteration ends (also by the consumer's aclose())."""
        url, sent = self._body(endpoint, body, stream=True)
        response = await self._open(url, sent)
        started = False  # a chunk was yielded: the client's response has begun, so no more raising
        saw_usage = False
        error: APIError | None = None
        try:
            try:
                async for data in _sse_data(response.aiter_bytes()):
                    if data.strip() == "[DONE]":
                        return
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        chunk = None
                    if not isinstance(chunk, dict):
                        error = self._bad_gateway(f"sent a malformed event: {data[:ERROR_TEXT_CHARS]!r}")
                        break
                    err = _error_fields(chunk)
                    if err is not None:
                        error = self._bad_gateway(f"error in the stream: {err['message']}")
                        break
                    if isinstance(chunk.get("usage"), dict):
                        chunk["usage"].update(self.cost(chunk["usage"]))
                        saw_usage = True
                    started = True
                    yield chunk
                else:
                    if not saw_usage:  # no [DONE] and no final usage chunk: the stream was cut short
                        error = self._bad_gateway("the stream ended before [DONE]")
            except httpx.TimeoutException as e:
                error = self._timeout(e)
            except httpx.TransportError as e:
                error = self._bad_gateway(f"the stream broke off ({_reason(e)})")
            if error is not None:
                if not started:
                    raise error
                yield error.body()
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client, self._client_loop = self._client, None, None
            await client.aclose()
