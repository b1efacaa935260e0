"""GGUF blocks in leanserve's quantized format, and the native qlinear kernel against float32 math."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from leanserve import kernels
from leanserve.model.layers import Linear
from leanserve.model.quant import QuantWeight, from_gguf_blocks, qlinear

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]


def _gguf(name: str, n: int = 48, k: int = 576, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    raw = quantize(w, GGMLQuantizationType[name])
    return raw, torch.from_numpy(dequantize(raw, GGMLQuantizationType[name]))


@pytest.mark.parametrize("name", TYPES)
def test_blocks_dequantize_exactly_like_gguf(name):
    raw, ref = _gguf(name)
    qw = from_gguf_blocks(raw, name, *ref.shape)
    assert qw.bits == {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8}[name]
    assert qw.shape == tuple(ref.shape)
    assert torch.equal(qw.dequantize(), ref)  # bit for bit, not approximately
    # GGUF's float16 scales kept as they are, and mins only where the format has nonzero ones
    # (Q4_0's -8 d and Q5_0's -16 d: the kernels' values are unsigned)
    with_mins = name != "Q8_0"
    assert qw.scales.dtype == qw.mins.dtype == torch.float16
    assert qw.mins.numel() == (ref.numel() // 32 if with_mins else 0)
    assert qw.nbytes == ref.numel() * qw.bits // 8 + (2 if with_mins else 1) * 2 * ref.numel() // 32


def test_unsupported_types_and_shapes_stay_float():
    raw, ref = _gguf("Q4_1")
    assert from_gguf_blocks(raw, "Q2_K", *ref.shape) is None
    assert from_gguf_blocks(raw, "IQ4_XS", *ref.shape) is None
    assert from_gguf_blocks(np.zeros((4, 20), np.uint8), "Q4_1", 4, 40) is None  # not whole blocks


@pytest.mark.parametrize("k", [32, 64, 96, 576])  # odd and even block counts
def test_4bit_layout_round_trips(k):
    from leanserve.model.quant import _pack4, _unpack

    q = np.random.default_rng(k).integers(0, 16, (3, k)).astype(np.uint8)
    packed = _pack4(q)
    assert packed.shape == (3, -(-k // 64) * 8) and packed.dtype == np.int32
    assert np.array_equal(_unpack(packed, k, 4), q)
    # byte i of a pair: weight i of its first block (low nibble), weight i of the second (high)
    pair = packed[0, :8].view(np.uint8)
    assert pair[5] & 0xF == q[0, 5] and (k < 64 or pair[5] >> 4 == q[0, 37])


@pytest.mark.parametrize("k", [32, 64, 96, 576])
def test_5bit_layout_round_trips(k):
    from leanserve.model.quant import _pack4, _pack5, _unpack

    q = np.random.default_rng(k).integers(0, 32, (3, k)).astype(np.uint8)
    packed = _pack5(q)
    pairs, groups = -(-k // 64), k // 32
    assert packed.shape == (3, pairs * 8 + groups) and packed.dtype == np.int32
    assert np.array_equal(_unpack(packed, k, 5), q)
    # the low 4 bits laid out as 4-bit values, then a uint32 a block: bit i is bit 4 of value i
    assert np.array_equal(packed[:, :pairs * 8], _pack4(q & 0xF))
    high = packed[1, pairs * 8:].view(np.uint32)
    assert all((int(high[g]) >> i) & 1 == q[1, 32 * g + i] >> 4 for g in range(groups) for i in range(32))


def test_rows_and_cat():
    raw, ref = _gguf("Q4_1", n=8)
    qw = from_gguf_blocks(raw, "Q4_1", *ref.shape)
    perm = np.array([3, 1, 2, 0, 7, 6, 5, 4])
    assert torch.equal(qw.rows(perm).dequantize(), ref[perm])
    both = QuantWeight.cat([qw, qw.rows(perm)])
    assert torch.equal(both.dequantize(), torch.cat([ref, ref[perm]]))
    raw8, ref8 = _gguf("Q8_0", n=8)
    wide = QuantWeight.cat([qw, from_gguf_blocks(raw8, "Q8_0", *ref8.shape)])  # 4-bit + 8-bit: 8-bit
    assert wide.bits == 8 and torch.equal(wide.dequantize(), torch.cat([ref, ref8]))
    # with and without mins (Q5_1 widened to 8 bits, Q8_0): the missing mins become zeros
    raw51, ref51 = _gguf("Q5_1", n=8, seed=1)
    mixed = QuantWeight.cat([from_gguf_blocks(raw51, "Q5_1", *ref51.shape), from_gguf_blocks(raw8, "Q8_0", *ref8.shape)])
    assert mixed.bits == 8 and mixed.mins.shape == mixed.scales.shape
    assert torch.equal(mixed.dequantize(), torch.cat([ref51, ref8]))
    # Q5_0 (-16 d as its min) widened to 8 bits: signed values, no mins, as Q8_0 beside it
    raw50, ref50 = _gguf("Q5_0", n=8, seed=2)
    signed = QuantWeight.cat([from_gguf_blocks(raw50, "Q5_0", *ref50.shape), from_gguf_blocks(raw8, "Q8_0", *ref8.shape)])
    assert signed.bits == 8 and signed.mins.numel() == 0 and int(signed.qs[:8].min()) >= -16
    assert torch.equal(signed.dequantize(), torch.cat([ref50, ref8]))
    # 4-bit + 5-bit: 5-bit
    five = QuantWeight.cat([qw, from_gguf_blocks(raw50, "Q5_0", *ref50.shape)])
    assert five.bits == 5 and torch.equal(five.dequantize(), torch.cat([ref, ref50]))


needs_kernels = pytest.mark.skipif(kernels.ops() is None, reason=kernels.status())


@needs_kernels
@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
def test_qlinear_matches_float_matmul(name, rows):
    raw, ref = _gguf(name, n=40, k=1568, seed=rows)  # 49 blocks: an odd last block
    qw = from_gguf_blocks(raw, name, *ref.shape)
    x = torch.randn(rows, 1568, generator=torch.Generator().manual_seed(rows))
    want = x.double() @ ref.double().t()
    got = qlinear(x, qw)
    assert got.shape == (rows, 40) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("rows", [1, 3, 9])
def test_qlinear_bfloat16_fallback_widens_rows_and_rounds_once(rows, monkeypatch):
    monkeypatch.setenv("LEANSERVE_AVX512", "0")  # the AVX2 path, also taken on CPUs without AVX512-BF16
    raw, ref = _gguf("Q4_0", n=40, k=576, seed=rows)
    qw = from_gguf_blocks(raw, "Q4_0", *ref.shape)
    x = torch.randn(rows, 576, generator=torch.Generator().manual_seed(rows)).bfloat16()
    got = qlinear(x, qw)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 40)
    # the float32 kernel on the widened rows, rounded to bfloat16 once: the same bits
    assert torch.equal(got, qlinear(x.float(), qw).bfloat16())


def _bf16_ulps(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Distance in bfloat16 steps between got (bf16) and want rounded to bf16 (same-sign values)."""
    a = got.view(torch.int16).int()
    b = want.bfloat16().view(torch.int16).int()
    return (a - b).abs()


