"""Building blocks shared by the model families: RMSNorm, rotary embedding, gated MLP."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from leanserve import kernels
from leanserve.model.attention import AttentionMetadata, paged_attention, write_kv
from leanserve.model.config import ModelConfig
from leanserve.model.quant import QuantWeight, qlinear, qmatmul


class Linear(nn.Linear):
    """nn.Linear that may keep its weight in GGUF's quantized blocks (``qweight``) and, for bfloat16 on
    a CPU with AMX, packed into AMX tiles (``amx``), both attached by the loader. Up to
    ``qweight.max_rows`` rows, which are memory-bound, run the native kernel over the 4-8x smaller
    blocks; more rows are compute-bound: the AMX kernel on the packed weight, else BLAS on the float
    weight, or, where the blocks are the only copy (the plain weight is then a ``meta`` tensor),
    ``qlinear_dense`` (tiles dequantized, then the dense matmul)."""

    qweight: QuantWeight | None = None
    # kernels/csrc/amx_linear.cpp's packed copy of the weight; once set, the only one (the plain
    # weight is then a "meta" tensor: see CausalLM.attach_amx)
    amx: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the kernels take 2-D rows (the model's layout: (num_tokens, features)); other leading
        # dimensions are flattened and come back below
        rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        qw = self.qweight
        if qw is not None and rows.shape[0] <= qw.max_rows:
            y = qlinear(rows, qw)
        elif self.amx is not None:  # bfloat16 rows (the kernel says so otherwise)
            y = kernels.ops().amx_linear(rows, self.amx)
        elif qw is not None and self.weight.is_meta:  # blocks only
            y = qmatmul(rows, qw)
        else:
            return F.linear(x, self.weight, self.bias)
        if rows is not x:
            y = y.view(*x.shape[:-1], y.shape[-1])
        return y if self.bias is None else y + self.bias


class RMSNorm(nn.Module):
    """y = x / rms(x) * (offset + weight), computed in float32 like the reference implementations.

    Gemma stores the weight as a delta from 1 (offset=1.0); Llama stores it as is (offset=0.0).
    """

    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim), requires_grad=False)
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.is_cpu and x.dtype in (torch.float32, torch.bfloat16) and self.weight.dtype == x.dtype
                and (ops := _fused_ops()) is not None):  # one native call
            return ops.rms_norm(x, self.weight, self.eps, self.offset)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (x32 * (self.offset + self.weight.float())).to(dtype)
        return self.weight * x32.to(dtype)  # Llama casts before scaling


def _inv_freq(head_dim: int, base: float, scaling: dict[str, Any] | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for each rotated pair, and the attention factor for cos/sin (1 unless YaRN)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq, 1.0
    kind = scaling["rope_type"]
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "llama3":
        low_ff, high_ff = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths are slowed by `factor`, short ones kept, the band between interpolated
        smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
        scaled = torch.where(wavelen > old_len / low_ff, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / low_ff) & (wavelen >= old_len / high_ff)
        return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled), 1.0
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: linear, llama3)")


class RotaryEmbedding(nn.Module):
    """Rotary position embedding in the "rotate half" layout (HF's), looked up by absolute position.

    The cos/sin tables start at ``INITIAL_POSITIONS`` rows and grow (doubling, up to the model's
    ``max_positions``) when a step reaches past them (``ensure``): Gemma 3's two tables for 32k
    positions would hold 67 MB, a quarter of its quantized weights, for contexts few requests reach.
    Each row is the same whatever the table's length (an element-wise product, then cos/sin)."""

    INITIAL_POSITIONS = 4096

    def __init__(self, head_dim: int, max_positions: int, base: float, scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        inv_freq, attn_factor = _inv_freq(head_dim, base, scaling)
        self.inv_freq, self.attn_factor, self.max_positions = inv_freq, attn_factor, max_positions
        self.register_buffer("cos", torch.empty(0, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(0, head_dim // 2), persistent=False)
        self.ensure(min(max_positions, self.INITIAL_POSITIONS))

    def ensure(self, positions: int) -> bool:
        """Tables for at least ``positions`` positions (capped at the model's); True if they grew."""
        have = self.cos.shape[0]
        if positions <= have or have >= self.max_positions:
            return False
        n = min(self.max_positions, max(positions, 2 * have))
        t = torch.arange(n, dtype=torch.float32, device=self.cos.device)
        freqs = torch.outer(t, self.inv_freq.to(t.device))  # (n, head_dim / 2)
        self.cos, self.sin = freqs.cos() * self.attn_factor, freqs.sin() * self.attn_factor
        return True

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # q: (num_tokens, num_heads, head_dim), k: (num_tokens, num_kv_heads, head_dim). The native
        # kernel rotates q and k in place (callers pass temporaries): use the returned tensors. cos/sin
        # are float32 in every model dtype (built from explicit float32 tensors), as is _rotate's math.
        if (q.is_cpu and q.dtype == k.dtype and q.dtype in (torch.float32, torch.bfloat16)
                and self.cos.dtype == torch.float32 and positions.dtype == torch.int64
                and (ops := _fused_ops()) is not None):
            ops.rotary_(q, k, self.cos, self.sin, positions)
            return q, k
        cos = self.cos[positions].unsqueeze(1)  # (num_tokens, 1, head_dim / 2)
        sin = self.sin[positions].unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x = [x1 | x2] halves; (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), in float32
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def _fused_ops() -> Any | None:
    """``torch.ops.leanserve`` with the fused float32/bfloat16 CPU kernels (kernels/csrc/fused.cpp)
    for RMSNorm, RoPE and the MLP activation, or None: then the PyTorch code runs. Asked only for
    float32 or bfloat16 CPU tensors, so CUDA never builds the CPU kernels; tests patch it to None."""
    return kernels.ops()


ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}
# activations the native act_mul computes (its `act` code); others run in PyTorch
_ACT_KERNEL = {ACTIVATIONS["silu"]: 0, ACTIVATIONS["gelu_pytorch_tanh"]: 1}


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)); gate and up are one fused matmul (gate_up_proj)."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str) -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"unsupported activation {act!r} (supported: {', '.join(ACTIVATIONS)})")
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)
        self.act = ACTIVATIONS[act]
        self.intermediate_size = intermediate_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        act = _ACT_KERNEL.get(self.act)
        if (act is not None and gate_up.is_cpu and gate_up.dtype in (torch.float32, torch.bfloat16)
                and (ops := _fused_ops()) is not None):
            return self.down_proj(ops.act_mul(gate_up, act))  # act(gate) * up in one native call
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(self.act(gate) * up)


class SelfAttention(nn.Module):
    """Fused QKV projection, optional per-head q/k RMSNorm, RoPE, paged attention, output projection."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, norm_offset: float = 0.0) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, norm_offset)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, norm_offset)
        else:
            self.q_norm = self.k_norm = None
        self.window = cfg.layer_windows[layer_idx]
        self.scale = cfg.attention_scale
        self.attn_impl = paged_attention

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)  # (num_tokens, num_heads, head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)  # (num_tokens, num_kv_heads, head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope(positions, q, k)
        write_kv(kv_cache[0], kv_cache[1], k, v, meta.slot_mapping)
        out = self.attn_impl(q, kv_cache[0], kv_cache[1], meta, self.scale, self.window)
        return self.o_proj(out.reshape(n, self.q_size))
