"""Replay a workload through the engine's scheduling policy with step times from the roofline.

The policy is engine/scheduler.py's, in aggregate: every step hands out at most
``max_num_batched_tokens`` tokens to at most ``max_num_seqs`` sequences; decoding sequences get one
token each first, prompts in progress then take what is left in arrival order (chunked prefill),
then waiting requests are admitted first come, first served, while seats, budget and KV cache
blocks last. A prompt's prefix-cache hit skips its cached tokens. When the KV cache runs out, the
newest decoding sequence is preempted and recomputed later (as the engine does). Its first token
comes with the step that computes the prompt's last token; each later token takes one step.

The step's time comes from ``roofline.step_time``; nothing here measures anything, so a run is
deterministic given its seed. No torch.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from leanserve.plan.roofline import Efficiency, Machine, ModelShape, Precision, Step, step_time, step_work


@dataclass(frozen=True)
class Limits:
    """The engine's batch limits and KV cache size for a simulated instance."""

    max_num_seqs: int = 128
    max_num_batched_tokens: int = 512
    kv_cache_tokens: int = 1 << 20
    block_size: int = 16

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "kv_cache_tokens", "block_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")


@dataclass
class SimRequest:
    arrival: float
    prompt: int
    output: int
    cached: int = 0  # prompt tokens found in the prefix cache on admission
    first_token: float | None = None
    finish: float | None = None
    preemptions: int = 0

    @property
    def ttft(self) -> float:
        assert self.first_token is not None
        return self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        if self.output <= 1 or self.finish is None or self.first_token is None:
            return None
        return (self.finish - self.first_token) / (self.output - 1)


@dataclass
class _Seq:
    req: SimRequest
    key: tuple[float, int]  # (arrival, admission number): the scheduler's order of running sequences
    ctx: int = 0  # tokens whose K and V are in the cache
    blocks: int = 0  # KV cache blocks held
    produced: int = 0  # output tokens sampled so far (kept across a preemption)

    @property
    def known(self) -> int:
        """Tokens the next forward passes must cover: the prompt and every token sampled so far."""
        return self.req.prompt + self.produced


@dataclass
class SimResult:
    requests: list[SimRequest]
    duration_s: float
    busy_s: float
    steps: int
    mean_batch: float  # sequences per step
    preemptions: int
    truncated: bool = False  # stopped at max_steps: the load was more than the instance could take

    @property
    def output_tokens(self) -> int:
        return sum(r.output for r in self.requests if r.finish is not None)

    @property
    def total_tokens(self) -> int:
        return sum(r.output + r.prompt for r in self.requests if r.finish is not None)

    def summary(self, percentiles: Sequence[float] = (50, 90, 99)) -> dict[str, Any]:
        done = [r for r in self.requests if r.finish is not None]
        ttft = [r.ttft for r in done]
        tpot = [t for t in (r.tpot for r in done) if t is not None]
        e2el = [r.finish - r.arrival for r in done]  # type: ignore[operator]
        d = max(self.duration_s, 1e-12)
        out: dict[str, Any] = {
            "completed": len(done),
            "duration_s": self.duration_s,
            "request_throughput": len(done) / d,
            "output_throughput": self.output_tokens / d,
            "total_token_throughput": self.total_tokens / d,
            "utilization": self.busy_s / d,
            "mean_batch": self.mean_batch,
            "preemptions": self.preemptions,
            "truncated": self.truncated,
        }
        for name, values in (("ttft", ttft), ("tpot", tpot), ("e2el", e2el)):
            out[f"mean_{name}_ms"] = 1e3 * sum(values) / len(values) if values else None
            for p in percentiles:
                key = "median" if p == 50 else f"p{p:g}"
                out[f"{key}_{name}_ms"] = 1e3 * percentile(values, p) if values else None
        return out


