"""Limits on the transport, below the API: what a client can hold or send before any handler runs.

- ``BodyLimit`` (ASGI): a request body over ``max_body_bytes`` gets 413 ``request_too_large``, at once
  when its Content-Length says so, else as soon as the bytes streamed in pass the limit (a chunked
  body is never held beyond the limit; the connection is closed after the answer).
- ``HostCheck`` (ASGI): a ``Host`` header outside the allow list gets 400 ``invalid_host`` before
  anything else runs. On a loopback address the list defaults to the loopback names, which stops
  DNS rebinding: a web page whose name resolves to 127.0.0.1 still sends its own name as Host.
- ``protocol_class`` (uvicorn's h11 protocol, subclassed): a connection that has not sent a whole
  request head ``header_timeout`` seconds after it opened (or after the first byte of its next
  request) is closed; so is one whose request body stalls for ``body_timeout`` seconds between two
  pieces; idle keep-alive connections close after ``keep_alive_timeout`` (uvicorn's own timer);
  past ``max_connections`` open connections a new one gets a short 503 and is closed at once, so
  file descriptors stay free for the ones being served.
- ``raise_open_files_limit``, ``connection_cap``: the soft RLIMIT_NOFILE raised to the hard limit,
  and the connection cap kept below it with room for the server's own files.
- ``RateLimitedLog``: a logging filter that lets one "Too many open files" accept error through per
  10 s and counts the rest (a flood once wrote 224 MB of them).

Errors use OpenAI's format, ``{"error": {"message", "type", "param", "code"}}``. The module imports
uvicorn only inside ``protocol_class``, so building the command line stays fast.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from leanserve.config import parse_bytes

log = logging.getLogger("leanserve.transport")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")  # "[::1]" matches "::1"; any port
FD_HEADROOM_MIN = 64  # file descriptors kept free beyond the connection cap: model, ledger, logs, listener


def _cli(help: str, **how: Any) -> dict[str, Any]:
    return {"cli": {"help": help, **how}}


@dataclass(frozen=True)
class TransportConfig:
    """The transport's limits; `leanserve serve` derives its flags from these fields (argtypes.add_config_args)."""

    max_body_bytes: int = field(default=4 * 2**20, metadata=_cli(
        "largest request body, e.g. 16MiB; a bigger one gets 413 request_too_large",
        type=parse_bytes, flag="--max-body-size", metavar="SIZE", show=lambda n: f"{n / 2**20:g}MiB"))
    header_timeout: float = field(default=10.0, metadata=_cli(
        "close a connection that has not sent a whole request head S seconds after it opened or after the "
        "first byte of its next request", metavar="S"))
    body_timeout: float = field(default=30.0, metadata=_cli(
        "close a connection whose request body stalls for S seconds between two pieces", metavar="S"))
    keep_alive_timeout: float = field(default=5.0, metadata=_cli(
        "close an idle keep-alive connection after S seconds", metavar="S"))
    max_connections: int = field(default=1000, metadata=_cli(
        "open connections at most; past it a new connection gets 503 and is closed at once; kept below the "
        "open-file limit, with room for the server's own files"))

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "header_timeout", "body_timeout", "keep_alive_timeout", "max_connections"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")


# ---- ASGI guards -----------------------------------------------------------------------------


