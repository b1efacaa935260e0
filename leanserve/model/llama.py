"""The Llama family: Llama 2/3, SmolLM2, Mistral, Qwen2 (q/k/v biases), Qwen3 (q/k norms)."""

from __future__ import annotations

import torch
from torch import nn

from leanserve.model.attention import AttentionMetadata
from leanserve.model.base import CausalLM
from leanserve.model.config import ModelConfig
from leanserve.model.layers import GatedMLP, RMSNorm, RotaryEmbedding, SelfAttention


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, rope: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.rope = [rope]  # shared, kept out of the module tree

    def forward(self, h: torch.Tensor, positions: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), positions, self.rope[0], kv_cache, meta)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaForCausalLM(CausalLM):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.model.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i, self.rope) for i in range(cfg.num_layers))

    def native_layer_norms(self, layer: LlamaDecoderLayer) -> tuple[RMSNorm | None, ...]:
        return layer.input_layernorm, None, layer.post_attention_layernorm, None
