"""The hardware price catalog: every entry complete, lookups, and the $/Mtok formula."""

from __future__ import annotations

import datetime as dt
import json
import re
from importlib import resources

import pytest

from leanserve.cost.catalog import cost_per_million_tokens, get_hardware, load_catalog

REQUIRED_PRESETS = {"h100-sxm", "h200", "a100-80gb", "l4", "l40s", "tpu-v5e", "tpu-v6e", "cpu-local"}


def test_catalog_has_the_required_presets_and_cpu_instances():
    names = set(load_catalog())
    assert REQUIRED_PRESETS <= names
    assert {"aws-c7i.large", "aws-c7i.xlarge", "aws-m7i.large"} <= names


def test_every_entry_has_price_bandwidth_flops_source_and_date():
    for name, hw in load_catalog().items():
        assert hw.price_per_hour_usd > 0, name
        assert hw.peak_memory_bandwidth_gbps > 0, name
        assert hw.peak_flops, name
        known = {k: v for k, v in hw.peak_flops.items() if v is not None}
        assert known and all(v > 1e9 for v in known.values()), name
        assert hw.source.strip(), name
        assert re.fullmatch(r"\d{4}-\d{2}(-\d{2})?", hw.as_of), (name, hw.as_of)
        assert hw.as_of <= dt.date.today().isoformat(), name


def test_accelerators_state_fp32_and_bf16_where_published():
    for name in ("h100-sxm", "h200", "a100-80gb", "l4", "l40s"):
        hw = get_hardware(name)
        assert hw.peak_flops["fp32"] and hw.peak_flops["bf16"] and hw.peak_flops["int8"], name
        assert hw.peak_flops["bf16"] > hw.peak_flops["fp32"], name  # tensor cores
    for name in ("tpu-v5e", "tpu-v6e"):
        assert get_hardware(name).peak_flops["bf16"] > 0


def test_spot_checks_against_vendor_numbers():
    assert get_hardware("h100-sxm").peak_memory_bandwidth_gbps == 3350
    assert get_hardware("h200").peak_memory_bandwidth_gbps == 4800
    assert get_hardware("tpu-v6e").peak_flops["bf16"] == pytest.approx(918e12)
    # A per-GPU price is the instance price over its GPU count.
    assert get_hardware("h100-sxm").price_per_hour_usd == pytest.approx(55.04 / 8)


def test_cpu_local_price_is_labelled_as_a_default():
    hw = get_hardware("cpu-local")
    assert hw.default_price
    assert "DEFAULT" in hw.price_basis


def test_catalog_states_these_are_list_prices():
    raw = json.loads(resources.files("leanserve").joinpath("data/hardware.json").read_text())
    assert "list price" in raw["_about"].lower()


def test_lookup_is_case_insensitive_and_unknown_names_list_the_known():
    assert get_hardware("H100-SXM").name == "h100-sxm"
    with pytest.raises(ValueError) as e:
        get_hardware("tpu-v99")
    assert "tpu-v99" in str(e.value) and "h100-sxm" in str(e.value) and "cpu-local" in str(e.value)


def test_cost_per_million_tokens_formula():
    # $/Mtok = $/h / (tok/s * 3600) * 1e6
    assert cost_per_million_tokens(3.6, 1000.0) == pytest.approx(1.0)
    assert cost_per_million_tokens(6.88, 2500.0) == pytest.approx(6.88 / (2500 * 3600) * 1e6)
    assert cost_per_million_tokens(0.0, 10.0) == 0.0
    for bad in ((1.0, 0.0), (1.0, -5.0), (-1.0, 10.0), (1.0, float("inf")), (float("nan"), 1.0)):
        with pytest.raises(ValueError):
            cost_per_million_tokens(*bad)


def test_entries_are_immutable_copies():
    cat = load_catalog()
    cat.pop("l4")
    assert "l4" in load_catalog()
    with pytest.raises(Exception):
        get_hardware("l4").price_per_hour_usd = 0  # type: ignore[misc]
