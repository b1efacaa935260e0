"""The native decode loop's side in Python: ``NativeDecodePlan`` flattens a model's layers once into
the arguments of ``decode_layers`` (kernels/csrc/decode_layers.cpp), which runs every decoder layer
of a decode-only CPU step in one call: the same operators as the Python layers in the same order,
so the same bits, without ~13 Python-level calls a layer.

A family opts in with ``CausalLM.native_layer_norms``: for a layer, its norms in the loop's four
places (input, after attention, before the MLP, after the MLP; None where the family has none).
Llama has the first and third, Gemma 3 all four; q/k norms (Qwen3, Gemma 3) come from the attention.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from leanserve.model import layers
from leanserve.model.attention import paged_attention

if TYPE_CHECKING:
    from leanserve.model.base import CausalLM
    from leanserve.model.layers import Linear, RMSNorm


class NativeDecodePlan:
    """Built only where the native operators would run on the Python path too (CPU, float32 or
    bfloat16, the native kernels on, an activation the kernel has, the paged attention of
    ``attention.py``, float32 rotary tables, one eps and one norm offset); else ``build`` gives None."""

    def __init__(self, dtype: torch.dtype, weights: list[torch.Tensor], ints: list[int], floats: list[float],
                 positions: int) -> None:
        self.dtype, self.weights, self.ints, self.floats = dtype, weights, ints, floats
        self.positions = positions  # rows of the rotary tables it holds (they grow: CausalLM.ensure_positions)

    def takes(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
        """The KV cache is the model's dtype or the 8-bit one, on the CPU (checked on its first layer: one
        cache, one dtype): the native write_kv_ and paged_attention_decode take either."""
        k = kv_caches[0][0]
        return k.dtype in (self.dtype, torch.int8) and k.is_cpu

    @classmethod
    def build(cls, model: CausalLM) -> NativeDecodePlan | None:
        cfg = model.cfg
        dtype = model.model.embed_tokens.weight.dtype
        first = model.model.layers[0]
        act = layers._ACT_KERNEL.get(first.mlp.act)
        if (layers._fused_ops() is None or dtype not in (torch.float32, torch.bfloat16) or act is None
                or not model.model.norm.weight.is_cpu):
            return None
        none = torch.empty(0, dtype=dtype)
        weights: list[torch.Tensor] = []
        ints = [cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, act]
        for layer, window in zip(model.model.layers, cfg.layer_windows):
            norms = model.native_layer_norms(layer)
            if norms is None:
                return None
            attn, rope = layer.self_attn, layer.rope[0]
            all_norms = [n for n in (*norms, attn.q_norm, attn.k_norm) if n is not None]
            if (attn.attn_impl is not paged_attention or layer.mlp.act is not first.mlp.act
                    or rope.cos.dtype != torch.float32
                    or any(not _plain_norm(n, dtype, cfg.rms_norm_eps, model.norm_offset) for n in all_norms)):
                return None
            weights += [n.weight if n is not None else none for n in (*norms, attn.q_norm, attn.k_norm)]
            weights += [rope.cos, rope.sin]
            ints.append(window or 0)
            for lin in (attn.qkv_proj, attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
                lin_tensors = _linear_tensors(lin, none)
                if lin_tensors is None:
                    return None
                weights += lin_tensors
                ints += [lin.qweight.bits if lin.qweight else 0, lin.qweight.max_rows if lin.qweight else -1]
        positions = min(layer.rope[0].cos.shape[0] for layer in model.model.layers)
        return cls(dtype, weights, ints, [cfg.rms_norm_eps, first.self_attn.scale, model.norm_offset], positions)


def _plain_norm(norm: RMSNorm, dtype: torch.dtype, eps: float, offset: float) -> bool:
    # the native rms_norm runs it on the Python path too, with the loop's one eps and offset
    return norm.weight.dtype == dtype and norm.eps == eps and norm.offset == offset


def _linear_tensors(lin: Linear, none: torch.Tensor) -> list[torch.Tensor] | None:
    """qs, scales, mins, amx, weight, bias of a Linear for ``decode_layers`` (``none`` where absent),
    or None if it has a kind of weight the native loop does not run."""
    qw = lin.qweight
    weight = lin.weight if not lin.weight.is_meta else none  # packed for AMX, or blocks only: no plain weight
    if weight.numel() == 0 and lin.amx is None and qw is None:
        return None
    return [qw.qs if qw else none, qw.scales if qw else none, qw.mins if qw else none,
            lin.amx if lin.amx is not None else none, weight, lin.bias if lin.bias is not None else none]
