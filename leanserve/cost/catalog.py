"""Hardware price catalog: on-demand list prices and peak numbers for common hardware.

The data lives in ``leanserve/data/hardware.json``. Every entry states its price, the hardware the
price belongs to, where the price was read (``source``) and when (``as_of``). They are LIST prices
at that date, not quotes: a user's own price (``--price-per-hour``) always wins.

    $ per million tokens = ($ per hour) / (tokens per second x 3600) x 1,000,000
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

REQUIRED_FIELDS = ("price_per_hour_usd", "peak_memory_bandwidth_gbps", "peak_flops", "source", "as_of")


@dataclass(frozen=True)
class Hardware:
    """One catalog entry. ``peak_flops`` maps a dtype (fp32, bf16, fp16, fp8, int8, ...) to FLOP/s;
    a None value means the vendor publishes no such figure."""

    name: str
    description: str
    unit: str
    price_per_hour_usd: float
    price_basis: str
    source: str
    as_of: str
    memory_gb: float | None
    peak_memory_bandwidth_gbps: float
    peak_flops: dict[str, float | None]
    spec_source: str = ""
    notes: str = ""
    estimate: bool = False  # bandwidth/FLOP/s derived rather than published
    default_price: bool = False  # the price is a labelled placeholder, not a provider's list price
    extra: dict[str, Any] = field(default_factory=dict)

    def peak_flops_for(self, dtype: str) -> float | None:
        """FLOP/s for ``dtype``; 'float16'/'bfloat16'/'float32' spellings are accepted."""
        aliases = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "half": "fp16"}
        return self.peak_flops.get(aliases.get(dtype, dtype))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "unit": self.unit,
            "price_per_hour_usd": self.price_per_hour_usd,
            "price_basis": self.price_basis,
            "source": self.source,
            "as_of": self.as_of,
            "memory_gb": self.memory_gb,
            "peak_memory_bandwidth_gbps": self.peak_memory_bandwidth_gbps,
            "peak_flops": dict(self.peak_flops),
            "spec_source": self.spec_source,
            "notes": self.notes,
            "estimate": self.estimate,
            "default_price": self.default_price,
        }


def _read_catalog_json() -> dict[str, Any]:
    text = resources.files("leanserve").joinpath("data/hardware.json").read_text(encoding="utf-8")
    return json.loads(text)


def _entry(name: str, raw: dict[str, Any]) -> Hardware:
    missing = [f for f in REQUIRED_FIELDS if raw.get(f) in (None, "", {})]
    if missing:
        raise ValueError(f"hardware catalog entry {name!r} lacks {', '.join(missing)}")
    known = {
        "description", "unit", "price_per_hour_usd", "price_basis", "source", "as_of", "memory_gb",
        "peak_memory_bandwidth_gbps", "peak_flops", "spec_source", "notes", "estimate", "default_price",
    }
    return Hardware(
        name=name,
        description=raw.get("description", ""),
        unit=raw.get("unit", "1 unit"),
        price_per_hour_usd=float(raw["price_per_hour_usd"]),
        price_basis=raw.get("price_basis", ""),
        source=raw["source"],
        as_of=str(raw["as_of"]),
        memory_gb=raw.get("memory_gb"),
        peak_memory_bandwidth_gbps=float(raw["peak_memory_bandwidth_gbps"]),
        peak_flops={k: (None if v is None else float(v)) for k, v in raw["peak_flops"].items()},
        spec_source=raw.get("spec_source", ""),
        notes=raw.get("notes", ""),
        estimate=bool(raw.get("estimate", False)),
        default_price=bool(raw.get("default_price", False)),
        extra={k: v for k, v in raw.items() if k not in known},
    )


@lru_cache(maxsize=1)
def _catalog() -> dict[str, Hardware]:
    data = _read_catalog_json()
    return {name: _entry(name, raw) for name, raw in data["hardware"].items()}


def load_catalog() -> dict[str, Hardware]:
    """All entries, by name (a fresh dict; the entries themselves are immutable)."""
    return dict(_catalog())


def catalog_note() -> str:
    """The catalog's own statement of what its prices are (list prices at each entry's date)."""
    return str(_read_catalog_json().get("_about", ""))


def get_hardware(name: str) -> Hardware:
    """The entry called ``name`` (case-insensitive). ValueError listing the known names otherwise."""
    catalog = _catalog()
    key = name.strip().lower()
    for entry_name, entry in catalog.items():
        if entry_name.lower() == key:
            return entry
    raise ValueError(f"unknown hardware {name!r}; known: {', '.join(sorted(catalog))}")


def cost_per_million_tokens(price_per_hour: float, tokens_per_second: float) -> float:
    """$ per million tokens = $/h / (tok/s * 3600) * 1e6.

    ValueError when the price is negative or the rate is not a positive finite number: a cost per
    token at zero throughput is undefined, not zero.
    """
    if not (isinstance(price_per_hour, (int, float)) and math.isfinite(price_per_hour)) or price_per_hour < 0:
        raise ValueError(f"price_per_hour must be a finite number >= 0, got {price_per_hour!r}")
    if not (isinstance(tokens_per_second, (int, float)) and math.isfinite(tokens_per_second)) or tokens_per_second <= 0:
        raise ValueError(f"tokens_per_second must be a finite number > 0, got {tokens_per_second!r}")
    return price_per_hour / (tokens_per_second * 3600.0) * 1_000_000.0
