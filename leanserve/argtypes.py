"""argparse types shared by the command-line tools (numbers with a lower bound, ports), and flags
derived from a config dataclass's fields (`add_config_args`), so a default is written once.

Each type raises ``argparse.ArgumentTypeError`` with a message a person can act on; argparse turns
it into a one-line error. This module imports nothing from the package.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import types
import typing
from collections.abc import Callable
from typing import Any


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


def one_line_error(prog: str) -> Callable[[str], None]:
    """A replacement for ``ArgumentParser.error``: argparse's own errors as one line, exit code 2,
    like every other user error (``parser.error = one_line_error("leanserve")``)."""
    def error(message: str) -> None:
        sys.stderr.write(f"{prog}: error: {message}\n")
        raise SystemExit(2)
    return error


def port(text: str) -> int:
    v = nonneg_int(text)
    if v > 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 0..65535, got {v}")
    return v


def _flag_type(hint: Any) -> Any:
    """``int | None`` -> int; a plain type as it is."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Let a parser's ValueError message reach the user (argparse would print only 'invalid value')."""
    def wrapped(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    wrapped.__name__ = getattr(parse, "__name__", "value")
    return wrapped


def config_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a config dataclass that have a flag (metadata ``{"cli": False}`` opts out)."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", {}) is not False]


def add_config_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type) -> None:
    """One flag per field of the config dataclass ``cls``: ``--field-name``, the field's default and type
    (from its annotation), help and options from ``metadata["cli"]`` (help, choices, type, metavar,
    ``flag`` for another name, ``positional``, ``show``: the default's text). A bool that defaults to True becomes a ``--no-...`` switch.
    Bounds are not repeated here: constructing ``cls`` validates them (`config_from_args`)."""
    hints = typing.get_type_hints(cls)
    for f in config_fields(cls):
        how = dict(f.metadata.get("cli", {}))
        text = how.pop("help", "").replace("%", "%%")
        show = how.pop("show", str)  # how the default reads in the help, e.g. 4194304 -> 4MiB
        flag = how.pop("flag", "--" + f.name.replace("_", "-"))
        default = f.default
        kind = _flag_type(hints[f.name])
        if how.pop("positional", False):
            parser.add_argument(f.name, nargs="?", default=default, help=f"{text} (default: {show(default)})", **how)
        elif kind is bool:
            parser.add_argument(flag, dest=f.name, action="store_false" if default else "store_true", help=text)
        else:
            if default is not None and "default:" not in text:
                text = f"{text} (default: {show(default)})" if text else f"default: {show(default)}"
            if "type" in how:
                how["type"] = _argparse_type(how["type"])
            how.setdefault("type", kind)
            if "choices" not in how:
                how.setdefault("metavar", "N" if kind is int else f.name.upper())
            parser.add_argument(flag, dest=f.name, default=default, help=text, **how)


def config_kwargs(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The keyword arguments for ``cls`` that ``add_config_args`` put in ``args``."""
    return {f.name: getattr(args, f.name) for f in config_fields(cls)}


def config_from_args(args: argparse.Namespace, cls: type, **overrides: Any) -> Any:
    """``cls(**config_kwargs(args, cls), **overrides)``: its validation runs now, as a one-line error."""
    return cls(**{**config_kwargs(args, cls), **overrides})
