"""The engine's step loop in one background thread, for the server: add, stream, abort.

    asyncio side (HTTP handlers)               engine thread (the only one touching LLMEngine)
    ----------------------------               -----------------------------------------------
    add_request() -> RequestStream  --cmd-->   _commands (under _cond) drained at the top of
    abort() / timeout / disconnect  --cmd-->     every iteration: add_request / abort_request
                                               engine.step() -> RequestOutputs
    RequestStream.get()  <--call_soon_threadsafe(_deliver, batch)-- one batch per iteration

A request joins the running batch at the next iteration after it arrives (continuous batching).
Outputs are cumulative (full text and token ids so far), so a consumer that falls behind skips to
the newest one. A request the engine rejects (ValueError in ``add_request``) fails alone with
`InvalidRequestError`; if ``step()`` raises, the requests of that step fail with `EngineStepError`,
the prefix cache is reset (blocks named in the failed step were never written) and the loop goes
on. When there is nothing to do the thread sleeps on a condition variable.

Cost accounting: every request that reached the engine leaves it exactly once -- finished, aborted
or failed -- and at that moment, on the engine thread, ``on_request_done(output, meta)`` is called
(if set) with its last output (``machine_seconds`` final; unfinished choices end with "abort" or
"error") and the ``meta`` given to ``add_request``. It is called before the output is handed to the
event loop, so the hook must be quick (the server bills and queues a ledger row).

Admission control is counted in sequences (a request with ``n`` choices counts n): at most
``max_num_seqs + max_queue`` may be in the server at once; past that `QueueFullError`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from leanserve.types import Priority, RequestOutput, SamplingParams

if TYPE_CHECKING:
    from leanserve.engine.engine import LLMEngine

log = logging.getLogger("leanserve.async_engine")


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
    """What the HTTP side holds for one request: its outputs, in order, as they come."""

    request_id: str
    num_seqs: int
    arrival_time: float  # time.monotonic() when accepted
    first_scheduled_time: float | None = None  # set when the engine first schedules it
    first_output_time: float | None = None
    finished: bool = False  # a final output, an error or an abort was delivered
    _queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    _timer: asyncio.TimerHandle | None = None

    @property
    def queue_time(self) -> float | None:
        if self.first_scheduled_time is None:
            return None
        return max(0.0, self.first_scheduled_time - self.arrival_time)

    async def get(self) -> RequestOutput:
        """The newest output (skipping older unread ones). Raises the request's error, if any."""
        item = await self._queue.get()
        while isinstance(item, RequestOutput) and not item.finished and not self._queue.empty():
            item = self._queue.get_nowait()
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


@dataclass
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    priority: Priority
    meta: Any = None


@dataclass
class _Abort:
    request_id: str