def percentile(values: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); ValueError when empty."""
    if not values:
        raise ValueError("percentile of no values")
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


StepTimer = Callable[[Step], float]


def roofline_timer(shape: ModelShape, precision: Precision, machine: Machine, eff: Efficiency) -> StepTimer:
    def timer(step: Step) -> float:
        return step_time(step_work(shape, step, precision), step.num_seqs, machine, eff, precision.compute_dtype)
    return timer


def simulate(shape: ModelShape, timer: StepTimer, limits: Limits, requests: list[SimRequest],
             concurrency: int | None = None, max_steps: int = 1_000_000) -> SimResult:
    """Run ``requests`` through the policy. Open loop (``concurrency`` None): each arrives at its own
    ``arrival`` (sorted). Closed loop: ``concurrency`` clients, each sending its next request the
    moment its previous one ends (the ``arrival`` fields are overwritten)."""
    groups = shape.window_groups()
    windows = [w for w, _ in groups]
    bs = limits.block_size
    total_blocks = limits.kv_cache_tokens // bs
    if concurrency is not None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        for i, r in enumerate(requests):
            r.arrival = 0.0 if i < concurrency else math.inf
    # not arrived yet, in arrival order; closed loop: the clients' next requests wait in to_send
    pending = deque(sorted((r for r in requests if r.arrival != math.inf), key=lambda r: r.arrival))
    to_send = deque(r for r in requests if r.arrival == math.inf)
    waiting: deque[_Seq] = deque()
    running: list[_Seq] = []
    admitted = 0
    now = busy = 0.0
    steps = batch_sum = preemptions = 0
    free = total_blocks

    def grow(seq: _Seq, n: int) -> bool:
        nonlocal free
        need = -(-(seq.ctx + n) // bs) - seq.blocks
        if need > free:
            return False
        free -= need
        seq.blocks += need
        return True

    def drop(seq: _Seq) -> None:
        nonlocal free
        free += seq.blocks
        seq.blocks = 0
        running.remove(seq)

    while True:
        while pending and pending[0].arrival <= now:
            r = pending.popleft()
            waiting.append(_Seq(r, (r.arrival, admitted)))
            admitted += 1
        if not (waiting or running):
            if not pending:
                break
            now = max(now, pending[0].arrival)
            continue
        if steps >= max_steps:
            return _result(requests, now, busy, steps, batch_sum, preemptions, truncated=True)
        budget = limits.max_num_batched_tokens
        scheduled: list[tuple[_Seq, int]] = []
        preempted: set[int] = set()
        for seq in list(running):
            if budget == 0:
                break
            if id(seq) in preempted:  # preempted earlier in this loop
                continue
            n = min(seq.known - seq.ctx, budget)
            while not grow(seq, n):  # the newest running sequence makes room (it may be this one)
                victim = running[-1]
                drop(victim)
                victim.ctx = 0
                victim.req.preemptions += 1
                preemptions += 1
                preempted.add(id(victim))
                waiting.appendleft(victim)
                if victim is seq:
                    break
            if id(seq) not in preempted:
                scheduled.append((seq, n))
                budget -= n
        while waiting and budget > 0 and len(running) < limits.max_num_seqs and id(waiting[0]) not in preempted:
            seq = waiting[0]
            if seq.req.preemptions == 0:  # a prefix-cache hit skips whole cached blocks
                seq.ctx = min((seq.req.cached // bs) * bs, (seq.known - 1) // bs * bs)
            n = min(seq.known - seq.ctx, budget)
            if not grow(seq, n):
                seq.ctx = 0
                break
            waiting.popleft()
            bisect.insort(running, seq, key=lambda s: s.key)
            scheduled.append((seq, n))
            budget -= n
        if not scheduled:
            if running or not waiting:  # cannot happen: something runs or waits for a seat
                raise RuntimeError("simulation made no progress")
            seq = waiting.popleft()  # a prompt larger than the whole KV cache never runs
            seq.req.first_token = seq.req.finish = None
            continue
        num_decode = 0
        kv = [0] * len(windows)
        prefill: list[tuple[int, int, bool]] = []
        for seq, n in scheduled:
            if n == 1 and seq.ctx >= seq.req.prompt:
                num_decode += 1
                c = seq.ctx + 1
                for g, w in enumerate(windows):
                    kv[g] += c if w is None or c < w else w
            else:
                prefill.append((seq.ctx, n, seq.ctx + n == seq.known))
        dt = timer(Step(num_decode, tuple(kv), tuple(prefill)))
        now += dt
        busy += dt
        steps += 1
        batch_sum += len(scheduled)
        for seq, n in scheduled:
            seq.ctx += n
            if seq.ctx < seq.known:
                continue
            seq.produced += 1
            if seq.req.first_token is None:
                seq.req.first_token = now
            if seq.produced >= seq.req.output:
                seq.req.finish = now
                drop(seq)
                if to_send:
                    nxt = to_send.popleft()
                    nxt.arrival = now
                    pending.append(nxt)
    return _result(requests, now, busy, steps, batch_sum, preemptions)


def _result(requests: list[SimRequest], now: float, busy: float, steps: int, batch_sum: int, preemptions: int,
            truncated: bool = False) -> SimResult:
    start = min((r.arrival for r in requests), default=0.0)
    return SimResult(requests, now - (0.0 if start == math.inf else start), busy, steps, batch_sum / max(steps, 1),
                     preemptions, truncated)
