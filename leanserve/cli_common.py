"""What `leanserve generate` (cli.py) and `leanserve serve` (serve/cli.py) share: the engine flags,
derived from `EngineConfig`'s fields, the one-line user error, and pulling a built-in model on first use.

It sits below both command modules, so neither imports the other.
"""

from __future__ import annotations

import argparse
import sys

from leanserve.argtypes import add_config_args, config_from_args
from leanserve.config import EngineConfig


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """MODEL and one flag per `EngineConfig` field; defaults, types and help come from config.py."""
    add_config_args(p, EngineConfig)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine's config from the parsed flags, validated now (before any model is pulled or loaded).
    Where MODEL takes several (``serve``), the first one's."""
    if isinstance(args.model, list):
        args = argparse.Namespace(**{**vars(args), "model": args.model[0] if args.model else EngineConfig.model})
    return config_from_args(args, EngineConfig)


def ensure_model(name: str) -> None:
    """Built-in names are pulled on first use, so `leanserve serve` works with no arguments."""
    from leanserve.model.registry import BUILTIN_MODELS, is_pulled, pull

    if name in BUILTIN_MODELS and not is_pulled(name):
        print(f"{name} is not in the model store yet: pulling it", file=sys.stderr)
        pull(name, lambda s: print(s, file=sys.stderr))
