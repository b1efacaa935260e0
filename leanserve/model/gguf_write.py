"""`leanserve quantize SRC DST`: a float HF Llama, Qwen2 or Qwen3 model written as a GGUF file in
Q8_0 or Q4_1 blocks, the same blocks `--quantization int8|int4` makes at load.

The file holds what llama.cpp reads: the architecture's metadata (`llama`, `qwen2`, `qwen3`), its
tensor names (biases and q/k norms too), for Llama the q/k rows interleaved per head the way
llama.cpp's rope wants them (the loader's `_unpermute_rope` undoes it; llama.cpp's Qwen models use
HF's order), norms and biases in float32, and the BPE tokenizer's tokens, types and merges. Beside it,
``DST.tokenizer.json`` is the source's own tokenizer, which leanserve's loader prefers, so the
round trip tokenizes exactly as the source does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from leanserve.model.config import ModelConfig
from leanserve.model.quant import QUANTIZE_TYPES, quantize_weight

WRITABLE = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}  # -> GGUF arch
PRE_TOKENIZERS = {"llama": "default", "qwen2": "qwen2", "qwen3": "qwen2"}  # llama.cpp's pre-tokenizer names
FILE_TYPES = {"int8": 7, "int4": 3}  # llama.cpp's LLAMA_FTYPE: MOSTLY_Q8_0, MOSTLY_Q4_1
_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
          "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}


def gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    parts = hf.split(".")
    module = ".".join(parts[3:-1])
    if parts[:2] != ["model", "layers"] or len(parts) < 5 or module not in _NAMES:
        raise ValueError(f"unexpected tensor {hf!r} for a Llama or Qwen model")
    return f"blk.{parts[2]}.{_NAMES[module]}.{parts[-1]}"


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's q/k rows (each head's halves) -> llama.cpp's (pairs interleaved): convert_hf_to_gguf's permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tokenizer_metadata(folder: Path) -> dict[str, Any]:
    """tokens, token types, merges, special ids and chat template of an HF BPE tokenizer."""
    tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"leanserve quantize writes BPE tokenizers; {folder / 'tokenizer.json'} holds "
                         f"{model.get('type')!r}")
    added = {int(t["id"]): t for t in tj.get("added_tokens") or []}
    vocab = {str(t): int(i) for t, i in model["vocab"].items()}
    n = max([*vocab.values(), *added, -1]) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [5] * n  # UNUSED until named
    for t, i in vocab.items():
        tokens[i], types[i] = t, 1  # NORMAL
    for i, t in added.items():
        tokens[i], types[i] = t["content"], 3 if t.get("special") else 4  # CONTROL, USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    cfg_path = folder / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    template = tcfg.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")

    def token_id(key: str) -> int | None:
        v = tcfg.get(key)
        text = v.get("content") if isinstance(v, dict) else v
        return next((i for i, t in enumerate(tokens) if t == text), None) if text else None

    return {"tokens": tokens, "types": types, "merges": merges, "bos": token_id("bos_token"),
            "eos": token_id("eos_token"), "add_bos": bool(tcfg.get("add_bos_token", False)), "template": template}


def write_gguf(src: Path, dst: Path, quantization: str, log: Callable[[str], None] = lambda s: None) -> dict[str, int]:
    """Write ``dst`` (and ``dst``.tokenizer.json). Returns the count of tensors per GGUF type."""
    from gguf import GGMLQuantizationType, GGUFWriter

    from leanserve.model.loader import iter_safetensors

    if quantization not in QUANTIZE_TYPES:
        raise ValueError(f"unsupported quantization {quantization!r}; supported: {', '.join(QUANTIZE_TYPES)}")
    try:
        raw_cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{src} is not an HF model folder: {e}") from None
    cfg = ModelConfig.from_hf_config(raw_cfg)
    if cfg.architecture not in WRITABLE:
        raise ValueError(f"leanserve quantize writes {', '.join(WRITABLE)} models; {src} is {cfg.architecture}")
    arch = WRITABLE[cfg.architecture]
    if any(w is not None for w in cfg.layer_windows):
        raise ValueError(f"leanserve quantize does not write sliding-window attention yet ({src})")
    if cfg.rope_scaling and (cfg.rope_scaling.get("rope_type") or cfg.rope_scaling.get("type")) != "linear":
        raise ValueError(f"leanserve quantize does not write rope scaling {cfg.rope_scaling!r} yet")
    tok = tokenizer_metadata(src)
    layer_type, head_type = QUANTIZE_TYPES[quantization]
    w = GGUFWriter(str(dst), arch)
    w.add_name(src.name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    if cfg.head_dim != cfg.hidden_size // cfg.num_heads:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    if cfg.rope_scaling:
        from gguf import RopeScalingType

        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(FILE_TYPES[quantization])
    tokens = tok["tokens"] + [f"[PAD{i}]" for i in range(len(tok["tokens"]), cfg.vocab_size)]
    types = tok["types"] + [5] * (len(tokens) - len(tok["types"]))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(PRE_TOKENIZERS[arch])
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(tok["merges"])
    bos = tok["bos"] if tok["bos"] is not None else cfg.bos_token_id
    eos = tok["eos"] if tok["eos"] is not None else (cfg.eos_token_ids[0] if cfg.eos_token_ids else None)
    if bos is not None:
        w.add_bos_token_id(bos)
    if eos is not None:
        w.add_eos_token_id(eos)
    w.add_add_bos_token(tok["add_bos"])
    if tok["template"]:
        w.add_chat_template(tok["template"])
    counts: dict[str, int] = {}
    for hf, t in iter_safetensors(src):
        if hf == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        name = gguf_name(hf)
        a = t.float().numpy()
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            a = permute_rope(a, cfg.num_heads if "attn_q" in name else cfg.num_kv_heads)
        if a.ndim == 2 and a.shape[1] % 32 == 0:
            kind = head_type if name in ("token_embd.weight", "output.weight") else layer_type
            _, raw = quantize_weight(torch.from_numpy(np.ascontiguousarray(a)), kind)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=GGMLQuantizationType[kind])
        else:
            kind = "F32"
            w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))
        counts[kind] = counts.get(kind, 0) + 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    shutil.copyfile(src / "tokenizer.json", dst.with_suffix(".tokenizer.json"))
    log(f"wrote {dst}: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return counts
