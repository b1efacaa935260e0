"""Write a GGUF model as an HF folder (safetensors) of its dequantized weights, for the quality and
speed runs that need a "float" model where no float checkpoint is at hand (no model hub here).

    .venv/bin/python benchmarks/gguf_to_hf.py gemma3-270m /tmp/gemma-hf
    .venv/bin/python benchmarks/gguf_to_hf.py smollm2-135m /tmp/smol-hf

The weights are gguf's dequantization of the file's blocks (transformers' GGUF loader; Gemma's norm
weights minus 1, which llama.cpp's converter adds), rounded to --dtype; checked here against gguf's
own dequantize for a few tensors of each type. The tokenizer is transformers' conversion of the
file's vocabulary, with add_bos_token / add_eos_token from the file's metadata (transformers leaves
them out; leanserve reads them from tokenizer_config.json); transformers writes the file's chat
template, where it has one, as chat_template.jinja. Such a folder's layers already hold quantized values: quantizing it again measures the loss
relative to the GGUF model, not to an original float checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from leanserve.model.loader import resolve

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a built-in model name or a .gguf path")
    ap.add_argument("dst", type=Path)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args()
    path = Path(resolve(args.model).path)
    if path.suffix != ".gguf":
        raise SystemExit(f"gguf_to_hf: {path} is not a GGUF file")
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=getattr(torch, args.dtype))
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # transformers dequantized every tensor into plain modules but keeps its GGUF quantizer attached,
    # which refuses save_pretrained: detach it, and write no quantization_config
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if args.dst.exists():
        shutil.rmtree(args.dst)
    model.save_pretrained(args.dst, safe_serialization=True)
    tokenizer.save_pretrained(args.dst)

    reader = GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    tok_cfg_path = args.dst / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    for key in ("add_bos_token", "add_eos_token"):
        tok_cfg[key] = bool(fields.get(f"tokenizer.ggml.{key}", False))
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")

    # the saved weights are gguf's values rounded to the dtype: the first tensor of each quantized type
    saved = load_file(str(args.dst / "model.safetensors"))
    checked = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind in checked or kind in ("F32", "F16", "BF16") or t.name not in GGUF_TO_HF_EXAMPLES:
            continue
        hname = GGUF_TO_HF_EXAMPLES[t.name]
        if hname not in saved:
            continue
        ref = dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)]).astype(np.float32)
        got = saved[hname]
        if not torch.equal(got, torch.from_numpy(ref).to(got.dtype)):
            raise SystemExit(f"gguf_to_hf: {hname} is not gguf's dequantization of {t.name} ({kind})")
        checked[kind] = t.name
    print(f"wrote {args.dst}: {len(saved)} tensors in {args.dtype}; equal to gguf's dequantization: "
          + ", ".join(f"{k} ({v})" for k, v in sorted(checked.items())))


# GGUF tensor names -> HF names, for the checks (layer 0 and the embedding)
GGUF_TO_HF_EXAMPLES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output.weight": "lm_head.weight",
    **{f"blk.0.{g}.weight": f"model.layers.0.{h}.weight" for g, h in [
        ("attn_v", "self_attn.v_proj"),  # (q and k: llama.cpp permutes Llama's rows, transformers undoes it)
        ("attn_output", "self_attn.o_proj"), ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
        ("ffn_down", "mlp.down_proj")]},
    **{f"blk.1.{g}.weight": f"model.layers.1.{h}.weight" for g, h in [
        ("attn_v", "self_attn.v_proj"), ("ffn_down", "mlp.down_proj")]},
}


if __name__ == "__main__":
    main()
