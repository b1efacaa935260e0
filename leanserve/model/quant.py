"""Weights kept in GGUF's quantized blocks, for the native kernels (kernels/csrc/qlinear.cpp).

Decoding one sequence on a CPU reads every weight once per token, so its speed is memory
bandwidth over weight bytes. GGUF files hold the weights in blocks of 32 with a float16 scale (and a
min): Q4_1 is 0.625 bytes a weight against 2 for bfloat16. On a CPU with the native kernels the
blocks are a quantized weight's only copy: small batches read them (``qlinear``), big ones, bound by
FLOPs, dequantize tiles of them for the dense matmul (``qlinear_dense``; ``qmatmul`` picks).

One format covers the GGUF types the kernels read, exactly: per block of 32, ``w = scale * q + min``
with q of 4 bits (packed two to a byte, see ``_pack4``), 5 bits (those 4 bits, then a uint32 of
high bits a block, see ``_pack5``) or 8 bits (int8):

    Q4_0  w = d * (q - 8)        -> 4-bit, scale d, min -8d
    Q4_1  w = d * q + m          -> 4-bit, scale d, min m
    Q5_0  w = d * (q - 16)       -> 5-bit, scale d, min -16d
    Q5_1  w = d * q + m          -> 5-bit, scale d, min m
    Q8_0  w = d * q              -> 8-bit, scale d, min 0
    Q4_K  w = (d sc) q - dmin m  -> 4-bit, float32 scale d*sc and min -dmin*m per 32 (sc, m: 6 bits)
    Q5_K  the same, 5-bit q      -> 5-bit
    Q6_K  w = (d sc) (q - 32)    -> 8-bit, float32 scale per 16 (``block`` 16), min 0

GGUF's own float16 scales stay float16; a K-quant's products are exact in float32 only. Where every
min is zero none is stored, and the kernel reads none. Every ``scale * q`` is exact in float32, so
``dequantize`` equals gguf's own dequantization bit for bit (tests check it).
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
# Without a float copy (the default for quantized weights on the CPU): rows of x up to which qlinear
# beats qlinear_dense (each core dequantizing L2-sized tiles of W, then the dense matmul), per dtype
# of x and bits of the values. benchmarks/qlinear.py --dense --layers-only over SmolLM2's layer
# shapes on the 2-vCPU AVX-512 EPYC (ms, qlinear vs tiles): bfloat16 Q4_1 20.0 vs 21.4 at 16 rows,
# 25.2 vs 23.5 at 20; Q5_0 (5-bit) 20.9 vs 21.7 at 14, 23.8 vs 22.5 at 16; Q8_0 (widened to float32
# per row group) 16.2 vs 16.6 at 8, 23.1 vs 18.9 at 12; float32 Q4_1 and Q8_0 even at 32 rows (48.2 vs
# 46.1, 49.8 vs 51.9; 50.0 vs 51.8), tiles ahead at 48. (5-bit values only with bfloat16 rows: five_bits_pay.)
QUANT_ONLY_ROWS = {torch.float32: {4: 32, 8: 32}, torch.bfloat16: {4: 16, 5: 14, 8: 8}}


def five_bits_pay(dtype: torch.dtype) -> bool:
    """Whether 5-bit values (Q5_0, Q5_1, Q5_K) stay in 5 bits for rows of ``dtype``, else they are
    widened to 8 at load. The AVX512-BF16 kernel (bfloat16 rows) turns them into bf16 with one table
    lookup and reads 30% fewer bytes: 1.18x faster than the same values in 8 bits at one row, 1.3x at
    8 (benchmarks/qlinear.py --dense --layers-only --layer-format Q5_0, 2-vCPU AVX-512 EPYC). The AVX2
    code (float32 rows, or no AVX512-BF16) spends ~10 instructions a value on them against 4 on 8-bit
    ones: 0.54x at one row."""
    ops = kernels.ops()
    return dtype == torch.bfloat16 and ops is not None and ops.avx512_bf16_available()


@dataclass
class QuantWeight:
    qs: torch.Tensor  # 4 bits: (N, ceil(K / 64) * 8) int32 holding bytes, see _pack4; 5 bits: _pack5; 8 bits: (N, K) int8
    scales: torch.Tensor  # (N, K / block) float16 (GGUF's own scales) or float32 (K-quants' products)
    mins: torch.Tensor  # (N, K / 32) in the scales' dtype, or (N, 0) where every min is zero (Q8_0, Q6_K)
    bits: int
    max_rows: int = KERNEL_ROWS[torch.float32][0]  # the Linear layer uses the kernel up to this many rows of x
    block: int = BLOCK  # values per scale: 32, or 16 (Q6_K; 8-bit, float32 scales; mins still per 32)

    @property
    def shape(self) -> tuple[int, int]:
        return self.qs.shape[0], self.scales.shape[1] * self.block

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.scales, self.mins))

    def dequantize(self) -> torch.Tensor:
        n, k = self.shape
        if self.bits != 8:
            q = torch.from_numpy(_unpack(self.qs.numpy(), k, self.bits)).view(n, k // self.block, self.block).float()
        else:
            q = self.qs.view(n, k // self.block, self.block).float()
        w = q * self.scales.float()[..., None]  # exact: a float16 or K-quant scale times at most 8 bits
        if self.mins.numel():
            w = w.view(n, k // BLOCK, BLOCK) + self.mins.float()[..., None]
        return w.reshape(n, k)

    def lookup(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``ids`` dequantized, in ``dtype``: an embedding lookup on a quantized table (the values
        the float table would hold: float32 dequantization, one rounding to ``dtype``)."""
        flat = ids.reshape(-1)
        part = QuantWeight(self.qs[flat], self.scales[flat], self.mins[flat], self.bits, block=self.block)
        return part.dequantize().to(dtype).view(*ids.shape, self.shape[1])

    def rows(self, index: np.ndarray) -> "QuantWeight":
        idx = torch.from_numpy(np.asarray(index, dtype=np.int64))
        return QuantWeight(self.qs[idx].contiguous(), self.scales[idx].contiguous(), self.mins[idx].contiguous(),
                           self.bits, block=self.block)

    def widened(self, bits: int = 8) -> "QuantWeight":
        """The same values in the layout of ``bits`` (4-bit values as 5-bit or int8, 5-bit as int8)."""
        if self.bits == bits:
            return self
        n, k = self.shape
        q = _unpack(self.qs.numpy(), k, self.bits)
        if bits != 8:
            return QuantWeight(torch.from_numpy(_pack5(q)), self.scales, self.mins, bits, self.max_rows, self.block)
        mins, centre = self.mins, 1 << (self.bits - 1)
        if mins.numel() and torch.equal(mins.float(), -centre * self.scales.float()):
            # Q4_0's -8 d, Q5_0's -16 d: signed values q - 8 or q - 16 need no mins at 8 bits (same values)
            q, mins = q.astype(np.int16) - centre, mins[:, :0]
        return QuantWeight(torch.from_numpy(q.astype(np.int8)), self.scales, mins.contiguous(), 8, self.max_rows, self.block)

    def halved(self) -> "QuantWeight":
        """The same values with a float32 scale per 16 (each block's scale twice; mins stay per 32), 8-bit."""
        if self.block == 16:
            return self
        wide = self.widened(8)  # the kernels read a scale per 16 with 8-bit values only
        return QuantWeight(wide.qs, self.scales.float().repeat_interleave(2, dim=1).contiguous(), wide.mins.float(),
                           8, self.max_rows, 16)

    @staticmethod
    def cat(parts: list["QuantWeight"]) -> "QuantWeight | None":
        """Row-wise concatenation (fused q/k/v, gate/up). Parts of different formats meet in the wider
        one, exactly: values widened to the most bits, a scale per 32 repeated per 16, float16 scales
        as float32; None where the widths differ."""
        if len({p.shape[1] for p in parts}) != 1:
            return None
        if len({p.bits for p in parts}) > 1:
            bits = max(p.bits for p in parts)
            parts = [p.widened(bits) for p in parts]
        if len({p.block for p in parts}) > 1:
            parts = [p.halved() for p in parts]  # (8-bit values: the only ones with a scale per 16)
        dtype = torch.float16 if all(p.scales.dtype == torch.float16 for p in parts) else torch.float32
        mins = [p.mins for p in parts]
        if any(m.numel() for m in mins):  # some parts have mins: the others' zeros spelled out
            mins = [m if m.numel() else torch.zeros(p.shape[0], p.shape[1] // BLOCK, dtype=p.scales.dtype) for m, p in zip(mins, parts)]
        return QuantWeight(torch.cat([p.qs for p in parts]), torch.cat([p.scales.to(dtype) for p in parts]),
                           torch.cat([m.to(dtype) for m in mins]), parts[0].bits, parts[0].max_rows, parts[0].block)


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16)[..., 0]


# GGUF types whose blocks the kernel reads as they are (after a change of layout at load), and bytes a block
SIMPLE_TYPES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34}
K_TYPES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}  # super-blocks of 256 values


