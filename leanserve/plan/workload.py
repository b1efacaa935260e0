"""The traffic a plan is for: request lengths, how many requests per second, the latency targets.

From flags (``--rate``, ``--input-tokens``, ``--output-tokens``, ``--prefix-hit-rate``), from a
``leanserve bench`` JSON (its requests' lengths and the rate it ran at), or from a window of the
cost ledger (real traffic: lengths, the mean rate and the busiest hour's rate). Torch-free.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SECONDS_PER_DAY = 86_400.0
HOUR = 3_600.0  # seconds


@dataclass(frozen=True)
class Targets:
    """Latency targets: the ``percentile`` of TTFT and of TPOT must stay at or under them."""

    ttft_ms: float = 2000.0
    tpot_ms: float = 100.0
    percentile: float = 90.0

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "tpot_ms"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a number > 0, got {v!r}")
        if not (0 < self.percentile < 100):
            raise ValueError(f"--percentile must be in (0, 100), got {self.percentile!r}")

    def describe(self) -> str:
        return f"p{self.percentile:g} TTFT <= {self.ttft_ms:g} ms, p{self.percentile:g} TPOT <= {self.tpot_ms:g} ms"


@dataclass(frozen=True)
class Workload:
    """Request lengths as samples (drawn with replacement by the simulator), the rate to plan for
    (requests/s at the busiest time) and the mean rate (for tokens per day and monthly bills)."""

    input_tokens: tuple[int, ...]
    output_tokens: tuple[int, ...]
    rate: float  # requests per second to size for
    mean_rate: float  # requests per second on average
    prefix_hit_rate: float = 0.0  # of prompt tokens, the share found in the prefix cache
    source: str = "flags"
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.input_tokens or not self.output_tokens:
            raise ValueError("a workload needs at least one request's lengths")
        if min(self.input_tokens) < 1 or min(self.output_tokens) < 1:
            raise ValueError("request lengths must be >= 1 token")
        for name in ("rate", "mean_rate"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"the workload's {name.replace('_', ' ')} must be > 0 requests/s, got {v!r}")
        if not (0 <= self.prefix_hit_rate < 1):
            raise ValueError(f"--prefix-hit-rate must be in [0, 1), got {self.prefix_hit_rate!r}")

    @property
    def mean_input(self) -> float:
        return sum(self.input_tokens) / len(self.input_tokens)

    @property
    def mean_output(self) -> float:
        return sum(self.output_tokens) / len(self.output_tokens)

    @property
    def tokens_per_request(self) -> float:
        return self.mean_input + self.mean_output

    @property
    def tokens_per_day(self) -> float:
        return self.mean_rate * self.tokens_per_request * SECONDS_PER_DAY

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "requests_per_s": self.rate, "mean_requests_per_s": self.mean_rate,
                "mean_input_tokens": self.mean_input, "mean_output_tokens": self.mean_output,
                "max_input_tokens": max(self.input_tokens), "max_output_tokens": max(self.output_tokens),
                "samples": len(self.input_tokens), "prefix_hit_rate": self.prefix_hit_rate,
                "tokens_per_day": self.tokens_per_day, "notes": list(self.notes)}


def parse_lengths(text: str, what: str) -> tuple[int, ...]:
    """'512' (fixed), '100:1024' (uniform, inclusive: 64 evenly spaced values) or '128,256,512'."""
    t = text.strip()
    try:
        if ":" in t:
            lo_s, hi_s = t.split(":", 1)
            lo, hi = int(lo_s), int(hi_s)
            if lo < 1 or hi < lo:
                raise ValueError
            n = min(64, hi - lo + 1)
            return tuple(lo + round(i * (hi - lo) / max(n - 1, 1)) for i in range(n))
        values = tuple(int(v) for v in t.split(","))
        if not values or min(values) < 1:
            raise ValueError
        return values
    except ValueError:
        raise ValueError(f"--{what} must be N, LOW:HIGH or N1,N2,... with tokens >= 1, got {text!r}") from None


def parse_window(text: str) -> float:
    """'7d', '24h', '90m', '3600' (seconds) -> seconds."""
    units = {"d": SECONDS_PER_DAY, "h": HOUR, "m": 60.0, "s": 1.0}
    t = text.strip().lower()
    try:
        value = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except (ValueError, IndexError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"--window must look like 7d, 24h, 90m or a number of seconds, got {text!r}")
    return value


def from_flags(rate: float, input_tokens: str, output_tokens: str, prefix_hit_rate: float = 0.0,
               mean_rate: float | None = None) -> Workload:
    return Workload(parse_lengths(input_tokens, "input-tokens"), parse_lengths(output_tokens, "output-tokens"),
                    rate, mean_rate or rate, prefix_hit_rate, source="flags")


def from_bench(path: Path, rate: float | None = None) -> Workload:
    """A ``leanserve bench --json`` file (one run, or a sweep's ``runs``): every successful request's
    lengths; the rate of its busiest run (its measured request throughput) unless ``rate`` is given."""
    data = _read_json(path)
    runs = (data.get("runs") or ([data] if "requests" in data else None)) if isinstance(data, dict) else None
    if not isinstance(runs, list) or not runs:
        raise ValueError(f"{path} is not a leanserve bench result (no 'runs')")
    ins: list[int] = []
    outs: list[int] = []
    cached = 0
    best_rate = 0.0
    for run in runs:
        if not isinstance(run, dict):
            continue
        for r in run.get("requests") or []:
            if isinstance(r, dict) and r.get("success") and int(r.get("input_tokens") or 0) > 0 \
                    and int(r.get("output_tokens") or 0) > 0:
                ins.append(int(r["input_tokens"]))
                outs.append(int(r["output_tokens"]))
                cached += int(r.get("cached_tokens") or 0)
        rt = run.get("request_throughput")
        if isinstance(rt, (int, float)) and math.isfinite(rt):
            best_rate = max(best_rate, float(rt))
    if not ins:
        raise ValueError(f"{path} holds no successful request with token counts")
    r = rate or best_rate
    if not r:
        raise ValueError(f"{path} has no request_throughput: give --rate")
    return Workload(tuple(ins), tuple(outs), r, r, min(cached / sum(ins), 0.99), source=f"bench file {path.name}")


def from_ledger(path: Path, window_s: float, rate: float | None = None, model: str | None = None,
                now: float | None = None) -> Workload:
    """The ledger's requests of the last ``window_s`` seconds (of ``model`` if given) that ran a
    model (response-cache hits did not): their lengths, the mean rate over the window and the rate
    of the busiest hour in it (what the instances must be sized for), unless ``rate`` is given."""
    if not path.is_file():
        raise ValueError(f"no ledger at {path}")
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            end = now if now is not None else time.time()
            q = ("SELECT ts, prompt_tokens, cached_tokens, output_tokens FROM requests WHERE ts > ? AND ts <= ? "
                 "AND output_tokens > 0 AND prompt_tokens > 0 AND finish_reason IN ('stop', 'length') "
                 "AND (cache IS NULL OR cache != 'hit')")
            args: list[Any] = [end - window_s, end]
            if model:
                q += " AND model = ?"
                args.append(model)
            rows = con.execute(q, args).fetchall()
            oldest = con.execute("SELECT MIN(ts) FROM requests").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error as e:
        raise ValueError(f"cannot read the ledger {path}: {e}") from None
    if not rows:
        raise ValueError(f"the ledger {path} has no completed requests in the last {window_s / HOUR:g} h"
                         + (f" for model {model!r}" if model else ""))
    ins = tuple(int(r[1]) for r in rows)
    outs = tuple(int(r[3]) for r in rows)
    cached = sum(int(r[2]) for r in rows)
    # a ledger younger than the window: its own age (an hour at least)
    span = min(window_s, max(end - float(oldest), HOUR))
    mean_rate = len(rows) / span
    hours: dict[int, int] = {}
    for ts, *_ in rows:
        hours[int(ts // HOUR)] = hours.get(int(ts // HOUR), 0) + 1
    peak = max(hours.values()) / HOUR
    notes = (f"{len(rows)} requests over {span / HOUR:.1f} h; busiest hour {max(hours.values())} requests",)
    return Workload(ins, outs, rate or peak, mean_rate, min(cached / sum(ins), 0.99),
                    source=f"ledger {path.name}, last {window_s / HOUR:g} h", notes=notes)



def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"cannot read the workload file {path}: not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the workload file {path}: {e}") from None
