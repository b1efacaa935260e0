"""`leanserve usage`: totals from the ledger per API key, model or day.

    leanserve usage                          # per day, all time, a table
    leanserve usage --by key --since 7d      # per API key id over the last 7 days
    leanserve usage --by model --since 2026-11-01 --format csv
    leanserve usage --by kind                # interactive against batch (/v1/batches) work

Days and dates are UTC. ``$/Mtok`` is the group's dollars per million tokens (prompt + output).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from leanserve.cost.ledger import connect, default_ledger_path

GROUPS = {
    "key": "COALESCE(key_id, '-')",
    "model": "model",
    "day": "strftime('%Y-%m-%d', ts, 'unixepoch')",
    "kind": "CASE WHEN batch_id IS NULL THEN 'interactive' ELSE 'batch' END",
    "batch": "COALESCE(batch_id, '-')",
}
_NEEDS = {"kind": "batch_id", "batch": "batch_id"}  # a group's column, absent from ledgers before it
_WITHOUT = {"kind": "'interactive'", "batch": "'-'"}
FIELDS = ("group", "requests", "prompt_tokens", "cached_tokens", "output_tokens", "machine_seconds", "cost_usd",
          "usd_per_mtok", "cache_hits", "saved_usd")


def parse_since(text: str | None, now: float | None = None) -> float | None:
    """'24h', '7d', '30m', '90s' (ago) or a date 'YYYY-MM-DD' / ISO time (UTC unless it says) -> unix time."""
    if text is None or text == "":
        return None
    now = time.time() if now is None else now
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if m:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}[m.group(2)]
        return now - float(m.group(1)) * unit
    try:
        dt = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--since: expected a date (2026-11-01), a time or an age (24h, 7d), got {text!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def usage_rows(path: str | Path, by: str = "day", since: float | None = None) -> list[dict[str, Any]]:
    """Totals per group, sorted by group, then one 'TOTAL' row (when there is any request)."""
    if by not in GROUPS:
        raise ValueError(f"--by must be one of {', '.join(GROUPS)}, got {by!r}")
    conn = connect(path, create=False)
    try:
        where, args = ("WHERE ts >= ?", (since,)) if since is not None else ("", ())
        have = {r[1] for r in conn.execute("PRAGMA table_info(requests)")}
        group = GROUPS[by] if _NEEDS.get(by, "id") in have else _WITHOUT[by]
        # a ledger from before receipts (schema 1) has no cache or saved_* columns: they count as none
        hits = "COALESCE(SUM(cache = 'hit'), 0)" if "cache" in have else "0"
        saved = ("COALESCE(SUM(saved_prefix_usd + saved_cache_usd + saved_routing_usd), 0)"
                 if "saved_routing_usd" in have else "0.0")
        sums = ("COUNT(*), COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(cached_tokens), 0), "
                f"COALESCE(SUM(output_tokens), 0), COALESCE(SUM(machine_seconds), 0), COALESCE(SUM(cost_usd), 0), "
                f"{hits}, {saved}")
        rows = conn.execute(f"SELECT {group} AS g, {sums} FROM requests {where} GROUP BY g ORDER BY g",
                            args).fetchall()
        total = conn.execute(f"SELECT 'TOTAL', {sums} FROM requests {where}", args).fetchone()
    finally:
        conn.close()
    out = [_row(r) for r in rows]
    if out:
        out.append(_row(total))
    return out


def _row(r: tuple) -> dict[str, Any]:
    group, n, prompt, cached, output, secs, usd, hits, saved = r
    tokens = prompt + output
    return {"group": group, "requests": n, "prompt_tokens": prompt, "cached_tokens": cached, "output_tokens": output,
            "machine_seconds": secs, "cost_usd": usd, "usd_per_mtok": usd / tokens * 1e6 if tokens else None,
            "cache_hits": hits, "saved_usd": saved}


def format_usage(rows: list[dict[str, Any]], fmt: str = "table", by: str = "day") -> str:
    if fmt == "json":
        return json.dumps({"by": by, "rows": rows}, indent=2) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow((by,) + FIELDS[1:])
        for r in rows:
            w.writerow([("" if r[f] is None else r[f]) for f in FIELDS])
        return buf.getvalue()
    if fmt != "table":
        raise ValueError(f"--format must be table, csv or json, got {fmt!r}")
    if not rows:
        return "no requests in the ledger for this selection\n"
    head = (by, "requests", "prompt tok", "cached tok", "output tok", "machine s", "$", "$/Mtok", "cache hits", "saved $")
    body = [(str(r["group"]), f"{r['requests']:,}", f"{r['prompt_tokens']:,}", f"{r['cached_tokens']:,}",
             f"{r['output_tokens']:,}", f"{r['machine_seconds']:.3f}", f"{r['cost_usd']:.6f}",
             "-" if r["usd_per_mtok"] is None else f"{r['usd_per_mtok']:.4f}", f"{r['cache_hits']:,}",
             f"{r['saved_usd']:.6f}") for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if len(lines) > 3:
        lines.insert(len(lines) - 1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def cmd_usage(args: argparse.Namespace) -> int:
    path = args.ledger or default_ledger_path()
    rows = usage_rows(path, args.by, parse_since(args.since))
    sys.stdout.write(format_usage(rows, args.format, args.by))
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "usage", help="cost and token totals from the request ledger, per API key, model, day, kind or batch",
        description="Totals from the ledger a server writes (one row per request): requests, tokens, "
                    "machine-seconds, $ and $ per million tokens, per group. Days are UTC.",
        epilog="Details: docs/cost.md")
    p.add_argument("--ledger", type=Path, default=None, metavar="PATH",
                   help=f"the ledger file (default: {default_ledger_path()})")
    p.add_argument("--by", choices=sorted(GROUPS), default="day", help="group rows by (default: day)")
    p.add_argument("--since", default=None, metavar="WHEN",
                   help="only requests since a date (2026-11-01, UTC) or an age (24h, 7d)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.set_defaults(func=cmd_usage)
    return p
