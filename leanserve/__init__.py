"""leanserve: an LLM inference server that makes cost a first-class output.

The offline API, under vLLM's names::

    from leanserve import LLM, SamplingParams

    llm = LLM("smollm2-135m")
    out = llm.generate("The capital of France is", SamplingParams(max_tokens=16, temperature=0))
    print(out[0].outputs[0].text)

``LLM``, ``SamplingParams``, ``RequestOutput`` and ``EngineConfig`` are imported on first use
(PEP 562), so ``import leanserve`` stays light: no torch until ``LLM`` is asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "RequestOutput", "EngineConfig", "__version__"]

if TYPE_CHECKING:
    from leanserve.config import EngineConfig
    from leanserve.engine.engine import LLM
    from leanserve.types import RequestOutput, SamplingParams


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from leanserve.engine.engine import LLM as value
    elif name == "SamplingParams":
        from leanserve.types import SamplingParams as value
    elif name == "RequestOutput":
        from leanserve.types import RequestOutput as value
    elif name == "EngineConfig":
        from leanserve.config import EngineConfig as value
    else:
        raise AttributeError(f"module 'leanserve' has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
