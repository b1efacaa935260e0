"""`leanserve serve [MODEL]`: load the model, start the engine thread, serve the OpenAI API.

The port is bound before the model loads, so a busy port is a one-line error at once rather than
after the load; connections are accepted once the engine is ready.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import time
from pathlib import Path
from typing import Any

from leanserve.argtypes import nonneg_float, nonneg_int, port

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from leanserve.cli import _add_engine_args

    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                    "/v1/models, /metrics). With no model, serves the default built-in model, pulling it if needed.",
        epilog="Full guide: docs/serving.md")
    _add_engine_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}; 0.0.0.0 for all)")
    g.add_argument("--port", type=port, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free port)")
    g.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the name clients send as 'model' (default: the model argument)")
    g.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1 and /metrics (repeatable)")
    g.add_argument("--api-keys-file", type=Path, default=None, metavar="FILE",
                   help="accepted keys as sha256 hex digests, one per line, # comments (printf %%s KEY | sha256sum)")
    g.add_argument("--max-queue", type=nonneg_int, default=256, metavar="N",
                   help="sequences that may wait beyond a full batch (--max-num-seqs); past it: 429 with Retry-After "
                        "(default 256)")
    g.add_argument("--request-timeout", type=nonneg_float, default=600.0, metavar="S",
                   help="abort a request S seconds after it arrived: 504, or an error event when streaming "
                        "(default 600; 0: no limit)")
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
    from leanserve.cli import CLIError

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


def cmd_serve(args: argparse.Namespace) -> int:
    from leanserve.cli import CLIError
    from leanserve.serve.auth import key_digest, read_keys_file

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    digests = {key_digest(k) for k in args.api_key if k}
    if any(not k for k in args.api_key):
        raise CLIError("--api-key must not be empty")
    if args.api_keys_file is not None:
        digests |= read_keys_file(args.api_keys_file)
        if not digests:
            raise CLIError(f"{args.api_keys_file} holds no key digest")
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
            return _serve(args, sock, frozenset(digests), t0, ledger)
        finally:
            sock.close()
    finally:
        if ledger is not None:
            ledger.close()


def _open_ledger(args: argparse.Namespace) -> Any:
    import sqlite3

    from leanserve.cli import CLIError
    from leanserve.cost.ledger import Ledger, default_ledger_path

    path = args.ledger or default_ledger_path()
    try:
        return Ledger(path, store_text=args.ledger_store_text)
    except (OSError, sqlite3.Error) as e:
        raise CLIError(f"cannot open the ledger {path}: {e} (pass --ledger PATH or --no-ledger)") from None


def _serve(args: argparse.Namespace, sock: socket.socket, digests: frozenset[str], t0: float, ledger: Any) -> int:
    import uvicorn

    from leanserve.cli import _engine_kwargs, ensure_model
    from leanserve.config import EngineConfig
    from leanserve.cost.basis import resolve_price_basis
    from leanserve.engine.async_engine import AsyncEngine
    from leanserve.engine.engine import LLMEngine
    from leanserve.serve.api import ServerSettings, build_app

    ensure_model(args.model)
    config = EngineConfig(model=args.model, **_engine_kwargs(args))
    async_engine = AsyncEngine.built_on_engine_thread(lambda: LLMEngine(config), max_queue=args.max_queue)
    engine = async_engine.engine
    name = args.served_model_name or args.model
    basis = resolve_price_basis(args.hardware, args.price_per_hour, async_engine.device)
    settings = ServerSettings(model_name=name, api_key_digests=digests,
                              request_timeout=args.request_timeout or None, price_basis=basis, ledger=ledger)
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
    config = uvicorn.Config(app, log_level=args.log_level, access_log=args.access_log, timeout_graceful_shutdown=5,
                            lifespan="on")
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    return 0
