"""How the engine picks its dtype and threads for the machine it runs on."""

from __future__ import annotations

import pytest
import torch

from leanserve.config import EngineConfig
from leanserve.engine import engine

EPYC = "processor\t: 0\nflags\t\t: fpu sse sse2 avx fma avx2 f16c\n"
SAPPHIRE_RAPIDS = "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
COOPER_LAKE = "flags\t\t: fpu avx2 avx512f avx512_bf16\n"


def test_native_bf16_read_from_cpu_flags():
    assert not engine.cpu_has_native_bf16(EPYC)
    assert engine.cpu_has_native_bf16(SAPPHIRE_RAPIDS)
    assert engine.cpu_has_native_bf16(COOPER_LAKE)
    assert not engine.cpu_has_native_bf16("")
    assert not engine.cpu_has_native_bf16("model name : avx512_bf16 in a name, not a flag\n")


@pytest.mark.parametrize("native, want", [(False, torch.float32), (True, torch.bfloat16)])
def test_auto_dtype_on_cpu_follows_bf16_support(monkeypatch, native, want):
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: native)
    assert engine.resolve_dtype("auto", torch.device("cpu")) == want
    assert engine.resolve_dtype("float32", torch.device("cpu")) == torch.float32  # explicit wins


def test_threads_must_be_positive():
    assert EngineConfig(threads=3).threads == 3
    with pytest.raises(ValueError, match="threads must be >= 1"):
        EngineConfig(threads=0)
