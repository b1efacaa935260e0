"""The engine's step loop in one background thread, for the server: add, stream, abort.

    asyncio side (HTTP handlers)               engine thread (the only one touching the EngineCore)
    ----------------------------               -----------------------------------------------------
    add_request() -> RequestStream  --cmd-->   _commands (under _cond) drained at the top of
    abort() / timeout / disconnect  --cmd-->     every iteration: add_request / abort_request
                                               engine.step() -> StepResult
    RequestStream.get()  <--call_soon_threadsafe(_deliver, batch)-- one batch per iteration

The engine is driven through the `EngineCore` contract (engine/interface.py) and nothing else. A
request joins the running batch at the next iteration after it arrives (continuous batching).
Outputs are cumulative (full text and token ids so far), so a stream keeps only the newest one: a
client that never reads holds one output, not every output since it stopped reading. A request the
engine refuses fails alone with `InvalidRequestError`; a step that raises `StepError` fails the
requests it names with `EngineStepError` and the loop goes on. When there is nothing to do the
thread sleeps on a condition variable.

Cost accounting: every request that reached the engine leaves it exactly once -- finished, aborted
or failed -- and at that moment, on the engine thread, ``on_request_done(output, meta)`` is called
(if set) with its final output (``machine_seconds`` final) and the ``meta`` given to
``add_request``. What it returns (the server's bill) is handed to the request's stream as
``receipt`` before the final output. It runs on the engine thread, so it must be quick.

Admission control is counted in sequences (a request with ``n`` choices counts n): at most
``max_num_seqs + max_queue`` may be in the server at once. Requests that name a ``tenant`` (the
server passes the API key when it has several) share that capacity: while other tenants have work
in flight, a tenant holding sequences may hold at most ``capacity // max(2, active tenants)``, so
one caller cannot take every slot. Past either limit: `QueueFullError`, whose ``retry_after`` is
how long the sequences in the way take to drain at the rate sequences finished recently.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from leanserve.engine.interface import StepError
from leanserve.types import Priority, RequestOutput, SamplingParams

if TYPE_CHECKING:
    from leanserve.engine.interface import EngineCore
    from leanserve.tokenizer import LeanTokenizer

log = logging.getLogger("leanserve.async_engine")

DEFAULT_MAX_QUEUE = 256  # sequences that may wait beyond a full batch (leanserve serve --max-queue)


class InvalidRequestError(ValueError):
    """The engine refused the request (the message is for the user: an HTTP 400)."""


class EngineStepError(RuntimeError):
    """The model step that this request was part of failed (an HTTP 500)."""


class RequestTimeoutError(TimeoutError):
    """The request ran past its deadline and was aborted (an HTTP 504)."""


class QueueFullError(RuntimeError):
    """Too many sequences waiting: try again after ``retry_after`` seconds (an HTTP 429)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineDeadError(RuntimeError):
    """The engine thread is not running."""


@dataclass
class RequestStream:
    """What the HTTP side holds for one request: its newest output (outputs are cumulative, so an
    older unread one is replaced), then its final output or its error."""

    request_id: str
    num_seqs: int
    arrival_time: float  # time.monotonic() when accepted
    tenant: str | None = None
    first_scheduled_time: float | None = None  # set when the engine first schedules it
    first_output_time: float | None = None
    finished: bool = False  # a final output, an error or an abort was delivered
    receipt: Any = None  # what on_request_done returned for it (the server's bill), set before the final output
    _latest: RequestOutput | BaseException | None = None
    _closed: bool = False  # the final output or an error is in _latest (or was read): later puts are dropped
    _ready: asyncio.Event = field(default_factory=asyncio.Event)
    _timer: asyncio.TimerHandle | None = None

    @property
    def queue_time(self) -> float | None:
        if self.first_scheduled_time is None:
            return None
        return max(0.0, self.first_scheduled_time - self.arrival_time)

    def put(self, item: RequestOutput | BaseException) -> None:
        """Event loop only. An error or a final output closes the stream; an error replaces an unread output."""
        if self._closed:
            return
        self._latest = item
        self._closed = isinstance(item, BaseException) or item.finished
        self._ready.set()

    async def get(self) -> RequestOutput:
        """The newest output. Raises the request's error, if any."""
        while self._latest is None:
            self._ready.clear()
            await self._ready.wait()
        item, self._latest = self._latest, None
        if isinstance(item, BaseException):
            raise item
        if self.first_output_time is None:
            self.first_output_time = time.monotonic()
        return item

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while True:
            out = await self.get()
            yield out
            if out.finished:
                return


