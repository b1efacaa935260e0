"""Every environment variable leanserve reads, documented once, read here and nowhere else.

| variable | default | effect |
| --- | --- | --- |
| ``LEANSERVE_HOME`` | ``~/.cache/leanserve`` | where leanserve keeps its files: pulled models (``models/``), compiled native kernels (``kernels/``), the cost ledger (``ledger.sqlite``). Unset or empty: the default |
| ``LEANSERVE_KERNELS`` | ``1`` | ``0``: no native CPU kernels at all; every layer runs its PyTorch path |
| ``LEANSERVE_AMX`` | ``1`` | ``0``: keep the native kernels but leave bfloat16 matmuls to oneDNN instead of the AMX tile kernel |
| ``LEANSERVE_NATIVE_DECODE`` | ``1`` | ``0``: decode steps run layer by layer from Python instead of in one native call (model/native.py) |
| ``LEANSERVE_AVX512`` | ``1`` | ``0``: the native kernels run their AVX2 code where they have AVX-512 code. Read by the C++ code itself on each call (``kernels/csrc/cpu_features.h``), so it is listed here but not read here |
| ``LEANSERVE_API_KEY`` | none | ``leanserve serve``: a key clients must send (``Authorization: Bearer KEY``), added to ``--api-key``/``--api-key-file``/``--api-keys-file``; an environment variable is not visible in the process list |
| any name given as ``key_env=VAR`` | none | ``leanserve serve --upstream NAME=URL,key_env=VAR``: the upstream API's key (``named``) |

A switch is "off" only when set to exactly ``0``. Each function reads the environment when called
(model load, kernel load, server start-up), so a test's ``monkeypatch.setenv`` takes effect. This
module imports nothing from the package: every layer may use it.
"""

from __future__ import annotations

import os
from pathlib import Path

HOME = "LEANSERVE_HOME"
KERNELS = "LEANSERVE_KERNELS"
AMX = "LEANSERVE_AMX"
NATIVE_DECODE = "LEANSERVE_NATIVE_DECODE"
AVX512 = "LEANSERVE_AVX512"  # read in C++ (kernels/csrc/cpu_features.h)
API_KEY = "LEANSERVE_API_KEY"


def _switch(name: str) -> bool:
    return os.environ.get(name, "1") != "0"


def home() -> Path:
    """``$LEANSERVE_HOME``, or ``~/.cache/leanserve`` when it is unset or empty."""
    value = os.environ.get(HOME)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "leanserve"


def kernels_enabled() -> bool:
    return _switch(KERNELS)


def amx_enabled() -> bool:
    return _switch(AMX)


def native_decode_enabled() -> bool:
    return _switch(NATIVE_DECODE)


def api_key() -> str | None:
    """``$LEANSERVE_API_KEY`` with surrounding whitespace removed; None when unset or blank."""
    value = os.environ.get(API_KEY, "").strip()
    return value or None


def named(name: str) -> str | None:
    """A variable the user named on the command line (an upstream's ``key_env``); None if unset or blank."""
    value = os.environ.get(name, "").strip()
    return value or None
