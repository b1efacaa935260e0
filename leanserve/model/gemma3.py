"""Gemma 3 (text): sliding-window layers with their own RoPE base, q/k norms, four norms per layer,
embeddings scaled by sqrt(hidden_size), GELU-tanh MLP, RMSNorm weights stored as (weight - 1)."""

from __future__ import annotations

import torch
from torch import nn

from leanserve.model.attention import AttentionMetadata
from leanserve.model.base import CausalLM
from leanserve.model.config import ModelConfig
from leanserve.model.layers import GatedMLP, RMSNorm, RotaryEmbedding, SelfAttention


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, rope: RotaryEmbedding) -> None:
        super().__init__()
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, 1.0)
        self.self_attn = SelfAttention(cfg, layer_idx, norm_offset=1.0)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, 1.0)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, 1.0)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, 1.0)
        self.rope = [rope]

    def forward(self, h: torch.Tensor, positions: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(h), positions, self.rope[0], kv_cache, meta)
        h = h + self.post_attention_layernorm(attn)
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Gemma3ForCausalLM(CausalLM):
    norm_offset = 1.0

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.rope_global = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.rope_local = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_local_theta or 10000.0)
        self.model.layers = nn.ModuleList(
            Gemma3DecoderLayer(cfg, i, self.rope_global if cfg.layer_windows[i] is None else self.rope_local)
            for i in range(cfg.num_layers)
        )

    def native_layer_norms(self, layer: Gemma3DecoderLayer) -> tuple[RMSNorm | None, ...]:
        return (layer.input_layernorm, layer.post_attention_layernorm, layer.pre_feedforward_layernorm,
                layer.post_feedforward_layernorm)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = super().embed(input_ids)
        # the reference rounds the scale to the activation dtype first
        return h * torch.tensor(self.cfg.hidden_size ** 0.5, dtype=h.dtype)