@needs_kernels
@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("rows,n", [(1, 40), (4, 40), (9, 40), (1, 1000), (3, 1000)])  # n=1000: several threads
@pytest.mark.parametrize("avx512", ["1", "0"])
def test_qlinear_bfloat16_is_the_float64_product_rounded(name, rows, n, avx512, monkeypatch):
    """Both bfloat16 paths (AVX512-BF16 where the CPU has it, else the AVX2 fallback) give the exact
    product rounded to bfloat16, up to float32 summation: never more than one bf16 step away."""
    monkeypatch.setenv("LEANSERVE_AVX512", avx512)
    raw, ref = _gguf(name, n=n, k=1568, seed=rows)  # 49 blocks: an odd last block
    qw = from_gguf_blocks(raw, name, *ref.shape)
    x = torch.randn(rows, 1568, generator=torch.Generator().manual_seed(rows)).bfloat16()
    want = x.double() @ ref.double().t()
    got = qlinear(x, qw)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    ulps = _bf16_ulps(got, want)
    assert ulps.max().item() <= 1
    assert (ulps == 0).float().mean().item() >= 0.99


@needs_kernels
def test_qlinear_non_contiguous_input():
    raw, ref = _gguf("Q4_1", n=16, k=64)
    qw = from_gguf_blocks(raw, "Q4_1", *ref.shape)
    x = torch.randn(64, 3).t()  # (3, 64), strided
    torch.testing.assert_close(qlinear(x, qw), x @ ref.t(), rtol=1e-5, atol=1e-5)