class DrainRate:
    """Sequences finished per second over the last ``window`` seconds (for Retry-After)."""

    def __init__(self, window: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self._start = clock()
        self._events: deque[tuple[float, int]] = deque()
        self._total = 0

    def add(self, num_seqs: int) -> None:
        self._events.append((self._clock(), num_seqs))
        self._total += num_seqs
        self._prune()

    def _prune(self) -> None:
        cutoff = self._clock() - self.window
        while self._events and self._events[0][0] < cutoff:
            self._total -= self._events.popleft()[1]

    def rate(self) -> float | None:
        """Sequences per second, or None before any finished in the window."""
        self._prune()
        span = min(self.window, self._clock() - self._start)
        if self._total <= 0 or span <= 0:
            return None
        return self._total / max(span, 1.0)

    def seconds_to_drain(self, num_seqs: int, fallback: float) -> float:
        """How long until ``num_seqs`` more sequences finish, in [1, 60] seconds."""
        rate = self.rate()
        secs = num_seqs / rate if rate else fallback
        return min(60.0, max(1.0, secs))


@dataclass
class _Add:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    priority: Priority
    meta: Any = None
    tenant: str | None = None


@dataclass
class _Abort:
    request_id: str


class AsyncEngine:
    """Runs ``engine`` in a background thread. Create it, then ``start()`` inside the event loop."""

    def __init__(self, engine: EngineCore, max_queue: int = DEFAULT_MAX_QUEUE) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.engine = engine
        self.max_queue = max_queue
        self.max_num_seqs: int = engine.info.max_num_seqs
        self._cond = threading.Condition()
        self._commands: list[_Add | _Abort] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._go: threading.Event | None = None  # set by start() for an engine built on its own thread
        self._started = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # event-loop side only
        self._streams: dict[str, RequestStream] = {}
        self._num_seqs_in_flight = 0
        self._held: dict[str, int] = {}  # tenant -> sequences in flight
        self._mean_latency = 1.0  # moving average of request latency, seconds: Retry-After before any drain
        self.drain = DrainRate()
        # written by the engine thread, read anywhere (one reference assignment: atomic)
        self.stats: dict[str, Any] = dict(engine.stats())
        self.num_steps = 0
        self.num_failed_steps = 0
        # called on the engine thread when a request leaves the engine (see the module docstring)
        self.on_request_done: Callable[[RequestOutput, Any], Any] | None = None
        self._meta: dict[str, Any] = {}  # engine thread only: request id -> meta

    # ---- lifecycle ---------------------------------------------------------------------------

    @classmethod
    def built_on_engine_thread(cls, build: Callable[[], EngineCore], max_queue: int = DEFAULT_MAX_QUEUE) -> AsyncEngine:
        """Build the engine on the thread that will run its loop; return once it is built (``build``'s
        exception is raised here). On CPU, all of torch's parallel work then starts from one thread:
        with OpenMP teams in two threads (the loader and the loop), libgomp on a 2-core machine stops
        spinning between parallel regions and every kernel pays a wake-up; measured: a decode step of
        SmolLM2-135M at batch 1 took 25 ms in the server's engine thread vs 13 ms offline."""
        built: dict[str, Any] = {}
        ready = threading.Event()
        go = threading.Event()

        def main() -> None:
            try:
                built["engine"] = cls(build(), max_queue)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                built["error"] = e
                return
            finally:
                ready.set()
            go.wait()
            built["engine"]._run()

        thread = threading.Thread(target=main, name="leanserve-engine", daemon=True)
        thread.start()
        ready.wait()
        if "error" in built:
            thread.join()
            raise built["error"]
        engine: AsyncEngine = built["engine"]
        engine._thread, engine._go = thread, go
        return engine

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if self._started:
            raise RuntimeError("AsyncEngine already started")
        self._started = True
        self._loop = loop or asyncio.get_running_loop()
        if self._go is not None:  # built on its own thread, which waits for the loop
            self._go.set()
            return
        self._thread = threading.Thread(target=self._run, name="leanserve-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._go is not None:  # a thread still waiting for start() sees _stopping and ends
            self._go.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- what the server needs to know about the model (read-only after construction) ---------

    @property
    def tokenizer(self) -> LeanTokenizer:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.info.max_model_len

    @property
    def vocab_size(self) -> int:
        """Width of the model's logits: valid token ids and logit_bias keys are below it."""
        return self.engine.info.vocab_size

    @property
    def kv_cache_tokens(self) -> int:
        return self.engine.info.kv_cache_tokens

    @property
    def dtype(self) -> str:
        return self.engine.info.dtype

    @property
    def device(self) -> str:
        return self.engine.info.device

    @property
    def is_running(self) -> bool:
        return self._started and self._thread is not None and self._thread.is_alive() and not self._stopping

    # ---- the asyncio side --------------------------------------------------------------------

    @property
    def num_seqs_in_flight(self) -> int:
        """Sequences accepted and not finished (running, waiting, or not yet handed to the engine)."""
        return self._num_seqs_in_flight

    @property
    def num_requests_in_flight(self) -> int:
        return len(self._streams)

    @property
    def capacity(self) -> int:
        """Most sequences the server holds at once: a full batch plus the waiting queue."""
        return self.max_num_seqs + self.max_queue

    def tenant_limit(self, tenant: str | None) -> int:
        """Most sequences ``tenant`` may hold while others have work in flight (see the module docstring)."""
        if tenant is None:
            return self.capacity
        active = len(self._held) + (tenant not in self._held)
        return self.capacity // max(2, active)

    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams,
                    priority: Priority = Priority.INTERACTIVE, timeout: float | None = None,
                    meta: Any = None, tenant: str | None = None) -> RequestStream:
        """Queue a request for the engine thread; its outputs arrive on the returned stream.

        Call from the event loop. Raises QueueFullError when the server (or the tenant's share of
        it) is full, ValueError for a request that can never fit, EngineDeadError when the loop is
        not running.
        """
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        n = params.n
        if n > self.capacity:
            raise ValueError(f"n must be <= {self.capacity} on this server, got {n}")
        total = self._num_seqs_in_flight
        if total + n > self.capacity:
            waiting = total - self.max_num_seqs
            raise QueueFullError(f"the server is at capacity ({self.max_num_seqs} running, {max(0, waiting)} waiting, "
                                 f"queue limit {self.max_queue}); retry later",
                                 self.drain.seconds_to_drain(total + n - self.capacity, self._mean_latency))
        held = self._held.get(tenant, 0) if tenant is not None else 0
        limit = self.tenant_limit(tenant)
        if held and held + n > limit:
            raise QueueFullError(f"this API key holds {held} of the server's {self.capacity} sequences and may hold "
                                 f"{limit} while others are waiting; retry later",
                                 self.drain.seconds_to_drain(held + n - limit, self._mean_latency))
        stream = RequestStream(request_id, n, time.monotonic(), tenant)
        self._streams[request_id] = stream
        self._num_seqs_in_flight += n
        if tenant is not None:
            self._held[tenant] = held + n
        if timeout is not None and timeout > 0 and math.isfinite(timeout):
            assert self._loop is not None
            stream._timer = self._loop.call_later(timeout, self._expire, request_id, timeout)
        self._submit(_Add(request_id, prompt, params, priority, meta, tenant))
        return stream

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks (on the engine thread's next iteration). Idempotent."""
        stream = self._streams.get(request_id)
        if stream is None:
            return
        self._finish(stream)
        self._submit(_Abort(request_id))

    def retry_after(self, num_seqs: int = 1) -> float:
        """Seconds until ``num_seqs`` sequences drain at the recent rate, in [1, 60]."""
        return self.drain.seconds_to_drain(num_seqs, self._mean_latency)

    def _expire(self, request_id: str, timeout: float) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        stream.put(RequestTimeoutError(f"the request took longer than {timeout:g} s and was aborted"))
        self.abort(request_id)

    def _finish(self, stream: RequestStream) -> None:
        if stream.finished:
            return
        stream.finished = True
        self._streams.pop(stream.request_id, None)
        self._num_seqs_in_flight -= stream.num_seqs
        if stream.tenant is not None:
            left = self._held.get(stream.tenant, 0) - stream.num_seqs
            if left > 0:
                self._held[stream.tenant] = left
            else:
                self._held.pop(stream.tenant, None)
        if stream._timer is not None:
            stream._timer.cancel()
        self.drain.add(stream.num_seqs)
        latency = time.monotonic() - stream.arrival_time
        self._mean_latency = 0.9 * self._mean_latency + 0.1 * latency

    def _submit(self, cmd: _Add | _Abort) -> None:
        with self._cond:
            self._commands.append(cmd)
            self._cond.notify()

    def _deliver(self, outputs: list[tuple[str, RequestOutput | BaseException, Any]],
                 scheduled: list[tuple[str, float]]) -> None:
        """On the event loop: hand one iteration's outputs (and final receipts) to their streams."""
        for rid, t in scheduled:
            stream = self._streams.get(rid)
            if stream is not None and stream.first_scheduled_time is None:
                stream.first_scheduled_time = t
        for rid, item, receipt in outputs:
            stream = self._streams.get(rid)
            if stream is None:  # aborted meanwhile
                continue
            if receipt is not None:
                stream.receipt = receipt
            stream.put(item)
            if isinstance(item, BaseException) or item.finished:
                self._finish(stream)

    # ---- the engine thread -------------------------------------------------------------------

    def _run(self) -> None:
        busy = False
        live: set[str] = set()  # requests inside the engine
        pending_schedule: set[str] = set()  # of those, not yet seen in a step
        while True:
            with self._cond:
                while not self._commands and not busy and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                commands, self._commands = self._commands, []
            try:
                busy, stepped, outputs, scheduled = self._iteration(commands, live, pending_schedule)
            except Exception as e:  # noqa: BLE001 - a bug outside the engine: fail what is in flight, keep serving
                log.exception("engine loop iteration failed")
                outputs = []
                for rid in list(live):
                    outputs.append((rid, EngineStepError(f"the engine failed: {type(e).__name__}: {e}"),
                                    self._safe_abort(rid, "error")))
                live.clear()
                pending_schedule.clear()
                scheduled, busy, stepped = [], False, True
            if outputs or scheduled:
                assert self._loop is not None
                try:
                    self._loop.call_soon_threadsafe(self._deliver, outputs, scheduled)
                except RuntimeError:  # the event loop is closed: the server is shutting down
                    return
            if busy and not stepped:
                # Unfinished requests but nothing could be scheduled: wait for a command, don't spin.
                with self._cond:
                    if not self._commands and not self._stopping:
                        self._cond.wait(0.005)

    def _iteration(self, commands: list[_Add | _Abort], live: set[str], pending_schedule: set[str]
                   ) -> tuple[bool, bool, list[tuple[str, RequestOutput | BaseException, Any]], list[tuple[str, float]]]:
        """Apply the commands, run one step. Returns (busy, stepped, outputs, first-scheduled times)."""
        engine = self.engine
        outputs: list[tuple[str, RequestOutput | BaseException, Any]] = []
        scheduled: list[tuple[str, float]] = []
        for cmd in commands:
            if isinstance(cmd, _Add):
                try:
                    engine.add_request(cmd.request_id, cmd.prompt, cmd.params, cmd.priority, cmd.tenant)
                except Exception as e:  # noqa: BLE001 - the request's own input: it fails alone
                    if not isinstance(e, ValueError):
                        log.warning("request %s refused by the engine: %s: %s", cmd.request_id, type(e).__name__, e)
                    outputs.append((cmd.request_id, InvalidRequestError(str(e) or type(e).__name__), None))
                else:
                    live.add(cmd.request_id)
                    pending_schedule.add(cmd.request_id)
                    if cmd.meta is not None:
                        self._meta[cmd.request_id] = cmd.meta
            elif cmd.request_id in live:
                live.discard(cmd.request_id)
                pending_schedule.discard(cmd.request_id)
                self._safe_abort(cmd.request_id)
        stepped = False
        if live:
            t_step = time.monotonic()
            try:
                result = engine.step()
            except StepError as e:  # the engine dropped the requests it names and goes on
                self.num_failed_steps += 1
                finals = {o.request_id: o for o in e.outputs}
                for rid in e.request_ids:
                    if rid in live:
                        live.discard(rid)
                        pending_schedule.discard(rid)
                        outputs.append((rid, EngineStepError(str(e)), self._done(rid, finals.get(rid))))
                stepped = True
            else:
                self.num_steps += 1
                stepped = bool(result.scheduled)
                for rid in result.scheduled:
                    if rid in pending_schedule:
                        pending_schedule.discard(rid)
                        scheduled.append((rid, t_step))
                for out in result.outputs:
                    receipt = None
                    if out.finished:
                        live.discard(out.request_id)
                        pending_schedule.discard(out.request_id)
                        receipt = self._done(out.request_id, out)
                    outputs.append((out.request_id, out, receipt))
        self.stats = engine.stats()
        return bool(live), stepped, outputs, scheduled

    def _safe_abort(self, request_id: str, reason: str = "abort") -> Any:
        out = None
        try:
            out = self.engine.abort_request(request_id, reason)
        except Exception:  # noqa: BLE001
            log.exception("aborting request %s failed", request_id)
        return self._done(request_id, out)

    def _done(self, request_id: str, out: RequestOutput | None) -> Any:
        """The request left the engine: tell the cost hook (engine thread); returns its receipt."""
        meta = self._meta.pop(request_id, None)
        if out is None or self.on_request_done is None:
            return None
        try:
            return self.on_request_done(out, meta)
        except Exception:  # noqa: BLE001 - accounting must not stop serving
            log.exception("the request-done hook failed for %s", request_id)
            return None
