"""`leanserve serve [MODEL]`: load the model, start the engine thread, serve the OpenAI API.

The port is bound before the model loads, so a busy port is a one-line error at once rather than
after the load; connections are accepted once the engine is ready. The engine flags come from
`EngineConfig`, the limits and timeouts from `TransportConfig` (serve/transport.py): their defaults
are written there.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from leanserve import env
from leanserve.argtypes import add_config_args, config_from_args, nonneg_float, nonneg_int, port
from leanserve.cli_common import CLIError, add_engine_args, engine_config, ensure_model
from leanserve.config import EngineConfig, parse_bytes
from leanserve.engine.async_engine import DEFAULT_MAX_QUEUE
from leanserve.serve import transport
from leanserve.serve.transport import TransportConfig

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_THRESHOLD = -0.5  # a cascade's default: mean token log-probability of the cheap model's answer


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from leanserve.serve.api import ServerSettings  # the home of the server's defaults

    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve one model or several over an OpenAI-compatible HTTP API (/v1/completions, "
                    "/v1/chat/completions, /v1/models, /metrics), each local model with its own engine and KV cache, "
                    "beside upstream APIs, cascades and a response cache (docs/gateway.md). With no model, serves the "
                    "default built-in model, pulling it if needed.",
        epilog="Full guide: docs/serving.md and docs/gateway.md")
    add_engine_args(p)
    for action in p._actions:  # several local models: MODEL [MODEL ...], the engine flags apply to each
        if action.dest == "model":
            action.nargs = "*"
            action.help = f"one or more models (built-in names, .gguf files or HF folders); {action.help}"
    gw = p.add_argument_group("gateway (docs/gateway.md)")
    gw.add_argument("--upstream", action="append", default=[], metavar="NAME=URL[,OPTIONS]",
                    help="serve an OpenAI-compatible API as model NAME (repeatable). URL is its base, e.g. "
                         "https://host/v1; OPTIONS, comma-separated: model=REMOTE_NAME, key_env=VAR (its key's "
                         "environment variable), input=USD, output=USD (list price per million tokens), timeout=S, "
                         "retries=N")
    gw.add_argument("--cascade", action="append", default=[], metavar="NAME=MODEL1,MODEL2[,...]",
                    help="a route: model NAME tries MODEL1 first and keeps its answer when its confidence reaches "
                         "--cascade-threshold, else asks the next (cheapest first; repeatable)")
    gw.add_argument("--cascade-threshold", type=float, default=None, metavar="T",
                    help="accept an answer whose confidence score is >= T (a log-probability: 0 is certain; "
                         "default %g; pick it with `leanserve eval cascade`)" % DEFAULT_THRESHOLD)
    gw.add_argument("--cascade-score", default=None, metavar="NAME",
                    help="the confidence score: mean_logprob (default) or min_logprob of the answer's tokens")
    gw.add_argument("--response-cache", action="store_true",
                    help="answer repeated determined requests (temperature 0 or a seed) from a cache, per API key")
    gw.add_argument("--cache-ttl", type=nonneg_float, default=None, metavar="S",
                    help="seconds an entry lives (default 86400)")
    gw.add_argument("--cache-max-bytes", type=parse_bytes, default=None, metavar="SIZE",
                    help="the cache's size cap, least recently used entries go first (default 256MiB)")
    gw.add_argument("--cache-path", type=Path, default=None, metavar="PATH",
                    help="the cache's SQLite file (default: $LEANSERVE_HOME/response_cache.sqlite)")
    b = p.add_argument_group("batch API (docs/batch.md)")
    b.add_argument("--batch-dir", type=Path, default=None, metavar="DIR",
                   help="where /v1/files and /v1/batches keep files and progress (default: $LEANSERVE_HOME/batches)")
    b.add_argument("--batch-max-in-flight", type=nonneg_int, default=None, metavar="N",
                   help="batch lines running at once, in the batch priority class (default 8)")
    b.add_argument("--no-batch-api", action="store_true", help="serve no /v1/files and /v1/batches")
    b.add_argument("--batch-price-factor", type=nonneg_float, default=1.0, metavar="F",
                   help="price batch lines' machine time at F x the price (e.g. 0.5, as hosted APIs sell batch work; "
                        "default 1: what it cost)")
    gw.add_argument("--semantic-cache", default=None, metavar="MODEL",
                    help="with --response-cache: after an exact miss, match the request's text by its embedding "
                         "from MODEL (a served local model; /v1/embeddings' vectors)")
    gw.add_argument("--semantic-threshold", type=float, default=None, metavar="COS",
                    help="the cosine similarity a stored text must reach (default: the measured one in "
                         "docs/gateway.md)")
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
    models = (args.model if isinstance(args.model, list) else [args.model]) or [EngineConfig.model]
    config = engine_config(args)  # bad values fail now, before the port is bound or a model pulled
    gateway = _gateway_config(args, models)
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
            return _serve(args, config, models, gateway, _within_open_files_limit(limits), hosts, sock, digests, t0,
                          ledger)
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


@dataclass
class GatewaySetup:
    """The gateway's parts, checked before any model loads."""

    names: list[str]  # the local models' served names, in order
    upstreams: list[Any]  # gateway.upstream.Upstream
    cascades: list[Any]  # gateway.router.CascadeSpec
    cache: Any  # gateway.cache.CacheConfig or None
    semantic_model: str | None = None  # the local model that embeds for the semantic stage
    semantic_threshold: float | None = None