@needs_kernels
def test_qlinear_rejects_bad_input():
    raw, ref = _gguf("Q4_1", n=16, k=64)
    qw = from_gguf_blocks(raw, "Q4_1", *ref.shape)
    ops = kernels.ops()
    with pytest.raises(RuntimeError, match="must be a 2-D float32 or bfloat16"):
        ops.qlinear(torch.randn(2, 64, dtype=torch.float64), qw.qs, qw.scales, qw.mins, 4)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        ops.qlinear(torch.randn(2, 48), qw.qs, qw.scales, qw.mins, 4)
    with pytest.raises(RuntimeError, match="qs must be contiguous int8 rows of 64 bytes"):
        ops.qlinear(torch.randn(2, 64), qw.qs, qw.scales, qw.mins, 8)  # 4-bit data read as 8-bit
    with pytest.raises(RuntimeError, match="qs must be contiguous int32 rows of 40 bytes"):
        ops.qlinear(torch.randn(2, 64), qw.qs, qw.scales, qw.mins, 5)  # 4-bit data read as 5-bit: no high bits
    with pytest.raises(RuntimeError, match="bits must be 4, 5 or 8"):
        ops.qlinear(torch.randn(2, 64), qw.qs, qw.scales, qw.mins, 6)


@needs_kernels
def test_linear_uses_the_kernel_only_up_to_max_rows(monkeypatch):
    raw, ref = _gguf("Q8_0", n=32, k=64)
    layer = Linear(64, 32, bias=True)
    with torch.no_grad():
        layer.weight.copy_(ref)
        layer.bias.copy_(torch.arange(32.0))
    layer.qweight = from_gguf_blocks(raw, "Q8_0", *ref.shape)
    layer.qweight.max_rows = 4
    calls = []
    import leanserve.model.layers as layers

    monkeypatch.setattr(layers, "qlinear", lambda x, w: calls.append(x.shape[0]) or qlinear(x, w))
    for rows in (1, 4, 5, 32):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(layer(x), x @ ref.t() + torch.arange(32.0), rtol=1e-5, atol=1e-4)
    assert calls == [1, 4]


@needs_kernels
def test_status_names_the_avx512_paths_when_they_run(monkeypatch):
    monkeypatch.setenv("LEANSERVE_AVX512", "0")
    assert not kernels.ops().avx512_bf16_available()
    assert "AVX512-BF16" not in kernels.status()
    monkeypatch.setenv("LEANSERVE_AVX512", "1")
    on = kernels.ops().avx512_bf16_available()
    assert ("AVX512-BF16" in kernels.status()) == on
    if torch.backends.cpu.get_cpu_capability() != "AVX512":  # no AVX-512 at all: never claimed
        assert not on


# ---- K-quants, mixed formats, and the blocks-only dense path ------------------------------------

K_TYPES = ["Q4_K", "Q5_K", "Q6_K"]


