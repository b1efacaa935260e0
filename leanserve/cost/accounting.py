"""Live cost figures of a server: the meter's machine time plus the requests billed so far.

Two kinds of numbers, side by side:

* machine figures, from the meter: wall, busy and idle seconds, utilization, steps, tokens
  computed, achieved FLOP/s (2 x parameters x tokens computed / busy seconds) and weight bandwidth
  (bytes of weights x steps / busy seconds), each also as a fraction of the hardware's peak;
* billed figures, from the requests that left the engine (the same records the ledger gets):
  requests, prompt/cached/output tokens, $ (and its input/output split) and $ per million tokens.

Both are kept since start and per second for the last hour, so ``report(window=60)`` gives the
same figures over a sliding window (whole seconds; billed figures count requests that finished in
the window).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from leanserve.cost.basis import PriceBasis
from leanserve.cost.ledger import LedgerRecord
from leanserve.cost.meter import HISTORY_SECONDS, CostMeter, MeterSnapshot


@dataclass
class Billed:
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    machine_seconds: float = 0.0
    prefill_seconds: float = 0.0
    usd: float = 0.0
    input_usd: float = 0.0
    cache_hits: int = 0  # requests answered from the response cache ($0)
    saved_prefix_usd: float = 0.0
    saved_cache_usd: float = 0.0
    saved_routing_usd: float = 0.0

    def add(self, r: LedgerRecord) -> None:
        self.requests += 1
        self.prompt_tokens += r.prompt_tokens
        self.cached_tokens += r.cached_tokens
        self.output_tokens += r.output_tokens
        self.machine_seconds += r.machine_seconds
        self.prefill_seconds += r.prefill_seconds
        self.usd += r.cost_usd
        # rows of schema 1 carry no input_usd: their prompt's share at their price
        self.input_usd += r.input_usd if r.input_usd is not None else r.prefill_seconds * r.price_per_hour / 3600.0
        self.cache_hits += r.cache == "hit"
        self.saved_prefix_usd += r.saved_prefix_usd
        self.saved_cache_usd += r.saved_cache_usd
        self.saved_routing_usd += r.saved_routing_usd

    def merge(self, o: "Billed") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(o, f.name))

    def saved(self) -> dict[str, float]:
        """What the levers saved, USD: their sum and each (receipts: docs/gateway.md)."""
        return {"usd": self.saved_prefix_usd + self.saved_cache_usd + self.saved_routing_usd,
                "prefix_cache": self.saved_prefix_usd, "response_cache": self.saved_cache_usd,
                "routing": self.saved_routing_usd}

    def figures(self) -> dict[str, Any]:
        """The billed figures of a report (the machine's figures come from CostBook)."""
        output_usd = max(0.0, self.usd - self.input_usd)
        return {
            "requests": self.requests,
            "cache_hits": self.cache_hits,
            "tokens": {"input": self.prompt_tokens, "cached": self.cached_tokens, "output": self.output_tokens,
                       "total": self.prompt_tokens + self.output_tokens},
            "machine_seconds": self.machine_seconds,
            "usd": self.usd,
            "input_usd": self.input_usd,
            "output_usd": output_usd,
            "usd_per_million_tokens": {"input": _per_mtok(self.input_usd, self.prompt_tokens),
                                       "output": _per_mtok(output_usd, self.output_tokens),
                                       "total": _per_mtok(self.usd, self.prompt_tokens + self.output_tokens)},
            "saved": self.saved(),
        }


def _per_mtok(usd: float, tokens: int) -> float | None:
    return usd / tokens * 1e6 if tokens > 0 else None


def _frac(x: float | None, peak: float | None) -> float | None:
    return x / peak if x is not None and peak else None


class BilledBook:
    """The requests billed to one model, since start and per second for the last hour. Thread-safe:
    ``bill()`` from the engine thread (or the gateway), ``billed()`` from HTTP handlers."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._total = Billed()
        self._history: deque[tuple[int, Billed]] = deque()
        self._lock = threading.Lock()

    def _now_part(self) -> Billed:  # under the lock
        sec = math.floor(self._clock())
        if not self._history or self._history[-1][0] != sec:
            self._history.append((sec, Billed()))
            while self._history and self._history[0][0] < sec - HISTORY_SECONDS:
                self._history.popleft()
        return self._history[-1][1]

    def bill(self, rec: LedgerRecord) -> None:
        with self._lock:
            self._total.add(rec)
            self._now_part().add(rec)

    def add_saved_routing(self, usd: float) -> None:
        """A cascade's routing receipt, known after its attempts were billed (counted now)."""
        with self._lock:
            self._total.saved_routing_usd += usd
            self._now_part().saved_routing_usd += usd

    def billed(self, window: float | None = None) -> Billed:
        with self._lock:
            if window is None:
                b = Billed()
                b.merge(self._total)
                return b
            first = math.floor(self._clock()) - math.ceil(min(window, HISTORY_SECONDS)) + 1
            b = Billed()
            for sec, part in reversed(self._history):
                if sec < first:
                    break
                b.merge(part)
            return b

    def report(self, window: float | None = None) -> dict[str, Any]:
        return {"window_seconds": window, **self.billed(window).figures()}

    def usd_per_token(self) -> tuple[float, float] | None:
        """(input, output) $ per token over everything billed so far (cache hits left out); None before
        the first computed request: what the next request would likely cost here."""
        b = self.billed(None)
        computed = b.requests - b.cache_hits
        if computed <= 0 or b.prompt_tokens + b.output_tokens == 0:
            return None
        return (b.input_usd / b.prompt_tokens if b.prompt_tokens else 0.0,
                max(0.0, b.usd - b.input_usd) / b.output_tokens if b.output_tokens else 0.0)


class CostBook(BilledBook):
    """A local model's book: the billed requests plus its engine's machine time (the meter)."""

    def __init__(self, basis: PriceBasis, meter: CostMeter, num_params: int, weight_bytes: int, dtype: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(clock)
        self.basis = basis
        self.meter = meter
        self.num_params = num_params
        self.weight_bytes = weight_bytes
        self.dtype = dtype

    def report(self, window: float | None = None) -> dict[str, Any]:
        """The figures since start (``window=None``) or over the last ``window`` seconds."""
        snap = self.meter.snapshot(window)
        return self.figures(snap, self.billed(window), window)

    def figures(self, snap: MeterSnapshot, b: Billed, window: float | None) -> dict[str, Any]:
        hw = self.basis.hardware
        busy = snap.busy_seconds
        flops = 2.0 * self.num_params * snap.tokens_computed / busy if busy > 0 else None
        bandwidth = self.weight_bytes * snap.steps / busy if busy > 0 else None
        billed = b.figures()
        billed["tokens"].update({"computed_prefill": snap.prefill_tokens, "computed_decode": snap.decode_tokens})
        return {
            "window_seconds": window,
            "wall_seconds": snap.wall_seconds,
            "busy_seconds": busy,
            "idle_seconds": snap.idle_seconds,
            "utilization": snap.utilization,
            "steps": snap.steps,
            "machine_usd": self.basis.usd(busy),  # the busy time at the price (what requests are billed, in total)
            "idle_usd": self.basis.usd(snap.idle_seconds),  # paid for, billed to no request
            **billed,
            "achieved": {"flops_per_second": flops,
                         "flops_fraction_of_peak": _frac(flops, hw.peak_flops_for(self.dtype)),
                         "weight_bytes_per_second": bandwidth,
                         "bandwidth_fraction_of_peak": _frac(bandwidth, hw.peak_memory_bandwidth_gbps * 1e9)},
        }

    def basis_dict(self) -> dict[str, Any]:
        d = self.basis.to_dict()
        d.update({"dtype": self.dtype, "peak_flops_for_dtype": self.basis.hardware.peak_flops_for(self.dtype),
                  "model_parameters": self.num_params, "weight_bytes": self.weight_bytes})
        return d