def _gateway_config(args: argparse.Namespace, models: list[str]) -> GatewaySetup:
    """Every gateway flag checked now, one line per mistake: upstream specs and keys, cascades naming
    served models, cache settings; then each upstream answered (unreachable: fail before loading)."""
    import asyncio

    from leanserve.gateway.cache import CacheConfig
    from leanserve.gateway.router import parse_cascade
    from leanserve.gateway.upstream import Upstream, UpstreamError, parse_upstream

    if args.served_model_name is not None and len(models) > 1:
        raise CLIError("--served-model-name names one model; with several, each is served under its own name")
    names = [args.served_model_name or models[0]] if len(models) == 1 else list(models)
    if len(set(names)) != len(names):
        raise CLIError(f"the model {next(n for n in names if names.count(n) > 1)!r} is given twice")
    upstreams = []
    for text in args.upstream:
        try:
            spec = parse_upstream(text)
            upstreams.append(Upstream(spec))
        except (ValueError, UpstreamError) as e:
            raise CLIError(str(e) if str(e).startswith("--upstream") or str(e).startswith("upstream") else f"--upstream: {e}") from None
        if spec.name in names or spec.name in [u.name for u in upstreams[:-1]]:
            raise CLIError(f"--upstream: the name {spec.name!r} is taken by another model")
    all_names = names + [u.name for u in upstreams]
    if not args.cascade and (args.cascade_threshold is not None or args.cascade_score is not None):
        raise CLIError("--cascade-threshold and --cascade-score need a --cascade")
    cascades = []
    for text in args.cascade:
        try:
            c = parse_cascade(text, DEFAULT_THRESHOLD if args.cascade_threshold is None else args.cascade_threshold,
                              args.cascade_score or "mean_logprob")
        except ValueError as e:
            raise CLIError(str(e)) from None
        unknown = [m for m in c.models if m not in all_names]
        if unknown:
            raise CLIError(f"--cascade {c.name}: {unknown[0]!r} is not a served model (served: {', '.join(all_names)})")
        if c.name in all_names or c.name in [x.name for x in cascades]:
            raise CLIError(f"--cascade: the name {c.name!r} is taken")
        cascades.append(c)
    cache = None
    if args.response_cache:
        try:
            cache = CacheConfig(args.cache_path or env.home() / "response_cache.sqlite",
                                **{k: v for k, v in (("ttl_s", args.cache_ttl), ("max_bytes", args.cache_max_bytes))
                                   if v is not None})
        except ValueError as e:
            raise CLIError(f"--response-cache: {e}") from None
    elif any(v is not None for v in (args.cache_ttl, args.cache_max_bytes, args.cache_path, args.semantic_cache)):
        raise CLIError("--cache-ttl, --cache-max-bytes, --cache-path and --semantic-cache need --response-cache")
    if args.semantic_cache is None and args.semantic_threshold is not None:
        raise CLIError("--semantic-threshold needs --semantic-cache")
    if args.semantic_cache is not None and args.semantic_cache not in names:
        raise CLIError(f"--semantic-cache {args.semantic_cache!r} is not a served local model (local: {', '.join(names)})")
    if args.no_batch_api and (args.batch_dir is not None or args.batch_max_in_flight is not None):
        raise CLIError("--batch-dir and --batch-max-in-flight cannot be combined with --no-batch-api")
    if args.batch_max_in_flight == 0:
        raise CLIError("--batch-max-in-flight must be >= 1")
    if args.semantic_threshold is not None and not -1.0 <= args.semantic_threshold <= 1.0:
        raise CLIError(f"--semantic-threshold is a cosine similarity in [-1, 1], got {args.semantic_threshold}")

    async def check_all() -> None:
        await asyncio.gather(*(u.check() for u in upstreams))

    if upstreams:
        try:
            asyncio.run(check_all())
        except UpstreamError as e:
            raise CLIError(str(e)) from None
    return GatewaySetup(names, upstreams, cascades, cache, args.semantic_cache, args.semantic_threshold)


def _open_batch_store(root: Path) -> Any:
    import sqlite3

    from leanserve.batch.store import BatchStore

    try:
        return BatchStore(root)
    except (OSError, sqlite3.Error) as e:
        raise CLIError(f"cannot open the batch store {root}: {e} (pass --batch-dir or --no-batch-api)") from None


def _open_cache(config: Any) -> Any:
    import sqlite3

    from leanserve.gateway.cache import ResponseCache

    try:
        return ResponseCache(config)
    except (OSError, sqlite3.Error) as e:
        raise CLIError(f"cannot open the response cache {config.path}: {e} (pass --cache-path)") from None


