"""The price basis (--hardware / --price-per-hour) and the live figures built on it."""

from __future__ import annotations

import pytest

from leanserve.cost.accounting import CostBook
from leanserve.cost.basis import DEFAULT_HARDWARE, resolve_price_basis
from leanserve.cost.catalog import get_hardware
from leanserve.cost.ledger import LedgerRecord
from leanserve.cost.meter import CostMeter
from leanserve.cost.billing import Billing
from leanserve.types import RequestOutput


def test_default_basis_is_cpu_local_with_a_labelled_default_price():
    b = resolve_price_basis(device="cpu")
    assert b.hardware.name == DEFAULT_HARDWARE and b.default_price
    assert b.price_per_hour == get_hardware(DEFAULT_HARDWARE).price_per_hour_usd
    assert "DEFAULT" in b.describe() and "--price-per-hour" in b.describe()
    assert b.hardware.as_of in b.price_source


def test_hardware_gives_catalog_price_and_peaks_and_a_price_overrides_only_the_price():
    l4 = resolve_price_basis("L4")
    assert l4.hardware.name == "l4" and l4.price_per_hour == get_hardware("l4").price_per_hour_usd
    assert not l4.default_price and "DEFAULT" not in l4.describe()
    mine = resolve_price_basis("l4", 0.5)
    assert mine.price_per_hour == 0.5 and mine.hardware.peak_memory_bandwidth_gbps == 300
    assert mine.price_source.startswith("--price-per-hour")
    cpu = resolve_price_basis(None, 0.2, device="cpu")
    assert cpu.hardware.name == DEFAULT_HARDWARE and not cpu.default_price
    assert cpu.usd(3600) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="unknown hardware"):
        resolve_price_basis("tpu-v99")
    with pytest.raises(ValueError):
        resolve_price_basis(None, -1.0)


def test_usage_cost_splits_input_and_output():
    out = RequestOutput("r", [1, 2, 3], [], machine_seconds=2.0, prefill_seconds=0.5)
    bill = Billing(resolve_price_basis(None, 3.6, device="cpu"), CostMeter(), "m").close(out, None)
    assert bill.usage() == {"cost": pytest.approx(0.002), "cost_details": {
        "machine_seconds": 2.0, "price_per_hour": 3.6, "hardware": "cpu-local", "input_usd": pytest.approx(0.0005),
        "output_usd": pytest.approx(0.0015), "saved_usd": 0.0,
        "saved": {"prefix_cache": 0.0, "response_cache": 0.0, "routing": 0.0}}}


def test_prefix_cache_receipt_prices_cached_tokens_like_computed_ones():
    # 8 prompt tokens, 6 of them from the prefix cache: the 2 computed cost 0.5 s of prefill = $0.0005 at $3.6/h,
    # so the 6 cached ones saved 3 x that
    out = RequestOutput("r", list(range(8)), [], machine_seconds=2.0, prefill_seconds=0.5, num_cached_tokens=6)
    bill = Billing(resolve_price_basis(None, 3.6, device="cpu"), CostMeter(), "m").close(out, None)
    details = bill.usage()["cost_details"]
    assert details["saved_usd"] == pytest.approx(0.0015) and details["saved"]["prefix_cache"] == pytest.approx(0.0015)


def _rec(rid: str, secs: float, prefill: float, prompt: int, out: int, basis) -> LedgerRecord:
    return LedgerRecord(rid, 0.0, None, "m", prompt, 0, out, secs, prefill, basis.usd(secs), basis.price_per_hour,
                        basis.hardware.name, 1.0, "stop")


def test_cost_book_figures():
    t = [1000.0]
    clock = lambda: t[0]  # noqa: E731
    meter = CostMeter(clock)
    basis = resolve_price_basis("l4", 3.6)
    book = CostBook(basis, meter, num_params=1_000_000, weight_bytes=4_000_000, dtype="float32", clock=clock)
    meter.record_step(1.0, {"a": 10}, {"a": 10})
    meter.record_step(1.0, {"a": 10})
    t[0] += 4.0
    book.bill(_rec("a", 2.0, 1.0, 10, 10, basis))
    r = book.report()
    assert r["busy_seconds"] == 2.0 and r["idle_seconds"] == pytest.approx(2.0) and r["utilization"] == 0.5
    assert r["usd"] == pytest.approx(0.002) and r["machine_usd"] == pytest.approx(0.002)
    assert r["input_usd"] == pytest.approx(0.001) and r["output_usd"] == pytest.approx(0.001)
    assert r["usd_per_million_tokens"] == {"input": pytest.approx(100.0), "output": pytest.approx(100.0),
                                           "total": pytest.approx(100.0)}
    assert r["achieved"]["flops_per_second"] == pytest.approx(2 * 1e6 * 20 / 2.0)
    assert r["achieved"]["flops_fraction_of_peak"] == pytest.approx(2e7 / 30.3e12)
    assert r["achieved"]["weight_bytes_per_second"] == pytest.approx(4e6 * 2 / 2.0)
    assert r["achieved"]["bandwidth_fraction_of_peak"] == pytest.approx(4e6 / 300e9)
    t[0] += 120  # both the steps and the bill fall out of a 60 s window
    w = book.report(60)
    assert w["requests"] == 0 and w["busy_seconds"] == 0 and w["usd_per_million_tokens"]["total"] is None
    assert w["achieved"]["flops_per_second"] is None
