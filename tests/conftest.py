"""Shared fixtures: paths to the shared data and the real models (skipping cleanly without them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT.parent / "shared" / "data"


def _share_gguf_readers() -> None:
    """One parsed GGUFReader per file for transformers' references in the test process. Parsing a
    GGUF's metadata is the slow part of loading it (Gemma 3's 262k-token vocabulary), and
    transformers parses the file twice (config and weights). The reader is read-only after parsing,
    so sharing it changes nothing but the time."""
    try:
        import gguf
    except ImportError:
        return
    real, cache = gguf.GGUFReader, {}

    def reader(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in cache:
            if mode == "r":  # leanserve's faster parse of the same reader (model/loader.py)
                from leanserve.model.loader import open_gguf
                cache[key] = open_gguf(path)
            else:
                cache[key] = real(path, mode)
        return cache[key]

    gguf.GGUFReader = reader


_share_gguf_readers()


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


def run_in_installed_copy(tmp_path: Path, body: str, timeout: float = 120) -> dict:
    """Run ``body`` (Python printing one JSON line) in a child process that imports leanserve from a
    copy made as a wheel installs it (every module, plus only the files pyproject's package-data
    lists), from another folder, with an audit hook failing any read of the repository's own package
    folder or of its ../shared neighbour: what a pip user has, and nothing else. Returns the JSON."""
    import os
    import subprocess
    import sys
    import textwrap
    import tomllib

    site, work = tmp_path / "site", tmp_path / "work"
    work.mkdir()
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["leanserve"]
    src = ROOT / "leanserve"
    files = {p for p in src.rglob("*.py") if "__pycache__" not in p.parts} | {p for g in globs for p in src.glob(g)}
    for f in files:
        dest = site / "leanserve" / f.relative_to(src)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(f.read_bytes())
    blocked = (str(ROOT / "leanserve"), str(ROOT.parent / "shared"))
    code = textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {str(site)!r})
        BLOCKED = {blocked!r}
        def guard(event, args):
            if event in ("open", "os.listdir", "os.scandir") and isinstance(args[0], str):
                if os.path.abspath(args[0]).startswith(BLOCKED):
                    raise PermissionError(f"{{event}} {{args[0]}}: outside the installed package")
        sys.addaudithook(guard)
        import leanserve
        assert leanserve.__file__.startswith({str(site)!r}), leanserve.__file__
    """) + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-I", "-c", code], cwd=work, capture_output=True, text=True,
                          timeout=timeout, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)