def from_gguf_blocks(raw: np.ndarray, type_name: str, n: int, k: int) -> QuantWeight | None:
    """Raw GGUF bytes of an (n, k) tensor -> QuantWeight, or None for a type this format can't hold."""
    if type_name in K_TYPES:
        return _from_k_blocks(raw, type_name, n, k)
    if type_name not in SIMPLE_TYPES or k % BLOCK:
        return None
    b = np.asarray(raw, dtype=np.uint8).reshape(n, k // BLOCK, SIMPLE_TYPES[type_name])
    d = _f16(b[..., 0:2])
    none = np.zeros((n, 0), np.float16)  # all mins zero: none stored, none read
    if type_name == "Q8_0":
        return _make(b[..., 2:34].view(np.int8).reshape(n, k), d, none, 8)
    # Q4_x: 16 bytes, byte i holding element i and i + 16; Q5_x: the same for the low 4 bits, after 32
    # high bits (element j's is bit j of qh); Q4_1/Q5_1 have a float16 min after d
    bits = 4 if type_name in ("Q4_0", "Q4_1") else 5
    with_min = type_name.endswith("_1")
    qs_at = 2 + 2 * with_min + 4 * (bits == 5)
    lo = b[..., qs_at:qs_at + 16]
    q = np.concatenate((lo & 0x0F, lo >> 4), axis=-1)  # (n, groups, 32)
    if bits == 5:
        q |= _high_bits(np.ascontiguousarray(b[..., qs_at - 4:qs_at]).view("<u4")[..., 0])  # 0..31
    if with_min:
        mins = _f16(b[..., 2:4])
    else:  # -8 d or -16 d: exact in float16 unless it overflows (then float32, also exact)
        mins32 = -float(1 << (bits - 1)) * d.astype(np.float32)
        mins = mins32.astype(np.float16) if np.isfinite(mins32.astype(np.float16)).all() else mins32
        d = d if mins.dtype == np.float16 else d.astype(np.float32)
    q = q.reshape(n, k)
    return _make(_pack4(q) if bits == 4 else _pack5(q), d, mins, bits)


def _from_k_blocks(raw: np.ndarray, type_name: str, n: int, k: int) -> QuantWeight | None:
    """K-quants: super-blocks of 256 values with a float16 scale (and min scale) and 6- or 8-bit
    sub-scales. Each sub-block's scale ``d * sc`` (and min ``-dmin * m``) is exact in float32, so
    ``scale * q + min`` is the value gguf dequantizes to, bit for bit:
        Q4_K  8 x 32 values of 4 bits -> 4-bit, a float32 scale and min per 32
        Q5_K  8 x 32 values of 5 bits -> 5-bit, a float32 scale and min per 32
        Q6_K  16 x 16 values of 6 bits -> 8-bit (q - 32), a float32 scale per 16, no mins"""
    from gguf.quants import Q4_K

    if k % 256:
        return None
    b = np.asarray(raw, dtype=np.uint8).reshape(n * (k // 256), K_TYPES[type_name])
    nb = b.shape[0]
    if type_name in ("Q4_K", "Q5_K"):
        d = b[:, 0:2].copy().view(np.float16).astype(np.float32)  # (nb, 1)
        dmin = b[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, m = Q4_K.get_scale_min(b[:, 4:16])  # (nb, 8) each, 6 bits
        scales = (d * sc.astype(np.float32)).reshape(n, k // 32)
        mins = -(dmin * m.astype(np.float32)).reshape(n, k // 32)
        if type_name == "Q4_K":  # 128 bytes: 4 x 32, low nibbles sub-block 2i, high ones 2i + 1
            qs = b[:, 16:144].reshape(nb, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
            return _make(_pack4((qs & 0x0F).reshape(n, k)), scales, mins, 4)
        qh = b[:, 16:48].reshape(nb, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)  # bit i: sub-block i
        ql = b[:, 48:176].reshape(nb, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        q = (ql & 0x0F).reshape(nb, 8, 32) | ((qh & 1) << 4)
        return _make(_pack5(q.reshape(n, k)), scales, mins, 5)
    ql = b[:, 0:128].reshape(nb, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    ql = (ql & 0x0F).reshape(nb, 2, 2, 2, 32)  # (half, nibble, 64-chunk, 32)
    ql = ql.reshape(nb, 2, 4, 32)
    qh = b[:, 128:192].reshape(nb, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    q = (ql | ((qh & 3) << 4)).astype(np.int16) - 32  # (nb, 2, 4, 32)
    d = b[:, 208:210].copy().view(np.float16).astype(np.float32)  # (nb, 1)
    scales = (d * b[:, 192:208].view(np.int8).astype(np.float32)).reshape(n, k // 16)
    qw = _make(q.astype(np.int8).reshape(n, k), scales, np.zeros((n, 0), np.float32), 8)
    qw.block = 16
    return qw


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


def _pack5(q: np.ndarray) -> np.ndarray:
    """(N, K) values 0..31 -> the kernel's 5-bit layout: the low 4 bits as ``_pack4`` lays them out,
    then a uint32 a block whose bit i is bit 4 of the block's value i (GGUF Q5's qh). int32 rows."""
    n, k = q.shape
    high = ((q.astype(np.uint32) >> 4) & 1).reshape(n, k // BLOCK, BLOCK) << np.arange(BLOCK, dtype=np.uint32)
    return np.concatenate((_pack4(q & 0x0F), high.sum(axis=-1, dtype=np.uint32).view(np.int32)), axis=1)


def _unpack(qs: np.ndarray, k: int, bits: int) -> np.ndarray:
    """The 4- or 5-bit layout -> (N, K) values as uint8."""
    n = qs.shape[0]
    pairs = -(-k // 64)
    b = np.ascontiguousarray(qs).view(np.uint8)
    nib = b[:, :pairs * 32].reshape(n, pairs, 1, 32)  # (N, pair, 1, i)
    q = np.concatenate((nib & 0xF, nib >> 4), axis=2).reshape(n, -1)[:, :k]  # (N, pair, block, i)
    if bits == 5:
        q = q | _high_bits(np.ascontiguousarray(b[:, pairs * 32:]).view("<u4")).reshape(n, k)
    return q


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """GGUF Q5 high bits, a uint32 a block (bit i: value i's bit 4) -> (..., 32) uint8 of 0 or 16."""
    return ((qh[..., None] >> np.arange(BLOCK, dtype=np.uint32)) & 1).astype(np.uint8) << 4


def _make(qs: np.ndarray, scales: np.ndarray, mins: np.ndarray, bits: int) -> QuantWeight:
    dtype = np.float16 if scales.dtype == np.float16 and mins.dtype == np.float16 else np.float32
    return QuantWeight(torch.from_numpy(np.ascontiguousarray(qs)), torch.from_numpy(np.ascontiguousarray(scales, dtype)),
                       torch.from_numpy(np.ascontiguousarray(mins, dtype)), bits)


def qlinear(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """x (M, K) float32 or bfloat16 @ dequantize(w).T with the native kernel; (M, N) in x's dtype."""
    return kernels.ops().qlinear(x, w.qs, w.scales, w.mins, w.bits)


def qmatmul(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """x @ dequantize(w).T for a weight kept only in blocks: ``qlinear`` up to ``w.max_rows`` rows of x
    (bound by reading W), else ``qlinear_dense`` (tiles of W dequantized into x's dtype, then the dense
    matmul: bound by FLOPs)."""
    if x.shape[0] <= w.max_rows:
        return qlinear(x, w)
    return kernels.ops().qlinear_dense(x, w.qs, w.scales, w.mins, w.bits)