def _error_body(message: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()


async def _send_error(send: Send, status: int, message: str, code: str, close: bool = False) -> None:
    body = _error_body(message, code)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _header(scope: Scope, name: bytes) -> bytes | None:
    return next((v for k, v in scope.get("headers", ()) if k == name), None)


class BodyLimit:
    """413 for a request body over ``max_bytes``; pure ASGI, so nothing is buffered here."""

    def __init__(self, app: ASGIApp, max_bytes: int, larger: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.larger = larger or {}  # path -> its own limit (file uploads)

    def _message(self, size: str, limit: int) -> str:
        flag = "" if limit != self.max_bytes else " (--max-body-size)"
        return f"the request body is {size}; this server takes at most {limit:,} bytes here{flag}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.larger.get(scope.get("path", ""), self.max_bytes)
        length = _header(scope, b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > limit:
            # answered before the body is read; Connection: close, so the server does not read it either
            await _send_error(send, 413, self._message(f"{int(length):,} bytes", limit), "request_too_large",
                              close=True)
            return
        received = 0
        refused = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # the app sees the client go away; the client gets the 413 (unless a response began)
                    refused = True
                    if not started:
                        await _send_error(send, 413, self._message(f"over {limit:,} bytes", limit),
                                          "request_too_large", close=True)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 went out instead
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not refused:
                raise
            # the app failed on the disconnect it was handed (e.g. Starlette's ClientDisconnect): the 413
            # is the answer, not an error of the server's


def host_name(value: str) -> str:
    """The name in a Host header value, without its port, lower case: '[::1]:8000' -> '::1'."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        return value.split(":", 1)[0]
    return value  # a name, or a bare IPv6 address


def _normalize(pattern: str) -> str:
    pattern = pattern.strip().lower()
    return pattern[1:-1] if pattern.startswith("[") and pattern.endswith("]") else pattern


class HostCheck:
    """400 ``invalid_host`` unless the Host header names an allowed host (any port). A pattern
    ``*.example.com`` allows every subdomain of example.com."""

    def __init__(self, app: ASGIApp, allowed: Iterable[str]) -> None:
        self.app = app
        patterns = {_normalize(p) for p in allowed if p.strip()}
        self.exact = frozenset(p for p in patterns if not p.startswith("*."))
        self.suffixes = tuple(p[1:] for p in patterns if p.startswith("*."))

    def allows(self, host: str) -> bool:
        name = host_name(host)
        return name in self.exact or any(name.endswith(s) and len(name) > len(s) for s in self.suffixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            raw = _header(scope, b"host")
            host = raw.decode("latin-1") if raw is not None else ""
            if not self.allows(host):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                shown = host[:100] if host else "(none)"
                await _send_error(send, 400, f"Host header {shown!r} is not allowed by this server; a client "
                                  "reaching it by another name needs --allowed-hosts", "invalid_host")
                return
        await self.app(scope, receive, send)


def allowed_hosts(bound_to_loopback: bool, extra: Iterable[str] = ()) -> tuple[str, ...] | None:
    """The Host allow list for a server: the loopback names plus ``extra`` when bound to loopback;
    only ``extra`` elsewhere (None, no check, when there is none); ``*`` in ``extra``: no check."""
    extra = tuple(h.strip() for h in extra if h.strip())
    if "*" in extra:
        return None
    if bound_to_loopback:
        return LOOPBACK_HOSTS + extra
    return extra or None


def is_loopback(address: str) -> bool:
    """Whether a bound address (an IP, as getsockname gives it) is reachable only from this machine."""
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return address.lower() == "localhost"


def install_transport_guards(app: Any, settings: Any, larger: dict[str, int] | None = None) -> None:
    """Wrap a Starlette/FastAPI app's whole middleware stack (so they run before anything else, auth
    included, whatever middleware is added later): the Host check outermost, then the body limit.
    ``settings.max_body_bytes`` None: `TransportConfig`'s default; ``larger``: paths with a limit of their own
    (file uploads); ``settings.allowed_hosts`` None: no check."""
    max_bytes = getattr(settings, "max_body_bytes", None) or TransportConfig.max_body_bytes
    hosts = getattr(settings, "allowed_hosts", None)
    build = app.build_middleware_stack

    def build_guarded() -> ASGIApp:
        guarded: ASGIApp = BodyLimit(build(), max_bytes, larger)
        if hosts is not None:
            guarded = HostCheck(guarded, hosts)
        return guarded

    app.build_middleware_stack = build_guarded


# ---- connections -----------------------------------------------------------------------------

OVER_CAPACITY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
                 b"retry-after: 1\r\ncontent-length: %d\r\n\r\n%s")


def _over_capacity_response() -> bytes:
    body = json.dumps({"error": {"message": "too many open connections; retry shortly", "type": "server_error",
                                 "param": None, "code": "too_many_connections"}}).encode()
    return OVER_CAPACITY % (len(body), body)


def protocol_class(limits: TransportConfig) -> type:
    """uvicorn's h11 protocol with a header timeout, a body timeout and a connection cap. Pass it as
    ``uvicorn.Config(http=...)`` (`uvicorn_config` does)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    over_capacity = _over_capacity_response()
    refusals = _RateLimiter(10.0)

    class GuardedH11Protocol(H11Protocol):
        """A request head must be whole ``header_timeout`` s after the connection opens or the next
        request's first byte arrives; a body may pause at most ``body_timeout`` s while the server
        reads it; at ``max_connections`` open connections a new one is answered 503 and closed."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._refused = False
            self._head_timer: asyncio.TimerHandle | None = None
            self._body_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            if len(self.connections) >= limits.max_connections:
                self._refused = True
                self.transport = transport
                transport.write(over_capacity)
                transport.close()  # after the write is flushed; the descriptor is freed at once
                suppressed = refusals.allow()
                if suppressed is not None:
                    log.warning("%d connections open (--max-connections): new connections get 503 and are closed%s",
                                len(self.connections), f" ({suppressed} more since the last line)" if suppressed else "")
                return
            super().connection_made(transport)
            self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._refused:
                return
            self._cancel_timers()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            if self._head_timer is None and self.conn.their_state is h11.IDLE and (
                    self.cycle is None or self.cycle.response_complete):
                self._arm_head_timer()  # the first byte of a new request on a kept-alive connection
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE and self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
                self._arm_body_timer()
            elif self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None

        def _arm_head_timer(self) -> None:
            self._head_timer = self.loop.call_later(limits.header_timeout, self._head_expired)

        def _head_expired(self) -> None:
            self._head_timer = None
            self._close("request head")

        def _arm_body_timer(self) -> None:
            if self._body_timer is not None:
                self._body_timer.cancel()
            self._body_timer = self.loop.call_later(limits.body_timeout, self._body_expired)

        def _body_expired(self) -> None:
            self._body_timer = None
            if self.flow is not None and self.flow.read_paused:
                self._arm_body_timer()  # the server is not reading: the client is not the slow one
            elif self.conn.their_state is h11.SEND_BODY:
                self._close("request body")

        def _close(self, what: str) -> None:
            if not self.transport.is_closing():
                prefix = "%s:%d - " % self.client if self.client else ""
                log.debug("%sclosing a connection: %s not received in time", prefix, what)
                self.transport.close()

        def _cancel_timers(self) -> None:
            for timer in (self._head_timer, self._body_timer):
                if timer is not None:
                    timer.cancel()
            self._head_timer = self._body_timer = None

    return GuardedH11Protocol


def uvicorn_config(app: Any, limits: TransportConfig, **kwargs: Any) -> Any:
    """``uvicorn.Config`` with the guarded protocol and the keep-alive timeout from ``limits``."""
    import uvicorn

    return uvicorn.Config(app, http=protocol_class(limits), timeout_keep_alive=limits.keep_alive_timeout, **kwargs)


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (capped at 2**20 when that is unlimited); returns
    (soft, hard) as they are afterwards. A platform without the resource module: (0, 0)."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return 0, 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 2**20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, e)
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def connection_cap(max_connections: int, open_files_limit: int) -> int:
    """``max_connections``, lowered to leave ``max(64, limit / 8)`` descriptors free below the open-file
    limit (0: no known limit). At least 1."""
    if open_files_limit <= 0:
        return max_connections
    headroom = max(FD_HEADROOM_MIN, open_files_limit // 8)
    return max(1, min(max_connections, open_files_limit - headroom))


# ---- logging ---------------------------------------------------------------------------------


class _RateLimiter:
    """``allow()``: the number suppressed since the last allowed one (0 or more), or None to suppress."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self.last: float | None = None
        self.suppressed = 0

    def allow(self) -> int | None:
        now = self.clock()
        if self.last is not None and now - self.last < self.interval_s:
            self.suppressed += 1
            return None
        self.last = now
        n, self.suppressed = self.suppressed, 0
        return n


_OUT_OF_FILES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def _is_accept_error(record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, OSError) and exc.errno in _OUT_OF_FILES:
        return True
    text = record.getMessage()
    return "out of system resource" in text or "Too many open files" in text


class RateLimitedLog(logging.Filter):
    """Lets one accept error for lack of file descriptors through per ``interval_s`` seconds, without
    its traceback, and says how many were suppressed since; other records pass untouched."""

    def __init__(self, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.limiter = _RateLimiter(interval_s, clock)

    @property
    def suppressed(self) -> int:
        return self.limiter.suppressed

    def filter(self, record: logging.LogRecord) -> bool:
        if not _is_accept_error(record):
            return True
        n = self.limiter.allow()
        if n is None:
            return False
        exc = record.exc_info[1] if record.exc_info else None
        text = record.getMessage() + (f": {exc}" if exc is not None else "")
        if n:
            text += f" ({n} more like it suppressed in the last {self.limiter.interval_s:g} s)"
        record.msg, record.args, record.exc_info, record.exc_text = text, (), None, None
        return True


ACCEPT_ERROR_LOGGERS = ("asyncio", "uvicorn.error")


def install_accept_error_filter(interval_s: float = 10.0) -> RateLimitedLog:
    """Put one `RateLimitedLog` on the loggers that report accept errors (asyncio's and uvicorn's); a
    second call returns the filter already there."""
    for f in logging.getLogger(ACCEPT_ERROR_LOGGERS[0]).filters:
        if isinstance(f, RateLimitedLog):
            return f
    f = RateLimitedLog(interval_s)
    for name in ACCEPT_ERROR_LOGGERS:
        logging.getLogger(name).addFilter(f)
    return f
