"""A model's shape for the planner, from a built-in name, a GGUF file, an HF folder or a config.json.

Only the description is read, never the weights: an HF folder needs just its ``config.json`` (so a
70B model can be planned without downloading it), a GGUF file its header (its tensor bytes are the
"as stored" size).
"""

from __future__ import annotations

import json
from pathlib import Path

from leanserve.model.config import ModelConfig
from leanserve.plan.roofline import ModelShape

# GGUF's general.file_type (llama.cpp's LLAMA_FTYPE) -> the name llama.cpp prints
GGUF_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
                   11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
                   17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}


def shape_from_config(name: str, cfg: ModelConfig, file_bytes: int | None = None,
                      file_format: str | None = None) -> ModelShape:
    return ModelShape(name=name, num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
                      intermediate_size=cfg.intermediate_size, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                      head_dim=cfg.head_dim, vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_word_embeddings,
                      layer_windows=tuple(cfg.layer_windows), max_context=cfg.max_position_embeddings,
                      file_bytes=file_bytes, file_format=file_format)


def load_shape(model: str) -> ModelShape:
    """ValueError with one line for anything that is not a model description."""
    from leanserve.model.registry import BUILTIN_MODELS

    path = Path(model).expanduser()
    if model in BUILTIN_MODELS or path.suffix == ".gguf":
        return _gguf_shape(model)
    if path.is_dir():
        path = path / "config.json"
    if path.name.endswith(".json"):
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"{path} not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read {path}: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path} is not an HF config.json (not a JSON object)")
        try:
            cfg = ModelConfig.from_hf_config(raw)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path} is not an HF config.json this planner understands: {e}") from None
        dtype = str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16")
        fmt = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}.get(dtype, dtype)
        name = path.parent.name or str(path)
        shape = shape_from_config(name, cfg, file_format=fmt)
        return shape
    raise ValueError(f"unknown model {model!r}: expected a built-in name ({', '.join(BUILTIN_MODELS)}), "
                     "a .gguf file, an HF folder or its config.json")


def _gguf_shape(model: str) -> ModelShape:
    from leanserve.model.loader import ModelNotFoundError, gguf_to_hf_config, open_gguf, read_gguf_metadata, resolve

    try:
        source = resolve(model)
        reader = open_gguf(source.path)
    except ModelNotFoundError as e:
        raise ValueError(str(e)) from None
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"{model} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    meta = read_gguf_metadata(reader)
    cfg = ModelConfig.from_hf_config(gguf_to_hf_config(meta, {t.name for t in reader.tensors}))
    file_bytes = int(sum(int(t.n_bytes) for t in reader.tensors))
    ftype = meta.get("general.file_type")
    fmt = GGUF_FILE_TYPES.get(int(ftype), f"file type {ftype}") if ftype is not None else None
    return shape_from_config(Path(model).stem if model.endswith(".gguf") else model, cfg, file_bytes, fmt)
