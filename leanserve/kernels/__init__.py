"""Native CPU kernels (C++ with AVX2/FMA intrinsics), compiled on first use and cached.

The sources in ``csrc/`` register operators under ``torch.ops.leanserve``; ``ops()`` compiles them
once per source version into ``$LEANSERVE_HOME/kernels`` (10-20 s per file on two cores; later
processes, in any checkout or virtual environment with the same torch, load the cached libraries
in milliseconds) and returns the namespace, or None when they cannot be used: a CPU without AVX2,
no C++ compiler, or ``LEANSERVE_KERNELS=0``. Every caller keeps a plain PyTorch path for None, and
the tests compare the two.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from leanserve import env

log = logging.getLogger("leanserve.kernels")

CSRC = Path(__file__).parent / "csrc"
_state: dict[str, Any] = {}


CFLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp")
LDFLAGS = ("-fopenmp",)


def _build_dir(source: Path) -> Path:
    """The cache folder of one source: its digest covers the source, the shared headers and the flags."""
    home = env.home()
    h = hashlib.sha256(source.read_bytes())
    for header in sorted(CSRC.glob("*.h")):  # a shared header's edit rebuilds every library
        h.update(header.read_bytes())
    # the flags are tuples: cpp_extension appends its own linker flags to the lists it is given
    h.update(" ".join(CFLAGS + LDFLAGS).encode())
    digest = h.hexdigest()[:12]
    return home / "kernels" / f"{source.stem}-torch{torch.__version__.split('+')[0]}-{digest}"


def _build(source: Path) -> None:
    """Load one source's library from the cache, compiling it first if it is not there."""
    build = _build_dir(source)
    library = build / f"leanserve_{source.stem}.so"
    if library.exists():
        # Loaded as it is, not through cpp_extension.load: its ninja file names the torch headers of
        # the environment that runs it, so every other virtual environment (another checkout) would
        # rewrite it and recompile every kernel, silently (~50 s). Same sources, flags and torch
        # version (the folder's name): the same library.
        try:
            torch.ops.load_library(str(library))
            return
        except OSError as e:  # a truncated or foreign file: build it again
            log.warning("cached kernel %s does not load (%s); compiling it again", library, e)
            library.unlink()
    from torch.utils import cpp_extension

    print(f"leanserve: compiling native kernel {source.name} (once; cached in {build.parent})", file=sys.stderr, flush=True)
    build.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=f"leanserve_{source.stem}", sources=[str(source)], extra_cflags=list(CFLAGS),
        extra_ldflags=list(LDFLAGS), build_directory=str(build), is_python_module=False, verbose=False)


def unavailable_reason() -> str | None:
    """Why the kernels cannot be used on this machine, or None if they can."""
    if not env.kernels_enabled():
        return "disabled by LEANSERVE_KERNELS=0"
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in ("AVX2", "AVX512"):
        return f"the CPU has no AVX2 (torch reports {cap})"
    return None


def ops() -> Any | None:
    """``torch.ops.leanserve`` with the native kernels loaded, or None (reason in ``status()``)."""
    if "ops" in _state:
        return _state["ops"]
    reason = unavailable_reason()
    if reason is None:
        try:
            for source in sorted(CSRC.glob("*.cpp")):  # one library per file: an edit rebuilds only it
                _build(source)
        except Exception as e:  # no compiler, no ninja, a failed build: run on the PyTorch path
            reason = f"build failed ({type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''})"
    if reason is not None:
        log.warning("native CPU kernels off: %s; using the PyTorch path", reason)
    _state["reason"] = reason
    _state["ops"] = None if reason else torch.ops.leanserve
    return _state["ops"]


def amx_available() -> bool:
    """The kernels are on and this CPU gives the process AMX-BF16 tiles (kernels/csrc/amx_linear.cpp);
    ``LEANSERVE_AMX=0`` turns the AMX matmul off."""
    if not env.amx_enabled() or (k := ops()) is None:
        return False
    return bool(k.amx_available())


def status() -> str:
    """One line for start-up logs: whether the kernels are in use."""
    ops()
    if _state["reason"] is not None:
        return f"native CPU kernels: off ({_state['reason']})"
    k = _state["ops"]
    return ("native CPU kernels: on (AVX2" + ("; AVX512-BF16" if k.avx512_bf16_available() else "")
            + ("; AMX bfloat16 matmul" if amx_available() else "") + ")")
