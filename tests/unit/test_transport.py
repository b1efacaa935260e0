"""Transport limits (leanserve/serve/transport.py): body size, Host allow list, header/body/idle
timeouts, the connection cap, the open-file limit and rate-limited accept-error logs.

The middlewares run over a tiny FastAPI app (and once through `build_app` with the fake engine of
test_serve_app.py); the connection tests start a real uvicorn server on 127.0.0.1, port 0, in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from leanserve.serve import transport
from leanserve.serve.transport import (BodyLimit, HostCheck, RateLimitedLog, TransportConfig, allowed_hosts,
                                       connection_cap, host_name, install_transport_guards)


def tiny_app(max_body_bytes: int | None = 100, hosts: tuple[str, ...] | None = None) -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"size": len(await request.body())}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    install_transport_guards(app, SimpleNamespace(max_body_bytes=max_body_bytes, allowed_hosts=hosts))
    return app


def assert_openai_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] is None
    assert body["error"]["code"] == code
    return body["error"]


# ---- body size ---------------------------------------------------------------------------------


def test_body_within_the_limit_passes():
    with TestClient(tiny_app(100)) as c:
        assert c.post("/echo", content=b"x" * 100).json() == {"size": 100}


def test_body_over_the_limit_by_content_length_is_413_and_closes():
    with TestClient(tiny_app(100)) as c:
        r = c.post("/echo", content=b"x" * 101)
    err = assert_openai_error(r, 413, "request_too_large")
    assert "101 bytes" in err["message"] and "100 bytes" in err["message"]
    assert r.headers["connection"] == "close"


def test_chunked_body_over_the_limit_is_413():
    def chunks():
        for _ in range(10):
            yield b"y" * 30  # no Content-Length: sent chunked

    with TestClient(tiny_app(100)) as c:
        r = c.post("/echo", content=chunks())
    assert_openai_error(r, 413, "request_too_large")


def test_streamed_body_is_not_read_past_the_limit():
    """The middleware stops pulling body pieces once the limit is passed: nothing past it is held."""
    pulled = []
    sent = []
    app_saw = []

    async def app(scope, receive, send):
        while True:
            message = await receive()
            app_saw.append(message["type"])
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive():
        pulled.append(1)
        return {"type": "http.request", "body": b"z" * 40, "more_body": len(pulled) < 1000}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/echo", "headers": [(b"transfer-encoding", b"chunked")]}
    asyncio.run(BodyLimit(app, 100)(scope, receive, send))
    assert len(pulled) == 3  # 40, 80, 120 > 100: stop
    assert app_saw == ["http.request", "http.request", "http.disconnect"]
    assert sent[0]["status"] == 413 and (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"]["code"] == "request_too_large"
    assert len(sent) == 2  # the app's own answer was dropped


# ---- Host header -------------------------------------------------------------------------------


@pytest.mark.parametrize("value, name", [("localhost:8000", "localhost"), ("127.0.0.1", "127.0.0.1"),
                                         ("[::1]:8000", "::1"), ("[::1]", "::1"), ("::1", "::1"),
                                         ("Example.COM:80", "example.com")])
def test_host_name(value, name):
    assert host_name(value) == name


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "127.0.0.1:1", "[::1]:8000", "::1", "LOCALHOST:9"])
def test_loopback_names_are_allowed_on_any_port(host):
    with TestClient(tiny_app(hosts=allowed_hosts(True))) as c:
        assert c.get("/health", headers={"host": host}).status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.2", ""])
def test_other_hosts_are_400_before_anything_runs(host):
    with TestClient(tiny_app(hosts=allowed_hosts(True))) as c:
        r = c.get("/health", headers={"host": host})
    err = assert_openai_error(r, 400, "invalid_host")
    assert "--allowed-hosts" in err["message"]


def test_allowed_hosts_adds_names_and_star_turns_the_check_off():
    hosts = allowed_hosts(True, ["api.example.com", "*.corp.example"])
    with TestClient(tiny_app(hosts=hosts)) as c:
        for ok in ("api.example.com:443", "a.corp.example", "localhost:1"):
            assert c.get("/health", headers={"host": ok}).status_code == 200, ok
        for bad in ("corp.example", "example.com"):
            assert c.get("/health", headers={"host": bad}).status_code == 400, bad
    assert allowed_hosts(True, ["*"]) is None
    assert allowed_hosts(False) is None  # bound beyond loopback: no check unless asked
    assert allowed_hosts(False, ["api.example.com"]) == ("api.example.com",)


def test_host_check_runs_before_the_body_limit():
    with TestClient(tiny_app(10, hosts=allowed_hosts(True))) as c:
        r = c.post("/echo", content=b"x" * 100, headers={"host": "evil.example"})
    assert_openai_error(r, 400, "invalid_host")


def test_build_app_wires_the_guards_outside_auth():
    from test_serve_app import FakeEngine

    from leanserve.engine.async_engine import AsyncEngine
    from leanserve.serve.api import ServerSettings, build_app
    from leanserve.serve.auth import key_digest

    settings = ServerSettings("fake-model", frozenset({key_digest("k")}), max_body_bytes=1000,
                              allowed_hosts=allowed_hosts(True))
    app = build_app(AsyncEngine(FakeEngine()), settings)
    with TestClient(app) as c:
        # a foreign Host is refused before the API key is even looked at
        assert_openai_error(c.get("/v1/models", headers={"host": "evil.example"}), 400, "invalid_host")
        assert c.get("/v1/models", headers={"host": "localhost:8000"}).status_code == 401
        r = c.post("/v1/completions", content=b"{" + b" " * 2000 + b"}",
                   headers={"host": "localhost", "authorization": "Bearer k", "content-type": "application/json"})
        assert_openai_error(r, 413, "request_too_large")
        assert c.get("/health", headers={"host": "127.0.0.1:8000"}).status_code == 200
        assert c.get("/health").status_code == 400  # TestClient's own Host, "testserver", is not a loopback name


# ---- limits ------------------------------------------------------------------------------------


def test_transport_config_validates():
    with pytest.raises(ValueError, match="header_timeout must be > 0"):
        TransportConfig(header_timeout=0)
    with pytest.raises(ValueError, match="max_connections must be > 0"):
        TransportConfig(max_connections=0)


def test_connection_cap_leaves_room_below_the_open_file_limit():
    assert connection_cap(1000, 1_048_576) == 1000
    assert connection_cap(1000, 1024) == 1024 - 128  # an eighth kept free
    assert connection_cap(1000, 256) == 256 - 64  # at least 64 kept free
    assert connection_cap(1000, 10) == 1
    assert connection_cap(1000, 0) == 1000  # no known limit


def test_the_soft_open_file_limit_is_raised_to_the_hard_one():
    code = ("import resource\n"
            "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))\n"
            "from leanserve.serve.transport import raise_open_files_limit\n"
            "new_soft, new_hard = raise_open_files_limit()\n"
            "target = hard if hard != resource.RLIM_INFINITY else 2**20\n"
            "assert new_hard == hard and new_soft == target, (new_soft, new_hard, hard)\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def _accept_error(logger: str = "asyncio") -> logging.LogRecord:
    exc = OSError(errno.EMFILE, "Too many open files")
    return logging.LogRecord(logger, logging.ERROR, __file__, 1, "socket.accept() out of system resource", (),
                             (OSError, exc, None))


def test_accept_errors_are_logged_once_per_interval_with_a_count():
    now = [0.0]
    f = RateLimitedLog(10.0, clock=lambda: now[0])
    first = _accept_error()
    assert f.filter(first) and first.exc_info is None  # no traceback
    assert "Too many open files" in first.getMessage()
    passed = 0
    for _ in range(500):
        now[0] += 0.01
        passed += f.filter(_accept_error())
    assert passed == 0 and f.suppressed == 500
    now[0] = 10.5
    later = _accept_error()
    assert f.filter(later)
    assert "500 more like it suppressed" in later.getMessage()
    other = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "something else", (), None)
    assert f.filter(other) and other.getMessage() == "something else"


def test_the_filter_sits_on_asyncio_and_uvicorn_loggers():
    f = transport.install_accept_error_filter()
    try:
        for name in ("asyncio", "uvicorn.error"):
            assert f in logging.getLogger(name).filters
    finally:
        for name in ("asyncio", "uvicorn.error"):
            logging.getLogger(name).removeFilter(f)


# ---- a real server -----------------------------------------------------------------------------


@contextlib.contextmanager
def running_server(limits: TransportConfig):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = transport.uvicorn_config(tiny_app(10_000, hosts=allowed_hosts(True)), limits, log_level="warning",
                                      lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield sock.getsockname()[1], server
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    return s


def closed_within(s: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed ``s`` (recv gives b'' or a reset), or None if still open."""
    t0 = time.monotonic()
    s.settimeout(0.1)
    while time.monotonic() - t0 < seconds:
        try:
            data = s.recv(4096)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return time.monotonic() - t0
        if data == b"":
            return time.monotonic() - t0
    return None