def _kquant(name: str, n: int = 24, k: int = 512, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """Random K-quant super-blocks (every bit pattern is valid but the float16 scales, set to sane
    values) and gguf's dequantization of them (gguf cannot quantize to K-quants)."""
    rng = np.random.default_rng(seed)
    size = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}[name]
    raw = rng.integers(0, 256, (n * k // 256, size), dtype=np.uint8)
    for at in ([0, 2] if name != "Q6_K" else [208]):  # d and dmin (Q4_K, Q5_K), d (Q6_K, at the end)
        raw[:, at:at + 2] = rng.uniform(0.001, 0.05, (raw.shape[0], 1)).astype(np.float16).view(np.uint8)
    raw = raw.reshape(n, -1)
    return raw, torch.from_numpy(dequantize(raw, GGMLQuantizationType[name])).reshape(n, k)


def _any(name: str, n: int = 24, k: int = 512, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    return _kquant(name, n, k, seed) if name in K_TYPES else _gguf(name, n, k, seed)


@pytest.mark.parametrize("name,bits,block,mins", [("Q4_K", 4, 32, True), ("Q5_K", 5, 32, True), ("Q6_K", 8, 16, False)])
def test_k_quants_dequantize_exactly_like_gguf(name, bits, block, mins):
    raw, ref = _kquant(name)
    qw = from_gguf_blocks(raw, name, *ref.shape)
    assert (qw.bits, qw.block, qw.scales.dtype) == (bits, block, torch.float32)  # d * sub-scale: exact in float32 only
    assert qw.mins.numel() == (ref.numel() // 32 if mins else 0)
    assert torch.equal(qw.dequantize(), ref)
    assert from_gguf_blocks(raw[:, :-1], name, ref.shape[0], ref.shape[1] - 1) is None  # not whole super-blocks


MIXES = [("Q5_0", "Q5_0", "Q6_K"), ("Q4_K", "Q4_K", "Q6_K"), ("Q4_K", "Q5_K"), ("Q4_1", "Q8_0"), ("Q5_1", "Q6_K"),
         ("Q5_0", "Q5_0", "Q8_0"), ("Q4_K", "Q5_0")]  # Gemma 3's q/k/v in half its layers; 4 + 5 bits meet in 5


@pytest.mark.parametrize("mix", MIXES, ids="+".join)
def test_fused_parts_of_different_formats_meet_exactly(mix):
    parts = [_any(name, n=8 * (i + 1), seed=i) for i, name in enumerate(mix)]
    qw = QuantWeight.cat([from_gguf_blocks(raw, name, *ref.shape) for (raw, ref), name in zip(parts, mix)])
    bits = 4 if set(mix) <= {"Q4_0", "Q4_1", "Q4_K"} else 8 if set(mix) & {"Q6_K", "Q8_0"} else 5
    assert qw is not None and qw.bits == bits
    assert qw.block == (16 if "Q6_K" in mix else 32)
    assert torch.equal(qw.dequantize(), torch.cat([ref for _, ref in parts]))


@needs_kernels
@pytest.mark.parametrize("name", K_TYPES + ["mix"])
@pytest.mark.parametrize("rows", [1, 3, 9])
@pytest.mark.parametrize("avx512", ["1", "0"])
def test_qlinear_on_k_quants_is_the_exact_product_up_to_summation(name, rows, avx512, monkeypatch):
    monkeypatch.setenv("LEANSERVE_AVX512", avx512)
    if name == "mix":  # Q4_K + Q6_K: 8-bit values, scales per 16, mins per 32
        (ra, a), (rb, b) = _kquant("Q4_K", seed=1), _kquant("Q6_K", seed=2)
        qw, ref = QuantWeight.cat([from_gguf_blocks(ra, "Q4_K", *a.shape), from_gguf_blocks(rb, "Q6_K", *b.shape)]), torch.cat([a, b])
    else:
        raw, ref = _kquant(name, n=40, seed=rows)
        qw = from_gguf_blocks(raw, name, *ref.shape)
    x = torch.randn(rows, ref.shape[1], generator=torch.Generator().manual_seed(rows))
    for xd, rounding in ((x, 0.0), (x.bfloat16(), 2.0 ** -8)):  # float32 rows; bfloat16 rows, rounded once
        want = xd.double() @ ref.double().t()
        scale = xd.double().abs() @ ref.double().abs().t()  # float32 summation's error grows with sum |x w|
        err = (qlinear(xd, qw).double() - want).abs()
        assert (err <= rounding * want.abs() + 2e-5 * scale).all()


@needs_kernels
@pytest.mark.parametrize("name", TYPES + K_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("avx512", ["1", "0"])
def test_qlinear_dense_dequantizes_each_tile_exactly(name, dtype, avx512, monkeypatch):
    """x = I: each output is one weight times 1 plus zeros, so y.T is the dequantized tile's values
    bit for bit: gguf's float32 value, rounded once to x's dtype. Each thread's share of the 40 rows
    in tiles of at most 16 or 7 (a partial last tile) or of the default size, on 2 threads and on 1."""
    monkeypatch.setenv("LEANSERVE_AVX512", avx512)
    k = 512 if name in K_TYPES else 544  # 17 blocks: an odd last block (K-quants: whole super-blocks)
    raw, ref = _any(name, n=40, k=k, seed=3)
    qw = from_gguf_blocks(raw, name, *ref.shape)
    eye = torch.eye(k, dtype=dtype)
    threads = torch.get_num_threads()
    try:
        for n_threads in (2, 1):
            torch.set_num_threads(n_threads)
            for tile in (16, 7, 0):
                got = kernels.ops().qlinear_dense(eye, qw.qs, qw.scales, qw.mins, qw.bits, tile)
                assert got.dtype == dtype and torch.equal(got.t(), ref.to(dtype))
    finally:
        torch.set_num_threads(threads)


@needs_kernels
@pytest.mark.parametrize("name", ["Q4_1", "Q8_0", "Q6_K"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qlinear_dense_is_the_dense_matmul_on_the_dequantized_weight(name, dtype):
    raw, ref = _any(name, n=200, k=512, seed=4)
    qw = from_gguf_blocks(raw, name, *ref.shape)
    x = torch.randn(37, 512, generator=torch.Generator().manual_seed(5)).to(dtype)
    w = ref.to(dtype).double()  # the values the dense matmul multiplies
    want, scale = x.double() @ w.t(), x.double().abs() @ w.abs().t()
    rounding = 0.0 if dtype == torch.float32 else 2.0 ** -8
    with torch.inference_mode():  # as the engine calls it: the worker threads write an inference tensor
        in_engine = kernels.ops().qlinear_dense(x, qw.qs, qw.scales, qw.mins, qw.bits, 64)
    for got in (kernels.ops().qlinear_dense(x, qw.qs, qw.scales, qw.mins, qw.bits, 64), in_engine):
        assert ((got.double() - want).abs() <= rounding * want.abs() + 2e-5 * scale).all()


@needs_kernels
def test_qlinear_rejects_bad_scales():
    raw, ref = _gguf("Q4_1", n=16, k=64)
    qw = from_gguf_blocks(raw, "Q4_1", *ref.shape)
    ops = kernels.ops()
    x = torch.randn(2, 64)
    for op in (ops.qlinear, ops.qlinear_dense):
        with pytest.raises(RuntimeError, match="scales must be contiguous float32 or float16"):
            op(x, qw.qs, qw.scales.double(), qw.mins.double(), 4)
        with pytest.raises(RuntimeError, match="mins must be contiguous of the scales' dtype"):
            op(x, qw.qs, qw.scales, qw.mins.float(), 4)
        with pytest.raises(RuntimeError, match="8-bit only"):  # a scale per 16 is an 8-bit layout
            op(x, qw.qs, qw.scales.float().repeat_interleave(2, 1), qw.mins.float(), 4)


@needs_kernels
def test_linear_with_blocks_only_runs_the_kernel_then_dense_tiles(monkeypatch):
    raw, ref = _gguf("Q8_0", n=32, k=64)
    layer = Linear(64, 32, bias=True)
    with torch.no_grad():
        layer.bias.copy_(torch.arange(32.0))
    layer.weight = torch.nn.Parameter(torch.empty(32, 64, device="meta"), requires_grad=False)  # no float copy
    layer.qweight = from_gguf_blocks(raw, "Q8_0", *ref.shape)
    layer.qweight.max_rows = 4
    calls = []
    import leanserve.model.quant as quant

    from types import SimpleNamespace

    ops = kernels.ops()
    counted = SimpleNamespace(
        qlinear=lambda *a: calls.append(("qlinear", a[0].shape[0])) or ops.qlinear(*a),
        qlinear_dense=lambda *a: calls.append(("dense", a[0].shape[0])) or ops.qlinear_dense(*a))
    monkeypatch.setattr(quant.kernels, "ops", lambda: counted)
    for rows in (1, 4, 5, 32):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(layer(x), x @ ref.t() + torch.arange(32.0), rtol=1e-5, atol=1e-4)
    assert calls == [("qlinear", 1), ("qlinear", 4), ("dense", 5), ("dense", 32)]


def test_lookup_is_the_float_tables_rows():
    raw, ref = _gguf("Q8_0", n=50, k=64)
    qw = from_gguf_blocks(raw, "Q8_0", *ref.shape)
    ids = torch.tensor([[3, 49], [0, 3]])
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(qw.lookup(ids, dtype), ref.to(dtype)[ids])
