"""Tiny random-weight models of each family against HF transformers, through the paged path.

Each model is saved by transformers as an HF folder (config.json + safetensors) and loaded by
leanserve's loader, so the config translation, weight-name mapping and q/k/v and gate/up fusion
are all under test. Sequences are longer than the sliding windows and run as chunked prefill plus
decode over scattered blocks, batched with a second sequence.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from leanserve.model.config import ModelConfig
from leanserve.model.loader import build_model, iter_safetensors
from tests.model.helpers import paged_logits

SMALL = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             max_position_embeddings=256)

CASES = {
    "llama-gqa-tied": (transformers.LlamaConfig, dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama-mha-untied": (transformers.LlamaConfig, dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "llama3-rope-scaling": (transformers.LlamaConfig, dict(num_key_value_heads=2, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "linear-rope-scaling": (transformers.LlamaConfig, dict(num_key_value_heads=2, rope_parameters={
        "rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})),
    "qwen2-biases": (transformers.Qwen2Config, dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen3-qk-norm": (transformers.Qwen3Config, dict(num_key_value_heads=2, head_dim=16)),
    "mistral-sliding-window": (transformers.MistralConfig, dict(num_key_value_heads=2, sliding_window=8)),
    "gemma3-sliding-window": (transformers.Gemma3TextConfig, dict(
        num_hidden_layers=6, num_key_value_heads=1, head_dim=16, sliding_window=8, query_pre_attn_scalar=24)),
}


def _make(case: str, tmp_path):
    cls, extra = CASES[case]
    torch.manual_seed(0)
    cfg = cls(**{**SMALL, **extra})
    if cls is transformers.Gemma3TextConfig:
        cfg.architectures = ["Gemma3ForCausalLM"]
        hf = transformers.Gemma3ForCausalLM(cfg)
    else:
        hf = transformers.AutoModelForCausalLM.from_config(cfg)
    hf = hf.float().eval()
    with torch.no_grad():  # non-trivial norm weights, so a missing norm offset or wrong norm shows
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path)
    config = ModelConfig.from_hf_config(json.loads((tmp_path / "config.json").read_text()))
    ours = build_model(config, iter_safetensors(tmp_path), torch.float32, torch.device("cpu"))
    return hf, ours


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path):
    hf, ours = _make(case, tmp_path)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, SMALL["vocab_size"], (37,), generator=g).tolist(),
            torch.randint(0, SMALL["vocab_size"], (29,), generator=g).tolist()]
    with torch.no_grad():
        refs = [hf(torch.tensor([s])).logits[0] for s in seqs]
    # 13-token chunk, 11-token chunk, then one token per step
    for got, ref in zip(paged_logits(ours, seqs, [13, 11]), refs):
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)


def test_config_translation_gemma3(tmp_path):
    _, ours = _make("gemma3-sliding-window", tmp_path)
    c = ours.cfg
    assert c.layer_windows == (8, 8, 8, 8, 8, None)
    assert c.attention_scale == pytest.approx(24 ** -0.5)
    assert c.rope_local_theta == 10000.0 and c.rope_theta == 1_000_000.0
    assert c.tie_word_embeddings and c.qk_norm


def test_missing_tensor_is_a_clear_error(tmp_path):
    from safetensors.torch import load_file, save_file

    hf, _ = _make("llama-gqa-tied", tmp_path)
    path = next(tmp_path.glob("*.safetensors"))
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path)
    config = ModelConfig.from_hf_config(json.loads((tmp_path / "config.json").read_text()))
    with pytest.raises(ValueError, match="missing 1 tensors.*layers.1.mlp.gate_up_proj.weight#1"):
        build_model(config, iter_safetensors(tmp_path), torch.float32, torch.device("cpu"))
