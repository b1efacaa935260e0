"""Shared fixtures: paths to the shared data and the real models (skipping cleanly without them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT.parent / "shared" / "data"


def mt_bench_prompts(n: int | None = None) -> list[str]:
    path = DATA_DIR / "mt_bench_questions.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not found: the shared data folder is needed for this test")
    prompts = [json.loads(line)["turns"][0] for line in path.read_text().splitlines() if line.strip()]
    return prompts[:n] if n else prompts


def require_model(name: str) -> None:
    from leanserve.model.registry import is_pulled

    if not is_pulled(name):
        pytest.skip(f"model {name} not pulled: run `leanserve pull {name}` (scripts/test does)")
