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
from dataclasses import dataclass
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

    def add(self, r: LedgerRecord) -> None:
        self.requests += 1
        self.prompt_tokens += r.prompt_tokens
        self.cached_tokens += r.cached_tokens
        self.output_tokens += r.output_tokens
        self.machine_seconds += r.machine_seconds
        self.prefill_seconds += r.prefill_seconds
        self.usd += r.cost_usd

    def merge(self, o: "Billed") -> None:
        for f in ("requests", "prompt_tokens", "cached_tokens", "output_tokens", "machine_seconds",
                  "prefill_seconds", "usd"):
            setattr(self, f, getattr(self, f) + getattr(o, f))


def _per_mtok(usd: float, tokens: int) -> float | None:
    return usd / tokens * 1e6 if tokens > 0 else None


def _frac(x: float | None, peak: float | None) -> float | None:
    return x / peak if x is not None and peak else None


class CostBook:
    """Thread-safe: ``bill()`` from the engine thread, ``report()`` from HTTP handlers."""

    def __init__(self, basis: PriceBasis, meter: CostMeter, num_params: int, weight_bytes: int, dtype: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.basis = basis
        self.meter = meter
        self.num_params = num_params
        self.weight_bytes = weight_bytes
        self.dtype = dtype
        self._clock = clock
        self._total = Billed()
        self._history: deque[tuple[int, Billed]] = deque()
        self._lock = threading.Lock()

    def bill(self, rec: LedgerRecord) -> None:
        sec = math.floor(self._clock())
        with self._lock:
            self._total.add(rec)
            if not self._history or self._history[-1][0] != sec:
                self._history.append((sec, Billed()))
                while self._history and self._history[0][0] < sec - HISTORY_SECONDS:
                    self._history.popleft()
            self._history[-1][1].add(rec)

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
        """The figures since start (``window=None``) or over the last ``window`` seconds."""
        snap = self.meter.snapshot(window)
        return self.figures(snap, self.billed(window), window)

    def figures(self, snap: MeterSnapshot, b: Billed, window: float | None) -> dict[str, Any]:
        hw = self.basis.hardware
        busy = snap.busy_seconds
        flops = 2.0 * self.num_params * snap.tokens_computed / busy if busy > 0 else None
        bandwidth = self.weight_bytes * snap.steps / busy if busy > 0 else None
        input_usd = self.basis.usd(b.prefill_seconds)
        output_usd = max(0.0, b.usd - input_usd)
        return {
            "window_seconds": window,
            "wall_seconds": snap.wall_seconds,
            "busy_seconds": busy,
            "idle_seconds": snap.idle_seconds,
            "utilization": snap.utilization,
            "steps": snap.steps,
            "machine_usd": self.basis.usd(busy),  # the busy time at the price (what requests are billed, in total)
            "idle_usd": self.basis.usd(snap.idle_seconds),  # paid for, billed to no request
            "requests": b.requests,
            "tokens": {"input": b.prompt_tokens, "cached": b.cached_tokens, "output": b.output_tokens,
                       "total": b.prompt_tokens + b.output_tokens,
                       "computed_prefill": snap.prefill_tokens, "computed_decode": snap.decode_tokens},
            "machine_seconds": b.machine_seconds,
            "usd": b.usd,
            "input_usd": input_usd,
            "output_usd": output_usd,
            "usd_per_million_tokens": {"input": _per_mtok(input_usd, b.prompt_tokens),
                                       "output": _per_mtok(output_usd, b.output_tokens),
                                       "total": _per_mtok(b.usd, b.prompt_tokens + b.output_tokens)},
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
