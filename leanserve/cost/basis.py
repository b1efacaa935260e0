"""The price basis of a server: which hardware (for peak FLOP/s and bandwidth) and what $ per hour.

    leanserve serve --hardware l4                      # the catalog's L4 list price and peaks
    leanserve serve --price-per-hour 0.50              # this machine's peaks, your price
    leanserve serve --hardware l4 --price-per-hour 0.5 # L4 peaks, your price

Without ``--hardware`` the basis is the detected GPU when the catalog knows it, else ``cpu-local``
(whose price is a clearly labelled placeholder, not a quote).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from leanserve.cost.catalog import Hardware, get_hardware

DEFAULT_HARDWARE = "cpu-local"

# substrings of torch.cuda.get_device_name() -> catalog entry (first match wins)
_GPU_NAMES = (("H200", "h200"), ("H100", "h100-sxm"), ("A100", "a100-80gb"), ("L40S", "l40s"), ("L4", "l4"))


@dataclass(frozen=True)
class PriceBasis:
    hardware: Hardware
    price_per_hour: float  # USD per hour of the machine (busy or idle)
    price_source: str  # where the price comes from, in words
    default_price: bool  # the price is the catalog's labelled placeholder
    detected: bool = False  # the hardware was detected, not named

    @property
    def usd_per_second(self) -> float:
        return self.price_per_hour / 3600.0

    def usd(self, machine_seconds: float) -> float:
        return machine_seconds * self.price_per_hour / 3600.0

    def describe(self) -> str:
        """One line for the startup banner."""
        how = "detected" if self.detected else "chosen" if self.hardware.name != DEFAULT_HARDWARE else "default"
        text = (f"cost basis: {self.hardware.name} ({how}) at "
                f"${self.price_per_hour:g}/h, price: {self.price_source}")
        if self.default_price:
            text += " -- a DEFAULT price, not a quote: pass --price-per-hour with your real cost"
        return text

    def to_dict(self) -> dict[str, Any]:
        h = self.hardware
        return {"hardware": h.name, "description": h.description, "price_per_hour": self.price_per_hour,
                "price_source": self.price_source, "default_price": self.default_price,
                "catalog_as_of": h.as_of, "peak_memory_bandwidth_gbps": h.peak_memory_bandwidth_gbps,
                "peak_flops": dict(h.peak_flops), "peaks_estimated": h.estimate}


def detect_hardware(device: str | None = None) -> str | None:
    """The catalog name of the CUDA device in use, when the catalog knows it; else None."""
    if device is None or not device.startswith("cuda"):
        return None
    try:
        import torch

        name = torch.cuda.get_device_name(torch.device(device))
    except Exception:  # noqa: BLE001 - detection is a convenience
        return None
    for needle, entry in _GPU_NAMES:
        if needle in name:
            return entry
    return None


def resolve_price_basis(hardware: str | None = None, price_per_hour: float | None = None,
                        device: str | None = None) -> PriceBasis:
    """``hardware`` (a catalog name) for the peaks, ``price_per_hour`` (overrides the catalog price)
    for the price. ValueError for an unknown name or a price that is not a finite number >= 0."""
    detected = False
    if hardware is None:
        found = detect_hardware(device)
        hardware, detected = (found, True) if found else (DEFAULT_HARDWARE, False)
    hw = get_hardware(hardware)
    if price_per_hour is not None:
        if not (math.isfinite(price_per_hour) and price_per_hour >= 0):
            raise ValueError(f"--price-per-hour must be a finite number >= 0, got {price_per_hour}")
        return PriceBasis(hw, float(price_per_hour), "--price-per-hour (given)", False, detected)
    source = f"{hw.source}, as of {hw.as_of}"
    return PriceBasis(hw, hw.price_per_hour_usd, source, hw.default_price, detected)
