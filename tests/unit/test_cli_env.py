"""leanserve/env.py: every environment variable is read there, and each reader agrees on LEANSERVE_HOME."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from leanserve import env

PACKAGE = Path(__file__).resolve().parents[2] / "leanserve"


def test_home_defaults_when_unset_or_empty(monkeypatch, tmp_path):
    monkeypatch.delenv("LEANSERVE_HOME", raising=False)
    assert env.home() == Path.home() / ".cache" / "leanserve"
    monkeypatch.setenv("LEANSERVE_HOME", "")  # empty is unset (kernels once used "" as the current folder)
    assert env.home() == Path.home() / ".cache" / "leanserve"
    monkeypatch.setenv("LEANSERVE_HOME", str(tmp_path))
    assert env.home() == tmp_path


def test_every_reader_of_leanserve_home_agrees(monkeypatch, tmp_path):
    from leanserve.cost.ledger import default_ledger_path
    from leanserve.kernels import _build_dir, CSRC
    from leanserve.model.registry import model_store

    monkeypatch.setenv("LEANSERVE_HOME", str(tmp_path))
    assert model_store() == tmp_path / "models"
    assert default_ledger_path() == tmp_path / "ledger.sqlite"
    assert _build_dir(next(CSRC.glob("*.cpp"))).parent == tmp_path / "kernels"


def test_switches_are_off_only_at_zero(monkeypatch):
    for name, read in [("LEANSERVE_KERNELS", env.kernels_enabled), ("LEANSERVE_AMX", env.amx_enabled),
                       ("LEANSERVE_NATIVE_DECODE", env.native_decode_enabled)]:
        monkeypatch.delenv(name, raising=False)
        assert read()
        monkeypatch.setenv(name, "0")
        assert not read()
        monkeypatch.setenv(name, "1")
        assert read()


def test_api_key(monkeypatch):
    monkeypatch.delenv("LEANSERVE_API_KEY", raising=False)
    assert env.api_key() is None
    monkeypatch.setenv("LEANSERVE_API_KEY", "  ")
    assert env.api_key() is None
    monkeypatch.setenv("LEANSERVE_API_KEY", " sk-1\n")
    assert env.api_key() == "sk-1"


def test_the_environment_is_read_in_env_py_only():
    """No module but env.py touches os.environ/os.getenv, and every LEANSERVE_ variable a module names
    is documented in env.py's docstring."""
    readers, named = [], set()
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        named |= set(re.findall(r"LEANSERVE_[A-Z0-9_]+", text))
        if path.name == "env.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb"):
                readers.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    for path in (PACKAGE / "kernels" / "csrc").glob("*"):
        named |= set(re.findall(r"LEANSERVE_[A-Z0-9_]+", path.read_text(encoding="utf-8")))
    # bench reads OPENAI_API_KEY, the client-side convention of every OpenAI tool, not a leanserve switch
    readers = [r for r in readers if not r.startswith("leanserve/bench/cli.py")]
    assert readers == [], f"read the environment through leanserve/env.py: {readers}"
    documented = set(re.findall(r"LEANSERVE_[A-Z0-9_]+", env.__doc__ or ""))
    assert named <= documented, f"document in leanserve/env.py: {sorted(named - documented)}"
