"""Managed-API price catalog: what the same tokens cost at a hosted API, for the self-host break-even.

The data lives in ``leanserve/data/api_prices.json``. Every entry states its list prices in USD per
million tokens (input, output and, where recorded, cached input), where they were read (``source``)
and when (``as_of``). They are LIST prices at that date, standard tier: a user's own price
(``NAME=INPUT,OUTPUT[,CACHED]``, see ``parse_api_price``) always wins.

    $ = (input - cached) / 1e6 * input_price + cached / 1e6 * cached_price + output / 1e6 * output_price

Torch-free: the planner imports this on machines without an accelerator stack.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

GIVEN_ON_COMMAND_LINE = "given on the command line"
PRICE_FIELDS = ("input_per_mtok_usd", "output_per_mtok_usd")
REQUIRED_FIELDS = ("provider", "model", *PRICE_FIELDS, "source", "as_of")
KNOWN_FIELDS = frozenset((*REQUIRED_FIELDS, "description", "cached_input_per_mtok_usd", "notes"))


@dataclass(frozen=True)
class ApiPrice:
    """One API's list prices, USD per million tokens. ``cached_input_per_mtok_usd`` is None where the
    catalog records no cache-read price; cached tokens are then billed at the full input price."""

    name: str
    provider: str
    model: str
    description: str
    input_per_mtok_usd: float
    output_per_mtok_usd: float
    cached_input_per_mtok_usd: float | None
    source: str
    as_of: str
    notes: str = ""

    @property
    def user_given(self) -> bool:
        """True for a price the user passed, not one read from the catalog."""
        return self.source == GIVEN_ON_COMMAND_LINE

    def cost_usd(self, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0) -> float:
        """What a workload costs here. ``cached_input_tokens`` is the part of ``input_tokens`` served
        from the provider's prompt cache (as in OpenAI's usage and leanserve's ledger), billed at the
        cached rate; the rest of the input at the input rate."""
        for label, count in (("input_tokens", input_tokens), ("output_tokens", output_tokens),
                             ("cached_input_tokens", cached_input_tokens)):
            if not _is_number(count) or not math.isfinite(count) or count < 0:
                raise ValueError(f"{label} must be a finite number >= 0, got {count!r}")
        if cached_input_tokens > input_tokens:
            raise ValueError(f"cached_input_tokens ({cached_input_tokens}) exceeds input_tokens ({input_tokens})")
        cached_rate = self.cached_input_per_mtok_usd
        if cached_rate is None:
            cached_rate = self.input_per_mtok_usd
        return ((input_tokens - cached_input_tokens) * self.input_per_mtok_usd
                + cached_input_tokens * cached_rate
                + output_tokens * self.output_per_mtok_usd) / 1_000_000

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "provider": self.provider,
            "model": self.model,
            "description": self.description,
            "input_per_mtok_usd": self.input_per_mtok_usd,
            "output_per_mtok_usd": self.output_per_mtok_usd,
            "cached_input_per_mtok_usd": self.cached_input_per_mtok_usd,
            "source": self.source,
            "as_of": self.as_of,
            "notes": self.notes,
            "user_given": self.user_given,
        }


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _price(name: str, field: str, value: Any) -> float:
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"API catalog entry {name!r}: {field} must be a finite number >= 0, got {value!r}")
    return float(value)


def _entry(name: str, raw: dict[str, Any]) -> ApiPrice:
    """One catalog entry, checked: every problem is a one-line ValueError naming the entry."""
    if not isinstance(raw, dict):
        raise ValueError(f"API catalog entry {name!r} is not an object")
    missing = [f for f in REQUIRED_FIELDS if raw.get(f) is None or (isinstance(raw.get(f), str) and not raw[f].strip())]
    if missing:
        raise ValueError(f"API catalog entry {name!r} lacks {', '.join(missing)}")
    unknown = sorted(set(raw) - KNOWN_FIELDS)
    if unknown:
        raise ValueError(f"API catalog entry {name!r} has unknown field(s) {', '.join(unknown)}")
    as_of = raw["as_of"]
    try:
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", as_of):
            raise ValueError
        dt.date.fromisoformat(as_of)
    except (TypeError, ValueError):
        raise ValueError(f"API catalog entry {name!r}: as_of must be a date YYYY-MM-DD, got {as_of!r}") from None
    cached = raw.get("cached_input_per_mtok_usd")
    return ApiPrice(
        name=name,
        provider=str(raw["provider"]),
        model=str(raw["model"]),
        description=str(raw.get("description", "")),
        input_per_mtok_usd=_price(name, "input_per_mtok_usd", raw["input_per_mtok_usd"]),
        output_per_mtok_usd=_price(name, "output_per_mtok_usd", raw["output_per_mtok_usd"]),
        cached_input_per_mtok_usd=None if cached is None else _price(name, "cached_input_per_mtok_usd", cached),
        source=str(raw["source"]),
        as_of=as_of,
        notes=str(raw.get("notes", "")),
    )


def _read_catalog_json() -> dict[str, Any]:
    text = resources.files("leanserve").joinpath("data/api_prices.json").read_text(encoding="utf-8")
    return json.loads(text)


@lru_cache(maxsize=1)
def _catalog() -> dict[str, ApiPrice]:
    data = _read_catalog_json()
    catalog: dict[str, ApiPrice] = {}
    for name, raw in data["apis"].items():
        if name != name.lower():
            raise ValueError(f"API catalog entry {name!r}: names must be lowercase")
        catalog[name] = _entry(name, raw)
    return catalog


def load_api_catalog() -> dict[str, ApiPrice]:
    """All entries, by name (a fresh dict; the entries themselves are immutable)."""
    return dict(_catalog())


def api_catalog_note() -> str:
    """The catalog's own statement of what its prices are (list prices at each entry's date)."""
    return str(_read_catalog_json().get("_about", ""))


def get_api(name: str) -> ApiPrice:
    """The entry called ``name`` (case-insensitive). ValueError listing the known names otherwise."""
    catalog = _catalog()
    entry = catalog.get(name.strip().lower())
    if entry is None:
        raise ValueError(f"unknown API {name!r}; known: {', '.join(sorted(catalog))}")
    return entry


def parse_api_price(text: str) -> ApiPrice:
    """A user's own price, ``NAME=INPUT,OUTPUT[,CACHED]`` in USD per million tokens (``mine=0.2,0.8``).

    Its source is "given on the command line" and its date today. One-line ValueError on bad text.
    """
    form = "expected NAME=INPUT,OUTPUT[,CACHED] in $ per million tokens, e.g. mine=0.2,0.8"
    name, sep, prices = text.partition("=")
    name = name.strip()
    if not sep:
        raise ValueError(f"API price {text!r}: no '='; {form}")
    if not name:
        raise ValueError(f"API price {text!r}: empty name; {form}")
    parts = [p.strip() for p in prices.split(",")]
    if len(parts) not in (2, 3):
        raise ValueError(f"API price {text!r}: {len(parts)} value(s), need 2 or 3; {form}")
    labels = ("input", "output", "cached input")
    values: list[float] = []
    for label, part in zip(labels, parts):
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"API price {text!r}: {label} price {part!r} is not a number") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"API price {text!r}: {label} price must be a finite number >= 0, got {part!r}")
        values.append(value)
    return ApiPrice(
        name=name,
        provider="user",
        model=name,
        description=f"price given on the command line for {name!r}",
        input_per_mtok_usd=values[0],
        output_per_mtok_usd=values[1],
        cached_input_per_mtok_usd=values[2] if len(values) == 3 else None,
        source=GIVEN_ON_COMMAND_LINE,
        as_of=dt.date.today().isoformat(),
        notes="user-supplied price: it wins over any catalog entry",
    )