class AsyncEngine:
    """Runs ``engine`` in a background thread. Create it, then ``start()`` inside the event loop."""

    def __init__(self, engine: LLMEngine, max_queue: int = 256) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.engine = engine
        self.max_queue = max_queue
        self.max_num_seqs: int = engine.scheduler.config.max_num_seqs
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
        self._mean_latency = 1.0  # moving average of request latency, seconds: feeds Retry-After
        # written by the engine thread, read anywhere (one reference assignment: atomic)
        self.stats: dict[str, Any] = dict(engine.stats())
        self.num_steps = 0
        self.num_failed_steps = 0
        # called on the engine thread when a request leaves the engine (see the module docstring)
        self.on_request_done: Callable[[RequestOutput, Any], None] | None = None
        self._meta: dict[str, Any] = {}  # engine thread only: request id -> meta

    # ---- lifecycle ---------------------------------------------------------------------------

    @classmethod
    def built_on_engine_thread(cls, build: Callable[[], LLMEngine], max_queue: int = 256) -> AsyncEngine:
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
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        """Width of the model's logits: valid token ids and logit_bias keys are below it."""
        return int(self.engine.loaded.config.vocab_size)

    @property
    def kv_cache_tokens(self) -> int:
        return self.engine.kv_cache_tokens

    @property
    def dtype(self) -> str:
        return str(self.engine.loaded.dtype).removeprefix("torch.")

    @property
    def device(self) -> str:
        return str(self.engine.loaded.device)

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

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    priority: Priority = Priority.INTERACTIVE, timeout: float | None = None,
                    meta: Any = None) -> RequestStream:
        """Queue a request for the engine thread; its outputs arrive on the returned stream.

        Call from the event loop. Raises QueueFullError when the waiting queue is full,
        ValueError for a request that can never fit, EngineDeadError when the loop is not running.
        """
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        if "#" in request_id:
            raise ValueError("request ids must not contain '#' (the engine's suffix for n > 1)")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        if params.n > self.capacity:
            raise ValueError(f"n must be <= {self.capacity} on this server, got {params.n}")
        if self._num_seqs_in_flight + params.n > self.capacity:
            waiting = self._num_seqs_in_flight - self.max_num_seqs
            raise QueueFullError(f"the server is at capacity ({self.max_num_seqs} running, {max(0, waiting)} waiting, "
                                 f"queue limit {self.max_queue}); retry later", self.retry_after())
        stream = RequestStream(request_id, params.n, time.monotonic())
        self._streams[request_id] = stream
        self._num_seqs_in_flight += params.n
        if timeout is not None and timeout > 0 and math.isfinite(timeout):
            assert self._loop is not None
            stream._timer = self._loop.call_later(timeout, self._expire, request_id, timeout)
        self._submit(_Add(request_id, prompt, params, priority, meta))
        return stream

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks (on the engine thread's next iteration). Idempotent."""
        stream = self._streams.get(request_id)
        if stream is None:
            return
        self._finish(stream)
        self._submit(_Abort(request_id))

    def retry_after(self) -> float:
        """A guess at when a slot frees up: the mean request latency, in [1, 60] seconds."""
        return min(60.0, max(1.0, self._mean_latency))

    def _expire(self, request_id: str, timeout: float) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        stream._queue.put_nowait(RequestTimeoutError(f"the request took longer than {timeout:g} s and was aborted"))
        self.abort(request_id)

    def _finish(self, stream: RequestStream) -> None:
        if stream.finished:
            return
        stream.finished = True
        self._streams.pop(stream.request_id, None)
        self._num_seqs_in_flight -= stream.num_seqs
        if stream._timer is not None:
            stream._timer.cancel()
        latency = time.monotonic() - stream.arrival_time
        self._mean_latency = 0.9 * self._mean_latency + 0.1 * latency

    def _submit(self, cmd: _Add | _Abort) -> None:
        with self._cond:
            self._commands.append(cmd)
            self._cond.notify()

    def _deliver(self, outputs: list[tuple[str, RequestOutput | BaseException]],
                 scheduled: list[tuple[str, float]]) -> None:
        """On the event loop: hand one iteration's outputs to their streams."""
        for rid, t in scheduled:
            stream = self._streams.get(rid)
            if stream is not None and stream.first_scheduled_time is None:
                stream.first_scheduled_time = t
        for rid, item in outputs:
            stream = self._streams.get(rid)
            if stream is None:  # aborted meanwhile
                continue
            stream._queue.put_nowait(item)
            if isinstance(item, BaseException) or item.finished:
                self._finish(stream)

    # ---- the engine thread -------------------------------------------------------------------

    def _run(self) -> None:
        busy = False
        live: set[str] = set()  # requests inside the engine
        pending_schedule: set[str] = set()  # of those, not yet seen in a schedule
        while True:
            with self._cond:
                while not self._commands and not busy and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                commands, self._commands = self._commands, []
            try:
                busy, stepped, outputs, scheduled = self._iteration(commands, live, pending_schedule)
            except Exception as e:  # noqa: BLE001 - a bug outside step(): fail what is in flight, keep serving
                log.exception("engine loop iteration failed")
                outputs = [(rid, EngineStepError(f"the engine failed: {type(e).__name__}: {e}")) for rid in live]
                for rid in list(live):
                    self._safe_abort(rid, "error")
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
                   ) -> tuple[bool, bool, list[tuple[str, RequestOutput | BaseException]], list[tuple[str, float]]]:
        """Apply the commands, run one step. Returns (busy, stepped, outputs, first-scheduled times)."""
        engine = self.engine
        outputs: list[tuple[str, RequestOutput | BaseException]] = []
        scheduled: list[tuple[str, float]] = []
        for cmd in commands:
            if isinstance(cmd, _Add):
                try:
                    engine.add_request(cmd.request_id, cmd.prompt, cmd.params, cmd.priority)
                except Exception as e:  # noqa: BLE001 - one bad request must not stop the loop
                    outputs.append((cmd.request_id, InvalidRequestError(str(e))))
                else:
                    live.add(cmd.request_id)
                    pending_schedule.add(cmd.request_id)
                    if cmd.meta is not None:
                        self._meta[cmd.request_id] = cmd.meta
            else:
                if cmd.request_id in live:
                    live.discard(cmd.request_id)
                    pending_schedule.discard(cmd.request_id)
                    self._safe_abort(cmd.request_id)
        stepped = False
        if live:
            t_step = time.monotonic()
            engine.last_scheduler_output = None
            try:
                step_outputs = engine.step()
            except Exception as e:  # noqa: BLE001 - the loop keeps serving
                self.num_failed_steps += 1
                failed = self._fail_step(e, live)
                outputs.extend((rid, EngineStepError(f"the model step failed: {type(e).__name__}: {e}"))
                               for rid in failed)
                live.difference_update(failed)
                pending_schedule.difference_update(failed)
                stepped = True
            else:
                self.num_steps += 1
                sched = getattr(engine, "last_scheduler_output", None)
                stepped = sched is None or not sched.is_empty
                if pending_schedule and sched is not None:
                    for s in sched.scheduled:
                        rid = s.request.request_id.split("#", 1)[0]
                        if rid in pending_schedule:
                            pending_schedule.discard(rid)
                            scheduled.append((rid, t_step))
                for out in step_outputs:
                    outputs.append((out.request_id, out))
                    if out.finished:
                        live.discard(out.request_id)
                        pending_schedule.discard(out.request_id)
                        self._done(out.request_id, out)
        self.stats = engine.stats()
        return bool(live), stepped, outputs, scheduled

    def _safe_abort(self, request_id: str, reason: str = "abort") -> None:
        out = None
        try:
            abort_output = getattr(self.engine, "abort_request_output", None)
            if abort_output is not None:
                out = abort_output(request_id, reason)
            else:
                self.engine.abort_request(request_id)
        except Exception:  # noqa: BLE001
            log.exception("aborting request %s failed", request_id)
        self._done(request_id, out)

    def _done(self, request_id: str, out: RequestOutput | None) -> None:
        """The request left the engine: tell the cost hook (engine thread)."""
        meta = self._meta.pop(request_id, None)
        if out is None or self.on_request_done is None:
            return
        try:
            self.on_request_done(out, meta)
        except Exception:  # noqa: BLE001 - accounting must not stop serving
            log.exception("the request-done hook failed for %s", request_id)

    def _fail_step(self, error: Exception, live: set[str]) -> list[str]:
        """After ``step()`` raised: abort the requests of that step, forget every block name."""
        sched = getattr(self.engine, "last_scheduler_output", None)
        if sched is not None:
            failed = [rid for rid in dict.fromkeys(s.request.request_id.split("#", 1)[0] for s in sched.scheduled)
                      if rid in live]
        else:  # it failed while scheduling: we cannot tell which requests were in it
            failed = list(live)
        log.error("engine step failed (%s: %s); failing the %d request(s) of that step", type(error).__name__, error,
                  len(failed), exc_info=error)
        for rid in failed:
            self._safe_abort(rid, "error")
        self.engine.kv_cache.reset_prefix_cache()
        return failed
