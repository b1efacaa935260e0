"""Per-request records -> aggregate metrics, under the field names of `vllm bench serve`.

Definitions (as vLLM's benchmark_serving computes them):
- TTFT: request sent -> first content chunk.
- ITL: the gap between consecutive content chunks; pooled over all requests for its statistics.
- TPOT per request: (e2e latency - TTFT) / (output tokens - 1), only for requests with > 1 token.
- E2EL: request sent -> last byte of the stream.
- Percentiles: numpy's default linear interpolation; std is the population std (numpy default).
- Throughputs divide by the run's wall time (first request sent -> last response finished) and count
  only successful requests' tokens.
- Goodput: requests per second meeting every given SLO (ttft, tpot, e2el, in ms, each <=).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from leanserve.cost.catalog import cost_per_million_tokens

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
GOODPUT_KEYS = ("ttft", "tpot", "e2el")
DEFAULT_PERCENTILES = (90.0, 99.0)


@dataclass
class RequestRecord:
    """What one request did. Times in seconds; ``start_s`` is relative to the run's start."""

    request_id: str
    conversation_id: int = 0
    turn: int = 0
    success: bool = False
    error_kind: str | None = None  # http_<status> | timeout | connection | stream_error | previous_turn_failed | other
    error: str | None = None
    start_s: float = 0.0
    ttft_s: float | None = None
    e2el_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    input_tokens_source: str = "estimate"  # usage | estimate
    output_tokens_source: str = "chunks"  # usage | chunks
    num_chunks: int = 0
    requested_output_tokens: int | None = None
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, when reported
    server_cost_usd: float | None = None  # usage.cost (USD), when reported (a leanserve server does)
    # speculative decoding: usage.completion_tokens_details' accepted/rejected_prediction_tokens, when reported
    accepted_prediction_tokens: int | None = None
    rejected_prediction_tokens: int | None = None
    generated_text: str | None = None

    @property
    def tpot_s(self) -> float | None:
        """(e2el - ttft) / (output_tokens - 1); None for a failed or single-token request."""
        if not self.success or self.ttft_s is None or self.e2el_s is None or self.output_tokens <= 1:
            return None
        return (self.e2el_s - self.ttft_s) / (self.output_tokens - 1)

    def to_dict(self, ms: bool = True) -> dict[str, Any]:
        d = asdict(self)
        if ms:
            for key in ("ttft_s", "e2el_s"):
                v = d.pop(key)
                d[key.replace("_s", "_ms")] = None if v is None else round(v * 1000.0, 4)
            d["itl_ms"] = [round(x * 1000.0, 4) for x in d.pop("itl_s")]
            tpot = self.tpot_s
            d["tpot_ms"] = None if tpot is None else round(tpot * 1000.0, 4)
            d["start_ms"] = round(d.pop("start_s") * 1000.0, 3)
        if d.get("generated_text") is None:
            d.pop("generated_text", None)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RequestRecord":
        """Inverse of ``to_dict(ms=True)`` (ignores derived fields)."""
        def s(v: float | None) -> float | None:
            return None if v is None else v / 1000.0
        return cls(
            request_id=d["request_id"], conversation_id=d.get("conversation_id", 0), turn=d.get("turn", 0),
            success=d.get("success", False), error_kind=d.get("error_kind"), error=d.get("error"),
            start_s=(d.get("start_ms") or 0.0) / 1000.0, ttft_s=s(d.get("ttft_ms")), e2el_s=s(d.get("e2el_ms")),
            itl_s=[x / 1000.0 for x in d.get("itl_ms") or []], input_tokens=d.get("input_tokens", 0),
            output_tokens=d.get("output_tokens", 0), input_tokens_source=d.get("input_tokens_source", "estimate"),
            output_tokens_source=d.get("output_tokens_source", "chunks"), num_chunks=d.get("num_chunks", 0),
            requested_output_tokens=d.get("requested_output_tokens"), cached_tokens=d.get("cached_tokens"),
            server_cost_usd=d.get("server_cost_usd"), generated_text=d.get("generated_text"),
            accepted_prediction_tokens=d.get("accepted_prediction_tokens"),
            rejected_prediction_tokens=d.get("rejected_prediction_tokens"),
        )


def parse_goodput(items: Sequence[str] | None) -> dict[str, float]:
    """['ttft:500', 'tpot:50'] -> {'ttft': 500.0, 'tpot': 50.0} (milliseconds). ValueError on bad input."""
    slos: dict[str, float] = {}
    for item in items or []:
        for part in item.replace(",", " ").split():
            key, sep, value = part.partition(":")
            key = key.strip().lower()
            if not sep or key not in GOODPUT_KEYS:
                raise ValueError(f"bad --goodput item {part!r}: expected KEY:MS with KEY one of {', '.join(GOODPUT_KEYS)}")
            try:
                ms = float(value)
            except ValueError:
                raise ValueError(f"bad --goodput item {part!r}: {value!r} is not a number of milliseconds") from None
            if not (ms > 0 and math.isfinite(ms)):
                raise ValueError(f"bad --goodput item {part!r}: the SLO must be > 0 ms")
            slos[key] = ms
    return slos


def meets_slos(rec: RequestRecord, slos: dict[str, float]) -> bool:
    """True when a successful request meets every SLO (ms). A single-token request has TPOT 0."""
    if not rec.success:
        return False
    values_ms = {
        "ttft": (rec.ttft_s or 0.0) * 1000.0,
        "tpot": (rec.tpot_s or 0.0) * 1000.0,
        "e2el": (rec.e2el_s or 0.0) * 1000.0,
    }
    return all(values_ms[k] <= v for k, v in slos.items())


