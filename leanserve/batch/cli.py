"""`leanserve batch INPUT.jsonl -o OUTPUT.jsonl [MODEL and the engine flags]`: a Batch API input file
run in this process, without a server, at full speed, with a progress bar.

The same machinery as the server's batch API (the store parses the file and keeps each line's
result, the runner sends the lines through the gateway to the engine), with as many lines in
flight as the engine batches. The output file has the server's line format (one line per
successful request, in input order); failed and malformed lines go to OUTPUT's ``.errors.jsonl``
beside it. Every line's cost is in its response's ``usage``; the total is printed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from leanserve.argtypes import nonneg_float
from leanserve.cli_common import CLIError, add_engine_args, engine_config, ensure_model

FINAL = ("completed", "failed", "cancelled", "expired")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "batch", help="run a Batch API input file (JSONL) in this process, without a server",
        description="Run every request of a Batch API input file ({custom_id, method, url, body} per line; url "
                    "/v1/chat/completions or /v1/completions, the same for every line) on a model in this process "
                    "and write the results in the Batch API's output format.",
        epilog="Details: docs/batch.md")
    p.add_argument("input", type=Path, metavar="INPUT.jsonl")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUTPUT.jsonl",
                   help="the results; failed lines go to OUTPUT's stem + .errors.jsonl")
    add_engine_args(p)
    p.add_argument("--price-per-hour", type=nonneg_float, default=None, metavar="USD",
                   help="your $ per machine hour (default: the detected hardware's catalog price)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_batch)
    return p


def _endpoint(path: Path) -> str:
    """The url of the file's first line that names one (the store checks every line against it)."""
    try:
        with path.open(encoding="utf-8") as f:
            for text in f:
                try:
                    url = json.loads(text).get("url")
                except (ValueError, AttributeError):
                    continue
                if isinstance(url, str):
                    return url
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    raise CLIError(f"{path}: no line names a url (/v1/chat/completions or /v1/completions)")


def errors_path(output: Path) -> Path:
    return output.with_name(output.stem + ".errors.jsonl")


def cmd_batch(args: argparse.Namespace) -> int:
    from leanserve.batch.store import BatchStore, StoreError

    config = engine_config(args)
    if not args.input.is_file():
        raise CLIError(f"no input file {args.input}")
    endpoint = _endpoint(args.input)
    with tempfile.TemporaryDirectory(prefix="leanserve-batch-") as tmp:
        store = BatchStore(Path(tmp))
        try:
            f = store.add_file(args.input.read_bytes(), args.input.name, "batch", None)
            batch = store.create_batch(f.id, endpoint, "24h", None, None)
        except StoreError as e:
            raise CLIError(e.message) from None
        ensure_model(config.model)
        t0 = time.perf_counter()
        final, out, err = asyncio.run(_run(config, store, batch["id"], args))  # the server's shutdown closes the store
        args.output.parent.mkdir(parents=True, exist_ok=True)
        if out is not None:
            shutil.copyfile(out, args.output)
        else:
            args.output.write_bytes(b"")
        if err is not None:
            shutil.copyfile(err, errors_path(args.output))
    counts, usage = final["request_counts"], final.get("usage") or {}
    print(f"{counts['completed']} of {counts['total']} requests done, {counts['failed']} failed "
          f"({errors_path(args.output) if err else 'no error file'}); {usage.get('total_tokens', 0):,} tokens, "
          f"${usage.get('usd', 0.0):.6f}, {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0 if counts["failed"] == 0 else 1


async def _run(config: Any, store: Any, batch_id: str,
               args: argparse.Namespace) -> tuple[dict[str, Any], Path | None, Path | None]:
    """Run the batch to its end: (the Batch object, its output file's path, its error file's path)."""
    from tqdm import tqdm

    from leanserve.cost.basis import resolve_price_basis
    from leanserve.engine.async_engine import AsyncEngine
    from leanserve.engine.engine import LLMEngine
    from leanserve.serve.api import ServerSettings, build_app

    engine = AsyncEngine.built_on_engine_thread(lambda: LLMEngine(config), max_queue=4 * config.max_num_seqs)
    settings = ServerSettings(config.model, price_basis=resolve_price_basis(None, args.price_per_hour, engine.device),
                              request_timeout=None)
    app = build_app(engine, settings, batch_store=store, batch_max_in_flight=2 * config.max_num_seqs)
    total = store.batch_dict(batch_id, None)["request_counts"]["total"]
    bar = tqdm(total=total, unit="req", disable=args.no_progress, file=sys.stderr)
    async with app.router.lifespan_context(app):
        app.state.batch_runner.poke()
        while True:
            b = store.batch_dict(batch_id, None)
            counts = b["request_counts"]
            bar.n = counts["completed"] + counts["failed"]
            bar.refresh()
            if b["status"] in FINAL:
                break
            await asyncio.sleep(0.2)
        paths = [store.file_path(b[k], None) if b.get(k) else None for k in ("output_file_id", "error_file_id")]
    bar.close()
    return b, paths[0], paths[1]
