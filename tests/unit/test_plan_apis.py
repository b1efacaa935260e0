"""The managed-API price catalog: every shipped entry sourced and dated, exact costs, one-line errors."""

from __future__ import annotations

import datetime as dt
import json
import math
from importlib import resources

import pytest

from leanserve.plan.apis import (
    GIVEN_ON_COMMAND_LINE,
    ApiPrice,
    _entry,
    api_catalog_note,
    get_api,
    load_api_catalog,
    parse_api_price,
)

SHIPPED = sorted(load_api_catalog())


def _price(input_usd: float, output_usd: float, cached_usd: float | None = None) -> ApiPrice:
    return ApiPrice(name="t", provider="p", model="m", description="", input_per_mtok_usd=input_usd,
                    output_per_mtok_usd=output_usd, cached_input_per_mtok_usd=cached_usd, source="s",
                    as_of="2026-01-01")


def _raw(**changes) -> dict:
    raw = {"provider": "P", "model": "m", "input_per_mtok_usd": 0.15, "output_per_mtok_usd": 0.6,
           "source": "P pricing page", "as_of": "2026-08-27"}
    raw.update(changes)
    return {k: v for k, v in raw.items() if v is not ...}


# ---- the shipped catalog -----------------------------------------------------------------------


def test_shipped_catalog_loads_with_closed_and_open_weight_entries():
    assert 8 <= len(SHIPPED) <= 12
    providers = {p.provider for p in load_api_catalog().values()}
    assert {"OpenAI", "Anthropic", "Google"} <= providers
    assert providers - {"OpenAI", "Anthropic", "Google"}, "no open-weight host"


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_entry_is_sourced_dated_and_priced(name):
    api = load_api_catalog()[name]
    assert api.name == name == name.lower()
    assert api.source.strip() and api.source != GIVEN_ON_COMMAND_LINE
    as_of = dt.date.fromisoformat(api.as_of)
    assert dt.date(2025, 1, 1) <= as_of <= dt.date.today()
    for price in (api.input_per_mtok_usd, api.output_per_mtok_usd):
        assert math.isfinite(price) and 0 < price < 20
    if api.cached_input_per_mtok_usd is not None:
        assert 0 <= api.cached_input_per_mtok_usd <= api.input_per_mtok_usd
    assert api.notes.strip() and api.description.strip()


def test_shipped_json_has_about_units_and_only_known_fields():
    raw = json.loads(resources.files("leanserve").joinpath("data/api_prices.json").read_text())
    assert set(raw) == {"_about", "units", "apis"}
    assert "list price" in api_catalog_note().lower()
    assert "command line" in api_catalog_note()
    assert {"input_per_mtok_usd", "output_per_mtok_usd", "cached_input_per_mtok_usd"} <= set(raw["units"])


def test_spot_checks_against_the_pages_read():
    luna = get_api("openai/gpt-6-luna")
    assert (luna.input_per_mtok_usd, luna.output_per_mtok_usd, luna.cached_input_per_mtok_usd) == (0.10, 0.50, 0.01)
    assert get_api("openai/gpt-4o-mini").cached_input_per_mtok_usd == 0.075
    assert get_api("anthropic/claude-haiku-5.5").cached_input_per_mtok_usd is None


def test_load_returns_a_fresh_dict():
    first = load_api_catalog()
    first.clear()
    assert load_api_catalog()


# ---- cost_usd ----------------------------------------------------------------------------------


def test_cost_of_input_and_output():
    # 2,000,000 input at $0.15/M + 500,000 output at $0.60/M = 0.30 + 0.30
    assert _price(0.15, 0.60).cost_usd(2_000_000, 500_000) == pytest.approx(0.60)


def test_cached_input_is_part_of_input_and_billed_at_the_cached_rate():
    # 1,000,000 input of which 400,000 cached: 600,000 at $1.00 + 400,000 at $0.10 + 100,000 at $5.00
    assert _price(1.00, 5.00, 0.10).cost_usd(1_000_000, 100_000, 400_000) == pytest.approx(0.60 + 0.04 + 0.50)


def test_cached_input_without_a_cached_rate_is_billed_at_the_input_rate():
    assert _price(0.30, 2.50).cost_usd(1_000_000, 0, 1_000_000) == pytest.approx(0.30)


def test_zero_tokens_cost_nothing_and_shipped_entry_matches_hand_sum():
    assert _price(0.15, 0.60, 0.075).cost_usd(0, 0) == 0.0
    # gpt-6-luna: 3,000,000 in (1,000,000 cached) and 2,000,000 out = 2*0.10 + 1*0.01 + 2*0.50
    assert get_api("openai/gpt-6-luna").cost_usd(3_000_000, 2_000_000, 1_000_000) == pytest.approx(1.21)


@pytest.mark.parametrize("args, message", [
    ((-1, 0), "input_tokens must be a finite number >= 0, got -1"),
    ((0, -5), "output_tokens must be a finite number >= 0, got -5"),
    ((10, 0, -1), "cached_input_tokens must be a finite number >= 0, got -1"),
    ((10, 0, 11), "cached_input_tokens (11) exceeds input_tokens (10)"),
    ((float("nan"), 0), "input_tokens must be a finite number >= 0, got nan"),
])
def test_cost_rejects_bad_counts(args, message):
    with pytest.raises(ValueError) as err:
        _price(0.15, 0.60).cost_usd(*args)
    assert str(err.value) == message


# ---- validation of an entry --------------------------------------------------------------------


def test_a_good_entry_parses():
    api = _entry("x/y", _raw(cached_input_per_mtok_usd=0.075, notes="n", description="d"))
    assert (api.name, api.input_per_mtok_usd, api.cached_input_per_mtok_usd) == ("x/y", 0.15, 0.075)
    assert (api.as_of, api.notes, api.description) == ("2026-08-27", "n", "d")


