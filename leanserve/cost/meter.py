"""Machine time -> requests: what each request cost, exactly enough to bill from.

The attribution rule: an engine step's wall-clock time (schedule + forward + sampling + update,
measured around the whole step) is split over the requests in that step in proportion to the
tokens each had computed in it. A decode token and a prefill token each count once: both go
through every weight once, and on this engine's hardware the weights, not attention, dominate a
step. Prompt tokens found in the prefix cache are never computed, so they cost nothing: a cached
prompt is charged less than the same prompt uncached. A request aborted part-way keeps what its
steps cost. The per-request machine-seconds of a run add up to the engine's busy time exactly
(up to float rounding); the rest of the wall-clock time is idle, reported on its own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class MeterSnapshot:
    wall_seconds: float  # since the meter started
    busy_seconds: float  # sum of step times
    steps: int

    @property
    def idle_seconds(self) -> float:
        return max(0.0, self.wall_seconds - self.busy_seconds)

    @property
    def utilization(self) -> float:
        return self.busy_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0


class CostMeter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._start = clock()
        self._busy = 0.0
        self._steps = 0
        self._charged: dict[str, float] = {}  # request id -> machine-seconds so far
        self._lock = threading.Lock()  # the engine thread writes, HTTP handlers read

    def record_step(self, seconds: float, tokens: Mapping[str, int]) -> None:
        """Charge one step of ``seconds`` to the requests in it, by tokens computed."""
        if seconds < 0:
            raise ValueError(f"a step cannot take negative time ({seconds})")
        total = sum(tokens.values())
        with self._lock:
            self._busy += seconds
            self._steps += 1
            if total <= 0:
                return
            for rid, n in tokens.items():
                self._charged[rid] = self._charged.get(rid, 0.0) + seconds * n / total

    def charged(self, request_id: str) -> float:
        with self._lock:
            return self._charged.get(request_id, 0.0)

    def pop(self, request_id: str) -> float:
        """The request's machine-seconds, forgotten here (it finished; the ledger keeps it)."""
        with self._lock:
            return self._charged.pop(request_id, 0.0)

    def snapshot(self) -> MeterSnapshot:
        with self._lock:
            return MeterSnapshot(self._clock() - self._start, self._busy, self._steps)
