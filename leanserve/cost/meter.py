"""Machine time -> requests: what each request cost, exactly enough to bill from.

The attribution rule: an engine step's wall-clock time (schedule + forward + sampling + update,
measured around the whole step) is split over the requests in that step in proportion to the
tokens each had computed in it. A decode token and a prefill token each count once: both go
through every weight once, and on this engine's hardware the weights, not attention, dominate a
step. Prompt tokens found in the prefix cache are never computed, so they cost nothing: a cached
prompt is charged less than the same prompt uncached. A request aborted part-way keeps what its
steps cost. The per-request machine-seconds of a run add up to the engine's busy time exactly
(up to float rounding); the rest of the wall-clock time is idle, reported on its own.

Input vs output: of the tokens a request had computed in a step, those still inside its prompt
(``num_computed_tokens < num_prompt_tokens`` when scheduled) are prefill tokens, the rest decode
tokens. The request's share of the step is split the same way, so its machine-seconds are
``prefill_seconds + decode_seconds`` with each token, prompt or generated, costing the same within
a step. The meter also keeps per-second totals (busy time, steps, prefill and decode tokens) for
the last hour, so figures over a sliding window can be read (``snapshot(window=60)``).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

HISTORY_SECONDS = 3600  # how far back snapshot(window=...) can look


@dataclass(frozen=True)
class MeterSnapshot:
    wall_seconds: float  # since the meter started (or the window's length, if it started earlier)
    busy_seconds: float  # sum of step times
    steps: int
    prefill_tokens: int = 0  # prompt tokens computed (prefix-cache hits are not computed)
    decode_tokens: int = 0  # generated tokens computed
    prefill_seconds: float = 0.0  # the prefill tokens' share of busy_seconds

    @property
    def tokens_computed(self) -> int:
        return self.prefill_tokens + self.decode_tokens

    @property
    def decode_seconds(self) -> float:
        return max(0.0, self.busy_seconds - self.prefill_seconds)

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
        self._prefill_tokens = 0
        self._decode_tokens = 0
        self._prefill_seconds = 0.0
        self._charged: dict[str, float] = {}  # request id -> machine-seconds so far
        self._charged_prefill: dict[str, float] = {}  # request id -> the prefill share of it
        # per-second totals: [second, busy, steps, prefill tokens, decode tokens, prefill seconds]
        self._history: deque[list[float]] = deque()
        self._lock = threading.Lock()  # the engine thread writes, HTTP handlers read

    def record_step(self, seconds: float, tokens: Mapping[str, int],
                    prefill_tokens: Mapping[str, int] | None = None) -> None:
        """Charge one step of ``seconds`` to the requests in it, by tokens computed.

        ``prefill_tokens`` says how many of each request's ``tokens`` were prompt tokens (none if
        left out); their share of the charge is the request's prefill seconds.
        """
        if seconds < 0:
            raise ValueError(f"a step cannot take negative time ({seconds})")
        prefill_tokens = prefill_tokens or {}
        total = sum(tokens.values())
        n_prefill = sum(min(prefill_tokens.get(rid, 0), n) for rid, n in tokens.items())
        now = self._clock()
        with self._lock:
            self._busy += seconds
            self._steps += 1
            step_prefill_s = seconds * n_prefill / total if total > 0 else 0.0
            self._prefill_tokens += n_prefill
            self._decode_tokens += max(0, total - n_prefill)
            self._prefill_seconds += step_prefill_s
            self._add_history(now, seconds, n_prefill, max(0, total - n_prefill), step_prefill_s)
            if total <= 0:
                return
            for rid, n in tokens.items():
                self._charged[rid] = self._charged.get(rid, 0.0) + seconds * n / total
                p = min(prefill_tokens.get(rid, 0), n)
                if p > 0:
                    self._charged_prefill[rid] = self._charged_prefill.get(rid, 0.0) + seconds * p / total

    def _add_history(self, now: float, seconds: float, prefill: int, decode: int, prefill_s: float) -> None:
        sec = math.floor(now)
        h = self._history
        if not h or h[-1][0] != sec:
            h.append([sec, 0.0, 0, 0, 0, 0.0])
            while h and h[0][0] < sec - HISTORY_SECONDS:
                h.popleft()
        b = h[-1]
        b[1] += seconds
        b[2] += 1
        b[3] += prefill
        b[4] += decode
        b[5] += prefill_s

    def charged(self, request_id: str) -> float:
        with self._lock:
            return self._charged.get(request_id, 0.0)

    def charged_prefill(self, request_id: str) -> float:
        """The prefill (prompt tokens) share of ``charged(request_id)``; the rest is decode."""
        with self._lock:
            return self._charged_prefill.get(request_id, 0.0)

    def pop(self, request_id: str) -> float:
        """The request's machine-seconds, forgotten here (it finished; the ledger keeps it)."""
        with self._lock:
            self._charged_prefill.pop(request_id, None)
            return self._charged.pop(request_id, 0.0)

    def pop_split(self, request_id: str) -> tuple[float, float]:
        """(machine-seconds, of which prefill), forgotten here."""
        with self._lock:
            return self._charged.pop(request_id, 0.0), self._charged_prefill.pop(request_id, 0.0)

    def snapshot(self, window: float | None = None) -> MeterSnapshot:
        """Totals since the meter started or, with ``window``, over the last ``window`` seconds
        (whole seconds: the current second counts in full; at most HISTORY_SECONDS)."""
        with self._lock:
            now = self._clock()
            wall = now - self._start
            if window is None:
                return MeterSnapshot(wall, self._busy, self._steps, self._prefill_tokens, self._decode_tokens,
                                     self._prefill_seconds)
            if window <= 0:
                raise ValueError(f"window must be > 0 seconds, got {window}")
            window = min(float(window), HISTORY_SECONDS)
            first = math.floor(now) - math.ceil(window) + 1  # the buckets [first, now]
            busy, steps, pre, dec, pre_s = 0.0, 0, 0, 0, 0.0
            for b in reversed(self._history):
                if b[0] < first:
                    break
                busy += b[1]
                steps += int(b[2])
                pre += int(b[3])
                dec += int(b[4])
                pre_s += b[5]
            return MeterSnapshot(max(min(window, wall), busy), busy, steps, pre, dec, pre_s)
