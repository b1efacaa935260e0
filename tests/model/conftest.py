"""Real models loaded once per test session (float32, the GGUF through leanserve's loader): each load
costs seconds (Gemma 3: ~30 s), and the modules that only read a model share it."""

from __future__ import annotations

import pytest
import torch

from leanserve.model.loader import load_model
from tests.conftest import require_model


@pytest.fixture(scope="session")
def smollm2_f32():
    require_model("smollm2-135m")
    return load_model("smollm2-135m", torch.float32)


@pytest.fixture(scope="session")
def gemma3_f32():
    require_model("gemma3-270m")
    return load_model("gemma3-270m", torch.float32)
