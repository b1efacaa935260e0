"""The Llama family: Llama 2/3, SmolLM2, Mistral, Qwen2 (q/k/v biases), Qwen3 (q/k norms)."""

from __future__ import annotations

import os

import torch
from torch import nn

from leanserve.model import layers
from leanserve.model.attention import AttentionMetadata, paged_attention
from leanserve.model.base import CausalLM
from leanserve.model.config import ModelConfig
from leanserve.model.layers import _ACT_KERNEL, GatedMLP, Linear, RMSNorm, RotaryEmbedding, SelfAttention


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
        # decode-only CPU steps run all layers in one native call where it applies (LEANSERVE_NATIVE_DECODE=0: never)
        self.native_decode = os.environ.get("LEANSERVE_NATIVE_DECODE", "1") != "0"
        self._plan: NativeDecodePlan | None | bool = False  # False: not built yet; None: does not apply

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        if self.native_decode and meta.decode_rows is not None and not meta.prefills:
            plan = self.native_plan()
            if plan is not None and plan.takes(kv_caches) and (ops := layers._fused_ops()) is not None:
                h = ops.decode_layers(self.embed(input_ids), positions, meta.slot_mapping, meta.decode_tables,
                                      meta.decode_lens, self.rope.cos, self.rope.sin, [t for kv in kv_caches for t in kv],
                                      plan.weights, plan.ints, plan.floats)
                return self.model.norm(h)
        return super().forward(input_ids, positions, meta, kv_caches)

    def native_plan(self) -> NativeDecodePlan | None:
        """The native loop's arguments, built on first use (after loading: weights, their quantized
        blocks and AMX packing are final by then); None where it does not apply. Set ``_plan = False``
        to rebuild after changing the model."""
        if self._plan is False:
            self._plan = NativeDecodePlan.build(self)
        return self._plan


class NativeDecodePlan:
    """The arguments of ``decode_layers`` (kernels/csrc/decode_layers.cpp) for a model and its KV
    cache: every layer's tensors and settings flattened once, so a decode step crosses from Python
    into native code once instead of ~13 times a layer. Built only where the native operators would
    run on the Python path too (CPU, float32 or bfloat16, the native kernels on, no q/k norms, an
    activation the kernel has, the paged attention of ``attention.py``); otherwise ``build`` gives None."""

    def __init__(self, dtype: torch.dtype, weights: list[torch.Tensor], ints: list[int], floats: list[float]) -> None:
        self.dtype, self.weights, self.ints, self.floats = dtype, weights, ints, floats

    def takes(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
        """The KV cache is the model's dtype on the CPU (checked on its first layer: one cache, one dtype)."""
        k = kv_caches[0][0]
        return k.dtype == self.dtype and k.is_cpu

    @classmethod
    def build(cls, model: LlamaForCausalLM) -> NativeDecodePlan | None:
        cfg = model.cfg
        dtype = model.model.embed_tokens.weight.dtype
        first = model.model.layers[0]
        act = _ACT_KERNEL.get(first.mlp.act)
        if (layers._fused_ops() is None or dtype not in (torch.float32, torch.bfloat16)
                or not model.model.embed_tokens.weight.is_cpu or act is None or model.rope.cos.dtype != torch.float32):
            return None
        none = torch.empty(0, dtype=dtype)
        weights: list[torch.Tensor] = []
        ints = [cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, act]
        for layer, window in zip(model.model.layers, cfg.layer_windows):
            attn = layer.self_attn
            norms = (layer.input_layernorm, layer.post_attention_layernorm)
            if (attn.q_norm is not None or attn.attn_impl is not paged_attention or layer.mlp.act is not first.mlp.act
                    or any(n.weight.dtype != dtype or n.offset or n.eps != cfg.rms_norm_eps for n in norms)):
                return None
            weights += [n.weight for n in norms]
            ints.append(window or 0)
            for lin in (attn.qkv_proj, attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
                lin_tensors = _linear_tensors(lin, none)
                if lin_tensors is None:
                    return None
                weights += lin_tensors
                ints += [lin.qweight.bits if lin.qweight else 0, lin.qweight.max_rows if lin.qweight else -1]
        return cls(dtype, weights, ints, [cfg.rms_norm_eps, first.self_attn.scale])


def _linear_tensors(lin: Linear, none: torch.Tensor) -> list[torch.Tensor] | None:
    """qs, scales, mins, amx, weight, bias of a Linear for ``decode_layers`` (``none`` where absent),
    or None if it has a kind of weight the native loop does not run."""
    qw = lin.qweight
    weight = lin.weight if lin.weight.device.type != "meta" else none  # packed for AMX: no plain weight
    if weight.numel() == 0 and lin.amx is None:
        return None
    return [qw.qs if qw else none, qw.scales if qw else none, qw.mins if qw else none,
            lin.amx if lin.amx is not None else none, weight, lin.bias if lin.bias is not None else none]