def _serve(args: argparse.Namespace, config: EngineConfig, models: list[str], setup: GatewaySetup,
           limits: TransportConfig, hosts: tuple[str, ...] | None, sock: socket.socket, digests: frozenset[str],
           t0: float, ledger: Any) -> int:
    import uvicorn

    from leanserve.cost.basis import resolve_price_basis
    from leanserve.engine.async_engine import AsyncEngine
    from leanserve.engine.engine import LLMEngine
    from leanserve.gateway.router import UpstreamModel
    from leanserve.serve.api import ServerSettings, build_app

    cache = _open_cache(setup.cache) if setup.cache is not None else None
    batch_store = None if args.no_batch_api else _open_batch_store(args.batch_dir or env.home() / "batches")
    semantic = None
    if setup.semantic_model is not None:
        from leanserve.gateway.semantic import DEFAULT_THRESHOLD as SEMANTIC_THRESHOLD
        from leanserve.gateway.semantic import SemanticIndex

        threshold = SEMANTIC_THRESHOLD if setup.semantic_threshold is None else setup.semantic_threshold
        semantic = SemanticIndex(setup.cache.path, threshold)
    engines: dict[str, AsyncEngine] = {}
    for model, name in zip(models, setup.names):
        ensure_model(model)
        cfg = dataclasses.replace(config, model=model)
        engines[name] = AsyncEngine.built_on_engine_thread(lambda cfg=cfg: LLMEngine(cfg), max_queue=args.max_queue)
    name = setup.names[0]
    async_engine = engines[name]
    basis = resolve_price_basis(args.hardware, args.price_per_hour, async_engine.device)
    settings = ServerSettings(model_name=name, api_key_digests=digests, batch_price_factor=args.batch_price_factor,
                              request_timeout=args.request_timeout or None, price_basis=basis, ledger=ledger,
                              max_body_bytes=limits.max_body_bytes, allowed_hosts=hosts)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host

    def ready() -> None:
        auth = f", API keys: {len(digests)}" if digests else ", no API key required"
        for n, e in engines.items():
            print(f"leanserve: serving {n} at http://{shown}:{port}/v1 ({e.dtype} on {e.device}, "
                  f"KV cache {e.engine.info.kv_cache_summary()}, max_model_len {e.max_model_len:,}, "
                  f"max_num_seqs {e.max_num_seqs}, max_queue {e.max_queue}{auth}); "
                  f"ready in {time.perf_counter() - t0:.1f} s", flush=True)
            print(f"leanserve: {n}: {e.engine.describe_runtime()}", flush=True)
        if len(engines) > 1:
            print(f"leanserve: {len(engines)} local models, each with its own engine thread and KV cache; each runs "
                  f"{'--threads ' + str(config.threads) if config.threads else 'one CPU thread per core'} "
                  f"({os.cpu_count()} logical CPUs): they share the cores when both are busy "
                  "(--threads N splits them)", flush=True)
        for u in setup.upstreams:
            s = u.spec
            print(f"leanserve: serving {u.name} from upstream {s.url} (model {s.model}, list price "
                  f"${s.input_usd_per_mtok:g}/${s.output_usd_per_mtok:g} per Mtok in/out)", flush=True)
        for c in setup.cascades:
            print(f"leanserve: route {c.name}: cascade {' -> '.join(c.models)}, accept when {c.score} >= "
                  f"{c.threshold:g}", flush=True)
        if cache is not None:
            sem = (f"; semantic stage: {setup.semantic_model} embeddings, cosine >= {semantic.threshold:g}"
                   if semantic is not None else "")
            print(f"leanserve: response cache {cache.config.path} (ttl {cache.config.ttl_s:g} s, cap "
                  f"{cache.config.max_bytes:,} bytes{sem})", flush=True)
        where = f"ledger {ledger.path}" + (" (with text)" if ledger.store_text else "") if ledger else "no ledger"
        print(f"leanserve: {basis.describe()}; {where}; GET /v1/cost", flush=True)
        if batch_store is not None:
            print(f"leanserve: batch API /v1/files, /v1/batches: {batch_store.root} (up to "
                  f"{args.batch_max_in_flight or 8} lines at once, batch priority)", flush=True)

    upstreams = [UpstreamModel(u) for u in setup.upstreams]
    try:
        app = build_app(engines, settings, on_ready=ready, upstreams=upstreams, cascades=setup.cascades, cache=cache,
                        semantic=semantic, semantic_model=setup.semantic_model, batch_store=batch_store,
                        batch_max_in_flight=args.batch_max_in_flight)
    except ValueError as e:
        raise CLIError(str(e)) from None
    server = uvicorn.Server(transport.uvicorn_config(app, limits, log_level=args.log_level, access_log=args.access_log,
                                                   timeout_graceful_shutdown=5, lifespan="on"))
    server.run(sockets=[sock])
    return 0
