"""Token-budget continuous batching with chunked prefill, prefix caching and preemption. No torch.

Every step hands out at most ``max_num_batched_tokens`` tokens to at most ``max_num_seqs``
running requests. Requests are served in priority order, class by class:

    INTERACTIVE running -> INTERACTIVE waiting -> BATCH running -> BATCH waiting

A step that carries INTERACTIVE work carries at most ``max_batch_seqs_beside_interactive`` BATCH
sequences (the others keep their seats and blocks and wait a step): on a CPU a step's time grows
with its rows, so batch rows beside interactive ones slow every interactive token; alone, batch
work fills the step.

Within a class, running requests go first (decodes and unfinished prefill chunks never stall
behind new prompts) and everything is FCFS by arrival. Putting INTERACTIVE admissions ahead of
BATCH decodes is what lets an INTERACTIVE request preempt BATCH ones safely: a preemption victim
is never a request already scheduled this step, whose blocks other requests may have hit.

Preemption is by recompute: the victim's blocks are freed (still findable in the prefix cache)
and it starts again from 0, usually recovering most of its KV as a cache hit.
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from typing import TYPE_CHECKING

from leanserve.config import SchedulerConfig
from leanserve.types import Priority, Request, RequestStatus, ScheduledRequest, SchedulerOutput

if TYPE_CHECKING:  # only leanserve.types and leanserve.config are runtime dependencies
    from leanserve.engine.kv_cache import KVCacheManager


class Scheduler:
    def __init__(self, scheduler_config: SchedulerConfig, kv_cache: KVCacheManager) -> None:
        capacity = kv_cache.num_blocks * kv_cache.block_size
        if scheduler_config.max_model_len > capacity:
            # A sequence allowed to grow past the cache could never be scheduled again, even alone.
            raise ValueError(
                f"max_model_len ({scheduler_config.max_model_len}) exceeds the KV cache capacity "
                f"({kv_cache.num_blocks} blocks x {kv_cache.block_size} = {capacity} tokens)"
            )
        self.config = scheduler_config
        self.kv_cache = kv_cache
        self._requests: dict[str, Request] = {}
        self._running: list[Request] = []  # sorted by _key
        self._waiting: dict[Priority, deque[Request]] = {p: deque() for p in Priority}
        self._seq: dict[str, int] = {}  # add order, breaks arrival_time ties
        self._counter = itertools.count()
        self.num_preemptions_total = 0

    # ---- requests ------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a new request. ValueError if it is a duplicate or could never be scheduled."""
        rid = request.request_id
        if rid in self._requests:
            raise ValueError(f"request {rid!r} is already in the scheduler")
        if request.status is not RequestStatus.WAITING or request.num_computed_tokens != 0:
            raise ValueError(f"request {rid!r} must be new (WAITING, nothing computed), got {request.status.name}")
        n = request.num_tokens
        if n == 0:
            raise ValueError(f"request {rid!r} has an empty prompt")
        if n > self.config.max_model_len:  # the constructor made sure max_model_len fits the KV cache
            raise ValueError(f"request {rid!r} has {n} prompt tokens, more than max_model_len ({self.config.max_model_len})")
        self._requests[rid] = request
        self._seq[rid] = next(self._counter)
        self._waiting[request.priority].append(request)

    def abort_request(self, request_id: str) -> bool:
        """Abort a waiting, running or preempted request; False if it is not here."""
        return self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def finish_request(self, request_id: str, status: RequestStatus) -> bool:
        """Remove a request for good and free its blocks; False if it is not here."""
        if not status.finished:
            raise ValueError(f"finish_request needs a finished status, got {status.name}")
        request = self._requests.pop(request_id, None)
        if request is None:
            return False
        del self._seq[request_id]
        if request.status is RequestStatus.RUNNING:
            self._running.remove(request)
        else:
            self._waiting[request.priority].remove(request)
        self.kv_cache.free(request_id)
        request.status = status
        return True

    def get_request(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    @property
    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def running(self) -> list[Request]:
        """The running requests, in service order (a copy)."""
        return list(self._running)

    @property
    def num_waiting(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    # ---- one step ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        step = _Step(self.config.max_num_batched_tokens)
        for priority in Priority:  # INTERACTIVE, then BATCH
            cap = self.config.max_batch_seqs_beside_interactive
            step.seats = cap if priority is Priority.BATCH and cap is not None and step.scheduled else None
            self._schedule_running(step, priority)
            self._schedule_waiting(step, priority)
        scheduled = list(step.scheduled.values())
        return SchedulerOutput(
            scheduled=scheduled,
            preempted_ids=step.preempted_ids,
            num_batched_tokens=sum(s.num_new_tokens for s in scheduled),
        )

    def update(self, scheduler_output: SchedulerOutput, sampled: dict[str, int],
               accepted: dict[str, list[int]] | None = None) -> list[Request]:
        """Apply a finished step: advance each chunk, append sampled tokens.

        A request that verified drafts gets its ``accepted`` ones (a prefix of its drafts) and then
        the sampled token; its computed tokens cover only the accepted drafts, so the rejected
        ones' KV slots are written over later. Returns the requests that got tokens, for the
        engine's stop checks. Requests finished or aborted since ``schedule`` are skipped. Note
        ``ScheduledRequest.samples`` reads live state: it is only meaningful until this call.
        """
        accepted = accepted or {}
        live = [s for s in scheduler_output.scheduled if self._requests.get(s.request.request_id) is s.request]
        for s in live:
            if s.samples and s.request.request_id not in sampled:
                raise ValueError(f"request {s.request.request_id!r} finished its chunk but no token was sampled for it")
        got_token: list[Request] = []
        for s in live:
            request = s.request
            samples = s.samples  # read before num_computed_tokens moves
            drafts = s.spec_token_ids
            took = accepted.get(request.request_id, []) if drafts else []
            if took != drafts[:len(took)]:
                raise ValueError(f"request {request.request_id!r}: accepted tokens are not a prefix of its drafts")
            request.num_computed_tokens += s.num_new_tokens - (len(drafts) - len(took))
            request.spec_token_ids, request.spec_draft_probs = [], None
            if samples:
                request.output_token_ids += took
                request.output_token_ids.append(sampled[request.request_id])
                got_token.append(request)
        return got_token

    def check_integrity(self) -> None:
        """Assert the scheduler's and the KV cache's invariants (call between steps)."""
        self.kv_cache.check_integrity()
        waiting = [r for q in self._waiting.values() for r in q]
        ids = [r.request_id for r in self._running + waiting]
        assert len(ids) == len(set(ids)), f"a request is queued twice: {sorted(ids)}"
        assert set(ids) == set(self._requests), "queues and the request map disagree"
        assert set(self._seq) == set(self._requests), "add-order map and the request map disagree"
        assert len(self._running) <= self.config.max_num_seqs, f"{len(self._running)} running > max_num_seqs"
        assert self._running == sorted(self._running, key=self._key), "running requests are out of priority order"
        for r in self._running:
            assert r.status is RequestStatus.RUNNING, f"request {r.request_id} is in the running list as {r.status.name}"
            assert 0 <= r.num_computed_tokens < r.num_tokens, (
                f"running request {r.request_id}: {r.num_computed_tokens} computed of {r.num_tokens}"
            )
            blocks = self.kv_cache.get_block_ids(r.request_id)
            assert len(blocks) * self.kv_cache.block_size >= r.num_computed_tokens, (
                f"running request {r.request_id}: {len(blocks)} blocks for {r.num_computed_tokens} computed tokens"
            )
        for priority, queue in self._waiting.items():
            for r in queue:
                assert r.priority is priority, f"request {r.request_id} is queued in the wrong class"
                assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED), (
                    f"request {r.request_id} is waiting as {r.status.name}"
                )
                assert r.num_computed_tokens == 0, f"waiting request {r.request_id} has computed tokens"
        held = set(self.kv_cache.request_ids())
        assert held == {r.request_id for r in self._running}, (
            f"block tables held by {sorted(held)}, running: {sorted(r.request_id for r in self._running)}"
        )

    # ---- internals -----------------------------------------------------------------------

    def _key(self, request: Request) -> tuple[int, float, int]:
        return (request.priority, request.arrival_time, self._seq[request.request_id])

    def _schedule_running(self, step: _Step, priority: Priority) -> None:
        for request in [r for r in self._running if r.priority == priority]:
            if step.budget == 0 or step.seats == 0:
                return
            if request.status is not RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            num_real = request.num_tokens - request.num_computed_tokens
            num_new = min(num_real + len(request.spec_token_ids), step.budget)
            if num_new <= 0:
                continue
            while (block_ids := self.kv_cache.allocate_slots(request, num_new)) is None:
                # The latest running request goes first. Requests are served in this same order, so
                # it is this one or one not scheduled yet: nobody has hit its blocks this step.
                victim = self._running[-1]
                assert victim.request_id not in step.scheduled, "would preempt a request scheduled this step"
                self._preempt(victim, step)
                if victim is request:
                    break
            if block_ids is not None:  # drafts past the budget wait for a later proposal
                step.add(ScheduledRequest(request, num_new, block_ids, request.spec_token_ids[:max(0, num_new - num_real)]))

    def _schedule_waiting(self, step: _Step, priority: Priority) -> None:
        queue = self._waiting[priority]
        while queue and step.admitting:
            request = queue[0]
            # A request preempted this step stays out until the next one; it is at the head of
            # its class, so FCFS stops the admissions behind it too.
            if step.budget == 0 or step.seats == 0 or request.request_id in step.preempted_ids:
                step.admitting = False
                return
            if len(self._running) >= self.config.max_num_seqs:
                if not self._preempt_batch_for(request, step):
                    step.admitting = False
                    return
                continue  # a seat was freed; look again
            while True:
                computed, num_cached = self.kv_cache.get_computed_blocks(request)
                num_new = request.num_tokens - num_cached
                if num_new > step.budget:
                    if not self.config.enable_chunked_prefill:
                        step.admitting = False
                        return
                    num_new = step.budget
                block_ids = self.kv_cache.allocate_slots(request, num_new, computed)
                if block_ids is not None:
                    break
                if not self._preempt_batch_for(request, step):
                    step.admitting = False
                    return
            queue.popleft()
            request.status = RequestStatus.RUNNING
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_cached
            request.num_computed_tokens = num_cached
            bisect.insort(self._running, request, key=self._key)
            step.add(ScheduledRequest(request, num_new, block_ids))

    def _preempt_batch_for(self, request: Request, step: _Step) -> bool:
        """Make room for an INTERACTIVE admission by preempting the latest running BATCH request."""
        if request.priority is not Priority.INTERACTIVE:
            return False
        if not self._running or self._running[-1].priority is not Priority.BATCH:
            return False
        victim = self._running[-1]  # BATCH sorts last
        assert victim.request_id not in step.scheduled, "BATCH requests are scheduled after INTERACTIVE admissions"
        self._preempt(victim, step)
        return True

    def _preempt(self, request: Request, step: _Step) -> None:
        # free() reads num_computed_tokens to tell written blocks from promised ones: reset after.
        self.kv_cache.free(request.request_id)
        request.num_computed_tokens = 0
        request.spec_token_ids, request.spec_draft_probs = [], None
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions_total += 1
        self._running.remove(request)
        self._waiting[request.priority].appendleft(request)
        step.preempted_ids.append(request.request_id)


class _Step:
    """What one ``schedule`` call has decided so far."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.scheduled: dict[str, ScheduledRequest] = {}
        self.preempted_ids: list[str] = []
        self.admitting = True  # FCFS: once a waiting request cannot start, nothing behind it may
        self.seats: int | None = None  # sequences the class being scheduled may still add; None: any

    def add(self, s: ScheduledRequest) -> None:
        self.scheduled[s.request.request_id] = s
        self.budget -= s.num_new_tokens
        if self.seats is not None:
            self.seats -= 1
