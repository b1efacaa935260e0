"""The batch runner: a task in the server's event loop that works through every active batch's
pending lines, a few at a time, in the engine's batch priority class (docs/batch.md).

    while the server runs:
        for each batch in progress (oldest first; after a restart too, from the store):
            cancelling or past its window  -> no new lines; finalize once its lines in flight end
            no line pending or in flight   -> finalize: output and error files, status completed
            else                           -> start pending lines while fewer than max_in_flight run

A line is the request its body describes, sent through the gateway like an HTTP request (routes,
the response cache, bills) with priority "batch", so interactive requests go first and preempt
it; in the last fifth of its window a batch's lines run as interactive, so it finishes in time. A
line's result is written to the store (one transaction) the moment it ends, so a restart redoes
only the lines that were in flight. A line refused for lack of room (429) stays pending and is
tried again; any other error is the line's own and goes to the error file.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from leanserve.batch.store import BatchStore, Line
from leanserve.gateway.router import Gateway, Tags
from leanserve.serve.errors import APIError
from leanserve.serve.protocol import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("leanserve.batch")

DEFAULT_MAX_IN_FLIGHT = 8
RAISE_AFTER = 0.8  # the share of a batch's window after which its lines run as interactive
POLL_S = 0.25
RETRY_S = 1.0  # a line refused for room (429) waits this long before it is tried again

REQUEST_MODELS = {"/v1/chat/completions": ("chat", ChatCompletionRequest),
                  "/v1/completions": ("completions", CompletionRequest)}


class BatchRunner:
    def __init__(self, store: BatchStore, gateway: Gateway, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
                 clock: Callable[[], float] = time.time) -> None:
        if max_in_flight < 1:
            raise ValueError(f"batch max in flight must be >= 1, got {max_in_flight}")
        self.store = store
        self.gateway = gateway
        self.max_in_flight = max_in_flight
        self.clock = clock
        self.running: dict[tuple[str, int], asyncio.Task] = {}  # (batch id, line index) -> its task
        self.wake = asyncio.Event()
        self.lines_done = 0

    def poke(self) -> None:
        """A batch was created or cancelled: look now."""
        self.wake.set()

    async def run(self) -> None:
        """Until cancelled (the server's shutdown): lines in flight are then cancelled and stay pending."""
        try:
            while True:
                self.wake.clear()
                try:
                    await self._tick()
                except Exception:  # noqa: BLE001 - one bad batch must not stop the others
                    log.exception("batch runner step failed")
                try:
                    await asyncio.wait_for(self.wake.wait(), POLL_S)
                except asyncio.TimeoutError:
                    pass
        finally:
            for task in self.running.values():
                task.cancel()
            if self.running:
                await asyncio.gather(*self.running.values(), return_exceptions=True)

    async def _tick(self) -> None:
        for bid in self.store.active_batches():
            row = self.store.batch_row(bid)
            mine = [k for k in self.running if k[0] == bid]
            now = self.clock()
            stopping = row["status"] == "cancelling" or row["finalizing"] or now >= row["expires_at"]
            if stopping:
                if not mine:
                    self._finalize(bid)
                continue
            room = self.max_in_flight - len(self.running)
            if room <= 0:
                continue
            pending = [ln for ln in self.store.pending_lines(bid, room + len(mine)) if (bid, ln.index) not in self.running]
            if not pending and not mine:
                self._finalize(bid)
                continue
            late = now >= row["created_at"] + RAISE_AFTER * (row["expires_at"] - row["created_at"])
            for line in pending[:room]:
                task = asyncio.ensure_future(self._run_line(row, line, "interactive" if late else "batch"))
                self.running[(bid, line.index)] = task
                task.add_done_callback(lambda _t, k=(bid, line.index): self._done(k))

    def _finalize(self, bid: str) -> None:
        try:
            self.store.finalize(bid)
        except ValueError as e:  # a line turned pending again meanwhile (a 429 retry): next time
            log.debug("batch %s not finalized yet: %s", bid, e)

    def _done(self, key: tuple[str, int]) -> None:
        self.running.pop(key, None)
        self.wake.set()

    async def _run_line(self, row: dict[str, Any], line: Line, priority: str) -> None:
        bid = line.batch_id
        endpoint, model_cls = REQUEST_MODELS[row["endpoint"]]
        raw = {**(line.body or {}), "priority": priority, "stream": False}
        raw.pop("stream_options", None)
        try:
            body = model_cls.model_validate(raw)
        except ValidationError as e:
            first = e.errors()[0] if e.errors() else {"msg": str(e), "loc": ()}
            where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
            message = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
            self.store.finish_line(bid, line.index, None, {"code": "invalid_request", "message": message}, 400)
            return
        try:
            resp = await self.gateway.complete_internal(endpoint, body, raw, Tags(batch_id=bid, key_id=row["owner"]))
        except APIError as e:
            if e.status in (429, 503):  # no room now: the line stays pending and is tried again
                await asyncio.sleep(RETRY_S)
                return
            self.store.finish_line(bid, line.index, {"error": e.body()["error"]},
                                   {"code": e.code or e.type, "message": e.message}, e.status)
            return
        usage = resp.get("usage") or {}
        cost = usage.get("cost")
        self.store.finish_line(bid, line.index, resp, None, 200, usd=float(cost) if isinstance(cost, (int, float)) else 0.0,
                               usage=usage)
        self.lines_done += 1