def get(s: socket.socket, path: str = "/health") -> bytes:
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    s.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data or not data.endswith(b"}"):
        chunk = s.recv(4096)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


def _answered_then(rest: bytes):
    def prelude(s: socket.socket) -> None:
        assert b"200 OK" in get(s)
        s.sendall(rest)
    return prelude


@pytest.mark.parametrize("limits, prelude", [
    (TransportConfig(header_timeout=1.0, keep_alive_timeout=30), lambda s: None),
    (TransportConfig(header_timeout=1.0, keep_alive_timeout=30), _answered_then(b"GET /health HTTP/1.1\r\n")),
    (TransportConfig(header_timeout=30, body_timeout=1.0, keep_alive_timeout=30),
     lambda s: s.sendall(b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)),
    (TransportConfig(header_timeout=30, keep_alive_timeout=1.0), _answered_then(b"")),
], ids=["sends-nothing", "kept-alive-next-head-unfinished", "body-stalls", "idle-after-a-response"])
def test_a_connection_is_closed_after_its_timeout(limits, prelude):
    with running_server(limits) as (port, _):
        s = connect(port)
        prelude(s)
        took = closed_within(s, 5)
        s.close()
    assert took is not None and 0.7 < took < 3, took


def test_a_trickled_request_head_is_closed_after_the_header_timeout():
    with running_server(TransportConfig(header_timeout=1.0, keep_alive_timeout=30)) as (port, _):
        s = connect(port)
        head = b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 100
        t0 = time.monotonic()
        closed = None
        for byte in head:  # one byte every 0.1 s: 10 s for the whole head, never finished
            try:
                s.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = time.monotonic() - t0
                break
            took = closed_within(s, 0.1)
            if took is not None:
                closed = time.monotonic() - t0
                break
        s.close()
    assert closed is not None and 0.7 < closed < 3, closed


