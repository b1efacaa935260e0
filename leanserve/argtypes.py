"""argparse types shared by the command-line tools: numbers with a lower bound, ports.

Each raises ``argparse.ArgumentTypeError`` with a message a person can act on; argparse turns it
into a one-line error.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _number(kind: type, minimum: float, inclusive: bool) -> Callable[[str], float]:
    word = "whole number" if kind is int else "number"
    bound = f"{'>=' if inclusive else '>'} {minimum:g}"

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {word}, got {text!r}") from None
        if not math.isfinite(v) or not (v >= minimum if inclusive else v > minimum):
            raise argparse.ArgumentTypeError(f"expected a {word} {bound}, got {text}")
        return v

    return parse


positive_int = _number(int, 1, inclusive=True)
nonneg_int = _number(int, 0, inclusive=True)
positive_float = _number(float, 0, inclusive=False)
nonneg_float = _number(float, 0, inclusive=True)


def port(text: str) -> int:
    v = nonneg_int(text)
    if v > 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 0..65535, got {v}")
    return v