@pytest.mark.parametrize("changes, message", [
    ({"source": ...}, "API catalog entry 'x/y' lacks source"),
    ({"source": "  "}, "API catalog entry 'x/y' lacks source"),
    ({"source": ..., "as_of": ...}, "API catalog entry 'x/y' lacks source, as_of"),
    ({"as_of": "2026-13-01"}, "API catalog entry 'x/y': as_of must be a date YYYY-MM-DD, got '2026-13-01'"),
    ({"as_of": "2026-08"}, "API catalog entry 'x/y': as_of must be a date YYYY-MM-DD, got '2026-08'"),
    ({"as_of": "last week"}, "API catalog entry 'x/y': as_of must be a date YYYY-MM-DD, got 'last week'"),
    ({"as_of": 20260827}, "API catalog entry 'x/y': as_of must be a date YYYY-MM-DD, got 20260827"),
    ({"input_per_mtok_usd": -0.1},
     "API catalog entry 'x/y': input_per_mtok_usd must be a finite number >= 0, got -0.1"),
    ({"output_per_mtok_usd": float("nan")},
     "API catalog entry 'x/y': output_per_mtok_usd must be a finite number >= 0, got nan"),
    ({"output_per_mtok_usd": float("inf")},
     "API catalog entry 'x/y': output_per_mtok_usd must be a finite number >= 0, got inf"),
    ({"input_per_mtok_usd": "0.15"},
     "API catalog entry 'x/y': input_per_mtok_usd must be a finite number >= 0, got '0.15'"),
    ({"cached_input_per_mtok_usd": -1},
     "API catalog entry 'x/y': cached_input_per_mtok_usd must be a finite number >= 0, got -1"),
    ({"input_per_mtok": 0.15}, "API catalog entry 'x/y' has unknown field(s) input_per_mtok"),
])
def test_bad_entries_raise_one_line_naming_the_entry(changes, message):
    with pytest.raises(ValueError) as err:
        _entry("x/y", _raw(**changes))
    assert str(err.value) == message
    assert "\n" not in str(err.value)


def test_nan_written_in_json_is_refused():
    raw = json.loads('{"provider": "P", "model": "m", "input_per_mtok_usd": NaN, "output_per_mtok_usd": 1,'
                     ' "source": "s", "as_of": "2026-01-01"}')
    with pytest.raises(ValueError, match="input_per_mtok_usd must be a finite number >= 0, got nan"):
        _entry("x/y", raw)


# ---- get_api -----------------------------------------------------------------------------------


def test_get_api_is_case_insensitive():
    assert get_api("  OpenAI/GPT-6-Luna ") is get_api("openai/gpt-6-luna")


def test_get_api_unknown_lists_the_known_names():
    with pytest.raises(ValueError) as err:
        get_api("openai/gpt-9")
    assert str(err.value) == f"unknown API 'openai/gpt-9'; known: {', '.join(SHIPPED)}"


# ---- parse_api_price ---------------------------------------------------------------------------


def test_parse_two_prices():
    api = parse_api_price("mine=0.2,0.8")
    assert (api.name, api.input_per_mtok_usd, api.output_per_mtok_usd, api.cached_input_per_mtok_usd) == (
        "mine", 0.2, 0.8, None)
    assert api.source == GIVEN_ON_COMMAND_LINE and api.user_given
    assert api.as_of == dt.date.today().isoformat()
    assert api.cost_usd(1_000_000, 1_000_000) == pytest.approx(1.0)


def test_parse_three_prices_with_spaces():
    api = parse_api_price(" my-api = 1 , 4.5 , 0.1 ")
    assert (api.name, api.input_per_mtok_usd, api.output_per_mtok_usd, api.cached_input_per_mtok_usd) == (
        "my-api", 1.0, 4.5, 0.1)
    assert not get_api("openai/gpt-6-luna").user_given


FORM = "expected NAME=INPUT,OUTPUT[,CACHED] in $ per million tokens, e.g. mine=0.2,0.8"


@pytest.mark.parametrize("text, message", [
    ("mine:0.2,0.8", f"API price 'mine:0.2,0.8': no '='; {FORM}"),
    ("=0.2,0.8", f"API price '=0.2,0.8': empty name; {FORM}"),
    ("  =0.2,0.8", f"API price '  =0.2,0.8': empty name; {FORM}"),
    ("mine=0.2", f"API price 'mine=0.2': 1 value(s), need 2 or 3; {FORM}"),
    ("mine=", f"API price 'mine=': 1 value(s), need 2 or 3; {FORM}"),
    ("mine=1,2,3,4", f"API price 'mine=1,2,3,4': 4 value(s), need 2 or 3; {FORM}"),
    ("mine=0.2,abc", "API price 'mine=0.2,abc': output price 'abc' is not a number"),
    ("mine=0.2,", "API price 'mine=0.2,': output price '' is not a number"),
    ("mine=-0.2,0.8", "API price 'mine=-0.2,0.8': input price must be a finite number >= 0, got '-0.2'"),
    ("mine=0.2,nan", "API price 'mine=0.2,nan': output price must be a finite number >= 0, got 'nan'"),
    ("mine=inf,0.8", "API price 'mine=inf,0.8': input price must be a finite number >= 0, got 'inf'"),
    ("mine=0.2,0.8,-1", "API price 'mine=0.2,0.8,-1': cached input price must be a finite number >= 0, got '-1'"),
])
def test_parse_rejects_bad_text_with_one_line(text, message):
    with pytest.raises(ValueError) as err:
        parse_api_price(text)
    assert str(err.value) == message