def test_a_complete_request_is_not_cut_by_the_header_timeout():
    with running_server(TransportConfig(header_timeout=0.5, keep_alive_timeout=30)) as (port, _):
        s = connect(port)
        for _ in range(3):  # each answered, with pauses longer than the header timeout between them
            assert b"200 OK" in get(s)
            time.sleep(0.7)
        assert b"200 OK" in get(s)
        s.close()


def test_connections_past_the_cap_are_closed_at_once_and_the_server_still_answers():
    with running_server(TransportConfig(header_timeout=30, keep_alive_timeout=30, max_connections=3)) as (port, _):
        kept = connect(port)
        assert b"200 OK" in get(kept)  # one kept-alive client
        idle = [connect(port) for _ in range(2)]  # the cap is reached
        time.sleep(0.2)
        for _ in range(5):
            extra = connect(port)
            t0 = time.monotonic()
            extra.settimeout(2)
            try:
                data = extra.recv(4096)
            except ConnectionResetError:
                data = b""
            assert time.monotonic() - t0 < 1
            assert data == b"" or data.startswith(b"HTTP/1.1 503"), data
            if data:
                assert b'"code": "too_many_connections"' in data and b"connection: close" in data
                assert closed_within(extra, 2) is not None
            extra.close()
        assert b"200 OK" in get(kept)  # the kept-alive client is still served
        for s in idle:
            s.close()
        time.sleep(0.2)
        fresh = connect(port)
        assert b"200 OK" in get(fresh)  # below the cap again: new connections are served
        fresh.close()
        kept.close()
