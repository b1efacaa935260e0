"""The compiled-kernel cache: one folder per (source, headers, flags, torch version), loaded as it is."""

import os
import subprocess
import sys

import pytest

from leanserve import kernels

needs_kernels = pytest.mark.skipif(kernels.ops() is None, reason=kernels.status())


def test_build_folder_names_source_flags_and_torch(monkeypatch, tmp_path):
    monkeypatch.setenv("LEANSERVE_HOME", str(tmp_path))
    source = kernels.CSRC / "qlinear.cpp"
    first = kernels._build_dir(source)
    assert first == kernels._build_dir(source)  # the same inputs, the same folder
    assert first.parent == tmp_path / "kernels" and first.name.startswith("qlinear-torch")
    monkeypatch.setattr(kernels, "CFLAGS", kernels.CFLAGS + ("-O2",))
    assert kernels._build_dir(source) != first  # other flags: another library


@needs_kernels
def test_cached_libraries_load_without_the_compiler():
    # This process built (or found) every library. Another process, whatever its virtual
    # environment, must load them as they are: cpp_extension.load regenerates its ninja file with
    # the running environment's torch paths, and another checkout's .venv then recompiled all of
    # them, silently. Here the compiler path raises, so any rebuild fails the test.
    code = (
        "import torch.utils.cpp_extension as c\n"
        "def boom(*a, **k): raise RuntimeError('compiled')\n"
        "c.load = boom\n"
        "from leanserve import kernels\n"
        "assert kernels.ops() is not None, kernels.status()\n"
        "print(kernels.status())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert out.returncode == 0, out.stderr
    assert "native CPU kernels: on" in out.stdout
    assert "compiling" not in out.stderr
