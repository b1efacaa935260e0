"""A request's bill has one door: `Billing.close`, called once when the request leaves the engine.

    engine thread: AsyncEngine.on_request_done = billing.close
        close(final output, RequestMeta) -> Bill      dollars from the price basis (the only place a
                                                      request's $ is computed), the live totals
                                                      (CostBook: /v1/cost, /metrics), the ledger row
    event loop: the response handler, once
        await billing.settle(bill) -> usage fields    waits (briefly) until the row is committed, so
                                                      an answered request is on disk; returns
                                                      {"cost": usd, "cost_details": {...}}

``usage.cost`` is a number in USD, the convention OpenAI-compatible clients already read
(OpenRouter's; LiteLLM types it as a float); the breakdown is ``usage.cost_details``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from leanserve.cost.accounting import CostBook
from leanserve.cost.basis import PriceBasis
from leanserve.cost.ledger import Ledger, LedgerRecord
from leanserve.cost.meter import CostMeter
from leanserve.types import RequestOutput

LEDGER_WAIT_S = 5.0  # how long a response waits for its ledger row to be committed

log = logging.getLogger("leanserve.cost")


@dataclass(frozen=True)
class RequestMeta:
    """What the server knows of a request when it arrives, for its ledger row."""

    arrival: float  # time.monotonic()
    key_id: str | None = None  # leanserve.cost.ledger.key_id of its API key
    prompt_text: str | None = None  # only when the ledger stores text
    cache: str | None = None  # the response cache's verdict (miss, bypass) when it was looked up
    route: str | None = None  # the cascade that sent it here
    batch_id: str | None = None  # a batch line: its batch


@dataclass(frozen=True)
class Bill:
    request_id: str
    machine_seconds: float  # engine time charged to the request (leanserve.cost.meter)
    prefill_seconds: float  # of which its prompt tokens' share
    usd: float
    input_usd: float
    output_usd: float
    price_per_hour: float
    hardware: str
    saved_prefix_usd: float = 0.0
    committed: concurrent.futures.Future | None = field(default=None, compare=False, repr=False)

    def usage(self) -> dict[str, Any]:
        """The fields this bill adds to a response's ``usage``."""
        return {"cost": self.usd,
                "cost_details": {"machine_seconds": self.machine_seconds, "input_usd": self.input_usd,
                                 "output_usd": self.output_usd, "price_per_hour": self.price_per_hour,
                                 "hardware": self.hardware, **receipt(prefix_cache=self.saved_prefix_usd)}}


def receipt(prefix_cache: float = 0.0, response_cache: float = 0.0, routing: float = 0.0) -> dict[str, Any]:
    """``usage.cost_details`` fields saying what each lever saved against the same request without it
    (USD; negative when a lever cost more, as a cascade that escalated)."""
    return {"saved_usd": prefix_cache + response_cache + routing,
            "saved": {"prefix_cache": prefix_cache, "response_cache": response_cache, "routing": routing}}


def prefix_saving(input_usd: float, prompt_tokens: int, cached_tokens: int) -> float:
    """What the cached prompt tokens would have cost: the prompt's computed tokens' mean price times
    the cached ones (an estimate: a token's prefill cost grows a little with its position)."""
    computed = prompt_tokens - cached_tokens
    return input_usd / computed * cached_tokens if computed > 0 and cached_tokens > 0 else 0.0


class Billing:
    """Thread-safe: ``close()`` on the engine thread, ``settle()`` and ``report()`` on the event loop."""

    def __init__(self, basis: PriceBasis, meter: CostMeter, model: str, num_params: int = 0, weight_bytes: int = 0,
                 dtype: str = "float32", ledger: Ledger | None = None, batch_price_factor: float = 1.0) -> None:
        self.basis = basis
        self.batch_price_factor = batch_price_factor  # batch lines' machine time at this share of the price
        self.model = model
        self.ledger = ledger
        self.book = CostBook(basis, meter, num_params, weight_bytes, dtype)

    @property
    def stores_text(self) -> bool:
        return self.ledger is not None and self.ledger.store_text

    def close(self, out: RequestOutput, meta: RequestMeta | None) -> Bill:
        """The request left the engine (finished, aborted or failed): bill it and queue its ledger row."""
        ms = out.machine_seconds
        pre = min(out.prefill_seconds, ms)
        usd, input_usd = self.basis.usd(ms), self.basis.usd(pre)
        if meta is not None and meta.batch_id is not None:
            usd, input_usd = usd * self.batch_price_factor, input_usd * self.batch_price_factor
        saved_prefix = prefix_saving(input_usd, out.num_prompt_tokens, out.num_cached_tokens)
        reasons = [c.finish_reason for c in out.outputs]
        finish = next((r for r in ("error", "abort") if r in reasons), None) or (reasons[0] if reasons else None)
        output_text = None
        if self.stores_text:
            texts = [c.text for c in out.outputs]
            output_text = texts[0] if len(texts) == 1 else json.dumps(texts, ensure_ascii=False)
        rec = LedgerRecord(
            id=out.request_id, ts=time.time(), key_id=meta.key_id if meta else None, model=self.model,
            prompt_tokens=out.num_prompt_tokens, cached_tokens=out.num_cached_tokens,
            output_tokens=out.num_generated_tokens, machine_seconds=ms, prefill_seconds=pre, cost_usd=usd,
            price_per_hour=self.basis.price_per_hour, hardware=self.basis.hardware.name,
            latency_s=time.monotonic() - meta.arrival if meta else None,
            finish_reason=finish or (out.error and "error") or "abort",
            prompt_text=meta.prompt_text if meta else None, output_text=output_text, input_usd=input_usd,
            cache=meta.cache if meta else None, route=meta.route if meta else None, saved_prefix_usd=saved_prefix,
            batch_id=meta.batch_id if meta else None)
        committed = self.record(rec)
        return Bill(out.request_id, ms, pre, usd, input_usd, max(0.0, usd - input_usd), self.basis.price_per_hour,
                    self.basis.hardware.name, saved_prefix, committed)

    def record(self, rec: LedgerRecord) -> concurrent.futures.Future | None:
        """Count a row in the live totals and queue it for the ledger (also for what never reached the
        engine: a response-cache hit, an upstream's answer)."""
        self.book.bill(rec)
        return self.ledger.record(rec) if self.ledger is not None else None

    async def settle(self, bill: Bill | None) -> dict[str, Any]:
        """Once per response: wait (at most LEDGER_WAIT_S) for the bill's ledger row; its usage fields."""
        if bill is None:
            return {}
        if bill.committed is not None:
            try:
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(bill.committed)), LEDGER_WAIT_S)
            except Exception as e:  # noqa: BLE001 - the writer logged it; answer anyway
                log.warning("ledger row of %s not confirmed: %s", bill.request_id, e)
        return bill.usage()

    def report(self, window: float | None) -> dict[str, Any]:
        """GET /v1/cost: the figures since start and over the last ``window`` seconds."""
        return {"object": "cost", "model": self.model, "basis": self.book.basis_dict(),
                "since_start": self.book.report(None), "window": self.book.report(window)}
