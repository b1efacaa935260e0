"""Weights kept in GGUF's quantized blocks, for the native ``qlinear`` kernel (kernels/csrc/qlinear.cpp).

Decoding one sequence on a CPU reads every weight once per token, so its speed is memory
bandwidth over weight bytes. GGUF files already hold the weights in blocks of 32 with a float16
scale (and a min): Q4_1 is 0.625 bytes a weight against 4 for float32. leanserve keeps those blocks
next to the float32 weights and small batches read them instead; big batches are compute-bound and
use the float32 weights with BLAS.

One format covers the simple GGUF types exactly: per block of 32, ``w = scale * q + min`` with q
of 4 bits (packed two to a byte, GGUF's order) or 8 bits (int8):

    Q4_0  w = d * (q - 8)        -> 4-bit, scale d, min -8d
    Q4_1  w = d * q + m          -> 4-bit, scale d, min m
    Q5_0  w = d * (q - 16)       -> 8-bit, q - 16, scale d, min 0
    Q5_1  w = d * q + m          -> 8-bit, scale d, min m
    Q8_0  w = d * q              -> 8-bit, scale d, min 0

Where every min is zero (Q8_0, Q5_0) none is stored, and the kernel reads none. Every ``scale * q`` is exact in float32 (a float16 scale times at most 8 bits), so
``dequantize`` equals gguf's own dequantization bit for bit (tests check it). K-quants (Q4_K, Q6_K, ...) have other
block layouts; their tensors stay float32 only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from leanserve import kernels

BLOCK = 32
# Rows of x up to which qlinear beats the dense matmul on the model's float weights, per dtype of
# those weights: (layers, LM head), from benchmarks/qlinear.py. float32 (the dtype `auto` picks on
# CPUs without native bfloat16), BLAS on a 2-core AVX2 EPYC: SmolLM2's layers together break even
# near 32 rows (1.3x faster at 16); its 49152-row LM head, where BLAS is slow, was still 1.4x faster
# at 128. bfloat16, oneDNN with AMX on a 2-core Xeon: ~2x faster at 1 row, even at 4-8 rows (whole
# decode steps: even at 8 rows, slower at 12).
KERNEL_ROWS = {torch.float32: (24, 256), torch.bfloat16: (8, 4)}
# With AMX (kernels/csrc/amx_linear.cpp on the packed bfloat16 weights) the dense side is faster:
# whole bf16 decode steps of SmolLM2, 4 rows: qlinear 23.7 ms, AMX 27-29; 8 rows: qlinear 34.4, AMX 30-31.
AMX_KERNEL_ROWS = 4


@dataclass
class QuantWeight:
    qs: torch.Tensor  # 4 bits: (N, ceil(K / 64) * 8) int32 holding bytes, see _pack4; 8 bits: (N, K) int8
    scales: torch.Tensor  # (N, K / 32) float32
    mins: torch.Tensor  # (N, K / 32) float32, or (N, 0) where every min is zero (Q8_0, Q5_0): none to read
    bits: int
    max_rows: int = KERNEL_ROWS[torch.float32][0]  # the Linear layer uses the kernel up to this many rows of x

    @property
    def shape(self) -> tuple[int, int]:
        return self.qs.shape[0], self.scales.shape[1] * BLOCK

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.scales, self.mins))

    def dequantize(self) -> torch.Tensor:
        n, k = self.shape
        if self.bits == 4:
            q = torch.from_numpy(_unpack4(self.qs.numpy(), k)).view(n, k // BLOCK, BLOCK).float()
        else:
            q = self.qs.view(n, k // BLOCK, BLOCK).float()
        if self.mins.numel() == 0:
            return (q * self.scales[..., None]).reshape(n, k)
        return torch.addcmul(self.mins[..., None], q, self.scales[..., None]).reshape(n, k)

    def rows(self, index: np.ndarray) -> "QuantWeight":
        idx = torch.from_numpy(np.asarray(index, dtype=np.int64))
        return QuantWeight(self.qs[idx].contiguous(), self.scales[idx].contiguous(), self.mins[idx].contiguous(), self.bits)

    @staticmethod
    def cat(parts: list["QuantWeight"]) -> "QuantWeight | None":
        """Row-wise concatenation (fused q/k/v, gate/up); None if the parts differ in format."""
        if len({p.bits for p in parts}) != 1 or len({p.shape[1] for p in parts}) != 1:
            return None
        mins = [p.mins for p in parts]
        if any(m.numel() for m in mins):  # some parts have mins: the others' zeros spelled out
            mins = [m if m.numel() else torch.zeros_like(p.scales) for m, p in zip(mins, parts)]
        return QuantWeight(torch.cat([p.qs for p in parts]), torch.cat([p.scales for p in parts]),
                           torch.cat(mins), parts[0].bits, parts[0].max_rows)


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)[..., 0]


def from_gguf_blocks(raw: np.ndarray, type_name: str, n: int, k: int) -> QuantWeight | None:
    """Raw GGUF bytes of an (n, k) tensor -> QuantWeight, or None for a type this format can't hold."""
    layouts = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34}
    if type_name not in layouts or k % BLOCK:
        return None
    b = np.asarray(raw, dtype=np.uint8).reshape(n, k // BLOCK, layouts[type_name])
    d = _f16(b[..., 0:2])
    none = np.zeros((n, 0), np.float32)  # all mins zero: none stored, none read
    if type_name in ("Q4_0", "Q4_1"):
        lo = b[..., 2:18] if type_name == "Q4_0" else b[..., 4:20]  # byte i: element i, i + 16
        q = np.concatenate((lo & 0x0F, lo >> 4), axis=-1).reshape(n, k)
        mins = -8.0 * d if type_name == "Q4_0" else _f16(b[..., 2:4])
        return _make(_pack4(q), d, mins, 4)
    if type_name == "Q8_0":
        return _make(b[..., 2:34].view(np.int8).reshape(n, k), d, none, 8)
    # Q5_x: 16 bytes of low nibbles (as Q4) plus 32 high bits, element j's bit is bit j of qh
    mins, qh_at, qs_at = (none, 2, 6) if type_name == "Q5_0" else (_f16(b[..., 2:4]), 4, 8)
    qh = np.ascontiguousarray(b[..., qh_at:qh_at + 4]).view("<u4")  # (n, groups, 1)
    high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << 4  # (n, groups, 32)
    lo = b[..., qs_at:qs_at + 16]
    q = np.concatenate((lo & 0x0F, lo >> 4), axis=-1) | high  # 0..31
    if type_name == "Q5_0":
        q = q.astype(np.int16) - 16
    return _make(q.astype(np.int8).reshape(n, k), d, mins, 8)


# --quantization at load: the GGUF type each weight becomes (the LM head / tied embedding stays at 8 bits,
# as llama.cpp's 4-bit files keep it)
QUANTIZE_TYPES = {"int8": ("Q8_0", "Q8_0"), "int4": ("Q4_1", "Q8_0")}


def quantize_weight(w: torch.Tensor, type_name: str) -> tuple[QuantWeight, np.ndarray]:
    """A float (N, K) weight, K a multiple of 32, in GGUF blocks of ``type_name`` (gguf's reference
    quantizer, llama.cpp's rounding): its QuantWeight and the raw block bytes."""
    from gguf import GGMLQuantizationType, quants

    n, k = w.shape
    if k % BLOCK:
        raise ValueError(f"cannot quantize a ({n}, {k}) weight in blocks of {BLOCK}")
    raw = quants.quantize(w.detach().float().cpu().numpy(), GGMLQuantizationType[type_name])
    qw = from_gguf_blocks(raw, type_name, n, k)
    assert qw is not None
    return qw, raw


def _pack4(q: np.ndarray) -> np.ndarray:
    """(N, K) values 0..15 -> the kernel's 4-bit layout: blocks in pairs, 32 bytes a pair, byte i
    holding weight i of the first block in its low nibble and weight i of the second in its high
    one, so a widening load and a shift give 32 consecutive weights; an odd last block leaves the
    high nibbles zero (never read). Stored as int32 (N, pairs * 8)."""
    n, k = q.shape
    pairs = -(-k // 64)
    q = np.pad(q.astype(np.uint8), ((0, 0), (0, pairs * 64 - k))).reshape(n, pairs, 2, 32)
    return np.ascontiguousarray(q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, pairs * 32).view(np.int32)


def _unpack4(qs: np.ndarray, k: int) -> np.ndarray:
    b = np.ascontiguousarray(qs).view(np.uint8).reshape(qs.shape[0], -1, 1, 32)  # (N, pair, 1, i)
    q = np.concatenate((b & 0xF, b >> 4), axis=2)  # (N, pair, block, i)
    return q.reshape(qs.shape[0], -1)[:, :k]


def _make(qs: np.ndarray, scales: np.ndarray, mins: np.ndarray, bits: int) -> QuantWeight:
    return QuantWeight(torch.from_numpy(np.ascontiguousarray(qs)), torch.from_numpy(np.ascontiguousarray(scales, np.float32)),
                       torch.from_numpy(np.ascontiguousarray(mins, np.float32)), bits)


def qlinear(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """x (M, K) float32 or bfloat16 @ dequantize(w).T with the native kernel; (M, N) in x's dtype."""
    return kernels.ops().qlinear(x, w.qs, w.scales, w.mins, w.bits)