def _pword(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p)


def _stats(name: str, values_s: Sequence[float], percentiles: Iterable[float]) -> dict[str, float]:
    """mean/median/std/pXX of ``values_s`` (seconds) in ms, under vLLM's keys. Empty -> zeros (as vLLM)."""
    arr = np.asarray(values_s, dtype=np.float64) * 1000.0 if len(values_s) else np.zeros(1)
    out = {
        f"mean_{name}_ms": float(np.mean(arr)),
        f"median_{name}_ms": float(np.median(arr)),
        f"std_{name}_ms": float(np.std(arr)),
    }
    for p in percentiles:
        out[f"p{_pword(p)}_{name}_ms"] = float(np.percentile(arr, p))
    return out


def compute_metrics(
    records: Sequence[RequestRecord],
    duration_s: float,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    goodput_slos: dict[str, float] | None = None,
    price_per_hour: float | None = None,
) -> dict[str, Any]:
    """Aggregate ``records`` of a run that took ``duration_s`` wall seconds."""
    ok = [r for r in records if r.success]
    failed = [r for r in records if not r.success]
    total_in = sum(r.input_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    dur = duration_s if duration_s > 0 else float("nan")

    m: dict[str, Any] = {
        "duration": duration_s,
        "num_requests": len(records),
        "completed": len(ok),
        "failed": len(failed),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / dur if ok else 0.0,
        "output_throughput": total_out / dur if ok else 0.0,
        "total_token_throughput": (total_in + total_out) / dur if ok else 0.0,
    }
    for k in ("request_throughput", "output_throughput", "total_token_throughput"):
        if not math.isfinite(m[k]):
            m[k] = 0.0

    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    tpots = [t for t in (r.tpot_s for r in ok) if t is not None]
    itls = [x for r in ok for x in r.itl_s]
    e2els = [r.e2el_s for r in ok if r.e2el_s is not None]
    for name, vals in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        m.update(_stats(name, vals, percentiles))

    # Time-averaged number of requests in flight (Little's law): the load the server actually saw.
    m["mean_requests_in_flight"] = (sum(r.e2el_s or 0.0 for r in ok) / duration_s) if duration_s > 0 else 0.0

    if goodput_slos:
        good = sum(1 for r in ok if meets_slos(r, goodput_slos))
        m["goodput_slos_ms"] = dict(goodput_slos)
        m["good_requests"] = good
        m["request_goodput"] = good / duration_s if duration_s > 0 else 0.0
    m["errors_by_kind"] = dict(sorted(Counter(r.error_kind or "other" for r in failed).items()))

    # How tokens were counted: the server's usage where present, otherwise content chunks / estimates.
    m["output_tokens_counted_by"] = _source_summary(r.output_tokens_source for r in ok)
    m["input_tokens_counted_by"] = _source_summary(r.input_tokens_source for r in ok)

    cached = [r.cached_tokens for r in ok if r.cached_tokens is not None]
    if cached:
        prompt_with_cache_info = sum(r.input_tokens for r in ok if r.cached_tokens is not None)
        m["total_cached_tokens"] = sum(cached)
        m["prefix_cache_hit_rate"] = sum(cached) / prompt_with_cache_info if prompt_with_cache_info else 0.0

    spec = [r for r in ok if r.accepted_prediction_tokens is not None]
    if spec:  # speculative decoding, as the server's usage reports it
        acc = sum(r.accepted_prediction_tokens or 0 for r in spec)
        rej = sum(r.rejected_prediction_tokens or 0 for r in spec)
        out_spec = sum(r.output_tokens for r in spec)
        m["spec_accepted_tokens"], m["spec_rejected_tokens"] = acc, rej
        m["spec_acceptance_rate"] = acc / (acc + rej) if acc + rej else 0.0
        m["spec_accepted_share_of_output"] = acc / out_spec if out_spec else 0.0  # output tokens that were drafts
    m.update(cost_metrics(m, price_per_hour))
    costs = [r.server_cost_usd for r in ok if r.server_cost_usd is not None]
    if costs:
        server_cost = float(sum(costs))
        m["server_reported_cost_usd"] = server_cost
        m["server_cost_requests"] = len(costs)
        m["server_cost_per_million_output_tokens"] = server_cost / total_out * 1e6 if total_out else None
        m["server_cost_per_million_total_tokens"] = (
            server_cost / (total_in + total_out) * 1e6 if (total_in + total_out) else None)
    return m


def _source_summary(sources: Iterable[str]) -> str:
    kinds = sorted(set(sources))
    if not kinds:
        return "none"
    return kinds[0] if len(kinds) == 1 else "mixed(" + ",".join(kinds) + ")"


def cost_metrics(m: dict[str, Any], price_per_hour: float | None) -> dict[str, Any]:
    """$/Mtok from a run's throughputs at ``price_per_hour`` (None when no price or no throughput)."""
    out: dict[str, Any] = {"cost_per_million_output_tokens": None, "cost_per_million_total_tokens": None}
    if price_per_hour is None:
        return out
    if m.get("output_throughput", 0) > 0:
        out["cost_per_million_output_tokens"] = cost_per_million_tokens(price_per_hour, m["output_throughput"])
    if m.get("total_token_throughput", 0) > 0:
        out["cost_per_million_total_tokens"] = cost_per_million_tokens(price_per_hour, m["total_token_throughput"])
    return out
