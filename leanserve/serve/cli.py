"""`leanserve serve [MODEL]`: load the model, start the engine thread, serve the OpenAI API.

The port is bound before the model loads, so a busy port is a one-line error at once rather than
after the load; connections are accepted once the engine is ready. The engine flags come from
`EngineConfig`, the limits and timeouts from `TransportConfig` (serve/transport.py): their defaults
are written there.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import socket
import sys
import time
from pathlib import Path
from typing import Any

from leanserve import env
from leanserve.argtypes import add_config_args, config_from_args, nonneg_float, nonneg_int, port
from leanserve.cli_common import CLIError, add_engine_args, engine_config, ensure_model
from leanserve.config import EngineConfig
from leanserve.engine.async_engine import DEFAULT_MAX_QUEUE
from leanserve.serve import transport
from leanserve.serve.transport import TransportConfig

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from leanserve.serve.api import ServerSettings  # the home of the server's defaults

    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                    "/v1/models, /metrics). With no model, serves the default built-in model, pulling it if needed.",
        epilog="Full guide: docs/serving.md")
    add_engine_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}; 0.0.0.0 for all)")
    g.add_argument("--port", type=port, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free port)")
    g.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the name clients send as 'model' (default: the model argument)")
    g.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1 and /metrics (repeatable). Visible in the "
                        f"process list: prefer ${env.API_KEY} or --api-key-file")
    g.add_argument("--api-key-file", type=Path, action="append", default=[], metavar="FILE",
                   help="a file whose first line is a key to accept (repeatable); also read: the environment "
                        f"variable {env.API_KEY}")
    g.add_argument("--api-keys-file", type=Path, default=None, metavar="FILE",
                   help="accepted keys as sha256 hex digests, one per line, # comments (printf %%s KEY | sha256sum)")
    g.add_argument("--allowed-hosts", action="append", default=[], metavar="HOSTS",
                   help="comma-separated names the Host header may carry (any port; *.example.com for subdomains; "
                        "'*': no check). Bound to loopback, localhost, 127.0.0.1 and [::1] are allowed and these "
                        "add to them; elsewhere no check unless given")
    g.add_argument("--max-queue", type=nonneg_int, default=DEFAULT_MAX_QUEUE, metavar="N",
                   help="sequences that may wait beyond a full batch (--max-num-seqs); past it: 429 with Retry-After "
                        "(default %(default)d)")
    g.add_argument("--request-timeout", type=nonneg_float, default=ServerSettings.request_timeout, metavar="S",
                   help="abort a request S seconds after it arrived: 504, or an error event when streaming "
                        "(default %(default)g; 0: no limit)")
    add_config_args(p.add_argument_group("limits and timeouts (docs/serving.md)"), TransportConfig)
    c = p.add_argument_group("cost (docs/cost.md)")
    c.add_argument("--hardware", default=None, metavar="NAME",
                   help="the hardware catalog entry for the price and the peak FLOP/s and bandwidth (default: the "
                        "detected GPU if the catalog knows it, else cpu-local, whose price is a labelled default)")
    c.add_argument("--price-per-hour", type=nonneg_float, default=None, metavar="USD",
                   help="your $ per machine hour; overrides the catalog price (combine with --hardware for its peaks)")
    c.add_argument("--ledger", type=Path, default=None, metavar="PATH",
                   help="SQLite file recording every request's cost (default: $LEANSERVE_HOME/ledger.sqlite, "
                        "i.e. ~/.cache/leanserve/ledger.sqlite)")
    c.add_argument("--no-ledger", action="store_true", help="record no ledger")
    c.add_argument("--ledger-store-text", action="store_true",
                   help="also store prompt and output text in the ledger (off by default)")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    g.add_argument("--access-log", action="store_true", help="log every HTTP request")
    p.set_defaults(func=cmd_serve)
    return p


def _bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise CLIError(f"cannot resolve --host {host!r}: {e.strerror}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise CLIError(f"cannot listen on {host}:{port}: {e.strerror or e} (is another server running? try --port)") from None
    sock.set_inheritable(True)
    return sock


def api_key_digests(args: argparse.Namespace) -> frozenset[str]:
    """sha256 digests of every key given: --api-key, --api-key-file, $LEANSERVE_API_KEY, --api-keys-file."""
    from leanserve.serve.auth import key_digest, read_keys_file

    if any(not k.strip() for k in args.api_key):
        raise CLIError("--api-key must not be empty")
    keys = [k.strip() for k in args.api_key]
    for path in args.api_key_file:
        try:
            first = path.read_text(encoding="utf-8").splitlines()[:1]
        except (OSError, UnicodeDecodeError) as e:
            raise CLIError(f"cannot read --api-key-file {path}: {getattr(e, 'strerror', None) or e}") from None
        if not first or not first[0].strip():
            raise CLIError(f"--api-key-file {path}: the first line must hold the key")
        keys.append(first[0].strip())
    if (key := env.api_key()) is not None:
        keys.append(key)
    digests = {key_digest(k) for k in keys}
    if args.api_keys_file is not None:
        found = read_keys_file(args.api_keys_file)
        if not found:
            raise CLIError(f"{args.api_keys_file} holds no key digest")
        digests |= found
    return frozenset(digests)


def cmd_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    transport.install_accept_error_filter()
    digests = api_key_digests(args)
    config = engine_config(args)  # bad values fail now, before the port is bound or a model pulled
    limits = config_from_args(args, TransportConfig)
    from leanserve.cost.catalog import get_hardware

    if args.hardware is not None:
        get_hardware(args.hardware)  # an unknown name fails now, not after the model loads
    if args.no_ledger and (args.ledger is not None or args.ledger_store_text):
        raise CLIError("--no-ledger cannot be combined with --ledger or --ledger-store-text")
    ledger = None if args.no_ledger else _open_ledger(args)
    try:
        sock = _bind(args.host, args.port)
        t0 = time.perf_counter()
        try:
            loopback = transport.is_loopback(sock.getsockname()[0])
            if not loopback and not digests:
                print(f"leanserve: warning: listening on {args.host}, beyond this machine, with no API key: anyone who "
                      f"reaches the port can use the model (set {env.API_KEY}, --api-key-file or --api-keys-file)",
                      file=sys.stderr, flush=True)
            hosts = transport.allowed_hosts(loopback, [h for arg in args.allowed_hosts for h in arg.split(",")])
            return _serve(args, config, _within_open_files_limit(limits), hosts, sock, digests, t0, ledger)
        finally:
            sock.close()
    finally:
        if ledger is not None:
            ledger.close()


def _within_open_files_limit(limits: TransportConfig) -> TransportConfig:
    """Raise the soft open-file limit to the hard one; lower the connection cap below it if needed."""
    soft, _ = transport.raise_open_files_limit()
    cap = transport.connection_cap(limits.max_connections, soft)
    if cap < limits.max_connections:
        print(f"leanserve: --max-connections {limits.max_connections} lowered to {cap}: the open-file limit is {soft} "
              "(raise it with ulimit -n)", file=sys.stderr, flush=True)
        limits = dataclasses.replace(limits, max_connections=cap)
    return limits


def _open_ledger(args: argparse.Namespace) -> Any:
    import sqlite3

    from leanserve.cost.ledger import Ledger, default_ledger_path

    path = args.ledger or default_ledger_path()
    try:
        return Ledger(path, store_text=args.ledger_store_text)
    except (OSError, sqlite3.Error) as e:
        raise CLIError(f"cannot open the ledger {path}: {e} (pass --ledger PATH or --no-ledger)") from None


def _serve(args: argparse.Namespace, config: EngineConfig, limits: TransportConfig, hosts: tuple[str, ...] | None,
           sock: socket.socket, digests: frozenset[str], t0: float, ledger: Any) -> int:
    import uvicorn

    from leanserve.cost.basis import resolve_price_basis
    from leanserve.engine.async_engine import AsyncEngine
    from leanserve.engine.engine import LLMEngine
    from leanserve.serve.api import ServerSettings, build_app

    ensure_model(config.model)
    async_engine = AsyncEngine.built_on_engine_thread(lambda: LLMEngine(config), max_queue=args.max_queue)
    engine = async_engine.engine
    name = args.served_model_name or args.model
    basis = resolve_price_basis(args.hardware, args.price_per_hour, async_engine.device)
    settings = ServerSettings(model_name=name, api_key_digests=digests,
                              request_timeout=args.request_timeout or None, price_basis=basis, ledger=ledger,
                              max_body_bytes=limits.max_body_bytes, allowed_hosts=hosts)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host

    def ready() -> None:
        auth = f", API keys: {len(digests)}" if digests else ", no API key required"
        print(f"leanserve: serving {name} at http://{shown}:{port}/v1 ({async_engine.dtype} on {async_engine.device}, "
              f"KV cache {async_engine.kv_cache_tokens:,} tokens, max_model_len {async_engine.max_model_len:,}, "
              f"max_num_seqs {async_engine.max_num_seqs}, max_queue {async_engine.max_queue}{auth}); "
              f"ready in {time.perf_counter() - t0:.1f} s", flush=True)
        where = f"ledger {ledger.path}" + (" (with text)" if ledger.store_text else "") if ledger else "no ledger"
        print(f"leanserve: {basis.describe()}; {where}; GET /v1/cost", flush=True)
        print(f"leanserve: {engine.describe_runtime()}", flush=True)

    app = build_app(async_engine, settings, on_ready=ready)
    server = uvicorn.Server(transport.uvicorn_config(app, limits, log_level=args.log_level, access_log=args.access_log,
                                                   timeout_graceful_shutdown=5, lifespan="on"))
    server.run(sockets=[sock])
    return 0
