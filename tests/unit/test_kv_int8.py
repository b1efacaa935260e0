"""The 8-bit KV cache (``--kv-cache-dtype int8``): its row format pinned byte for byte, the native
write (kernels/csrc/paged_attention.cpp write_kv_) against ``quantize_kv`` bit for bit, the native
decode kernel reading it in place against ``reference_attention`` over the same cache, the gather +
SDPA paths that dequantize it, its input checks, and the engine's sizing and capacity line."""

from __future__ import annotations

import pytest
import torch

from leanserve import kernels
from leanserve.config import CacheConfig, EngineConfig
from leanserve.engine.interface import ModelInfo
from leanserve.model import attention
from leanserve.model.attention import (AttentionMetadata, dequantize_kv_blocks, int8_cache_views, kv_row_width,
                                       paged_attention, quantize_kv, quantize_kv_cache, reference_attention)

OPS = kernels.ops()
needs_kernels = pytest.mark.skipif(OPS is None, reason=f"native CPU kernels unavailable: {kernels.status()}")
SCALE = 0.125


def _dequantize(values, scales):
    g = values.shape[-1] // scales.shape[-1]
    return (values.float().unflatten(-1, (-1, g)) * scales.float()[..., None]).flatten(-2)


def test_rows_are_int8_values_and_a_float16_scale_per_32():
    x = torch.zeros(1, 8)
    x[0, :5] = torch.tensor([127.0, -63.5, 0.5, 1.5, -2.5])
    x[0, 6] = 100.25
    values, scales = quantize_kv(x)  # head_dim 8: one group
    assert values.dtype == torch.int8 and scales.dtype == torch.float16 and values.shape == (1, 8) and scales.shape == (1, 1)
    # scale = 127 / 127 = 1.0; values rounded to nearest even: -63.5 -> -64, 0.5 -> 0, 1.5 -> 2, -2.5 -> -2
    assert values[0].tolist() == [127, -64, 0, 2, -2, 0, 100, 0] and scales.tolist() == [[1.0]]
    # head_dim 64: two groups of 32, each with its own scale, so small values next to big ones keep their digits
    y = torch.cat([torch.full((32,), 1000.0), torch.linspace(-1, 1, 32)])
    values, scales = quantize_kv(y)
    assert scales.shape == (2,) and scales[0].item() == pytest.approx(1000 / 127, rel=1e-3)
    assert scales[1].item() == pytest.approx(1 / 127, rel=1e-3)
    assert (_dequantize(values, scales)[32:] - y[32:]).abs().max() < 0.005
    assert [kv_row_width(d, torch.int8) for d in (64, 128, 256, 8, 48)] == [68, 136, 272, 10, 50]
    assert kv_row_width(64, torch.bfloat16) == 64


def test_block_bytes_are_head_major_values_then_scales():
    # one block of 2 tokens x 2 KV heads x head_dim 4: values (head, token, dim), then scales (head, token)
    x = torch.arange(1, 17, dtype=torch.float32).view(1, 2, 2, 4)  # token t, head h: 8t + 4h + 1 .. + 4
    cache = quantize_kv_cache(x)
    assert cache.shape == (1, 2, 2, 6) and cache.dtype == torch.int8
    flat = cache.flatten()
    for i, (t, h) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1)]):  # (token, head), head-major
        v, sc = quantize_kv(x[0, t, h])
        assert flat[4 * i:4 * i + 4].tolist() == v.tolist()
        assert flat[16 + 2 * i:16 + 2 * i + 2].view(torch.float16).item() == sc.item()
    assert flat[16:18].tolist() == torch.tensor([4 / 127], dtype=torch.float16).view(torch.int8).tolist()
    values, scales = int8_cache_views(cache, 4)
    assert values.shape == (1, 2, 2, 4) and scales.shape == (1, 2, 2, 1)
    torch.testing.assert_close(dequantize_kv_blocks(cache, torch.float32, 4), x, atol=0.07, rtol=0.01)
    with pytest.raises(ValueError, match="an 8-bit cache of 6-byte rows does not hold head_dim 8"):
        int8_cache_views(cache, 8)


def test_zero_row_has_scale_zero_and_dequantizes_to_zero():
    values, scales = quantize_kv(torch.zeros(2, 3, 16))
    assert not values.any() and not scales.any()
    assert not dequantize_kv_blocks(quantize_kv_cache(torch.zeros(2, 4, 3, 16)), torch.float32, 16).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 24])
def test_round_trip_error_is_about_half_a_step(dtype, dim):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(50, 3, dim, generator=g) * torch.logspace(-3, 2, 50)[:, None, None]).to(dtype)
    values, scales = quantize_kv(x)
    back = _dequantize(values, scales)
    step = scales.float().repeat_interleave(dim // scales.shape[-1], -1)
    # half a step, plus what the float16 rounding of the scale moves the group's largest value (at
    # most 2**-11 of it, times 127 steps), plus the float32 roundings of x / scale and value * scale
    assert ((back - x.float()).abs() <= step * (0.5 + 127 * 2**-11) + x.float().abs() * 2**-22).all()
    assert (values.abs() >= 126).any(-1).all()  # each row's largest value takes (nearly) the whole range


def _strided_kv(dtype, tokens=5, kv_heads=3, dim=64, heads=9, seed=5):
    # k and v as the model passes them: strided views of the fused qkv output (heads contiguous)
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(tokens, heads * dim + 2 * kv_heads * dim, generator=g) * 3).to(dtype)
    _, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    return k.view(tokens, kv_heads, dim), v.view(tokens, kv_heads, dim)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_write_quantizes_exactly_like_the_reference(dtype, monkeypatch):
    k, v = _strided_kv(dtype)
    k[1, 2] = 0.0  # a zero row: scale 0
    kc = torch.full((6, 16, 3, 68), 7, dtype=torch.int8)
    vc = kc.clone()
    slots = torch.tensor([0, 17, 95, 40, 3])
    OPS.write_kv_(kc, vc, k, v, slots)

    def written(cache):  # the rows at the slots, as (values, scales) per token
        values, scales = int8_cache_views(cache, 64)
        return values[slots // 16, :, slots % 16], scales[slots // 16, :, slots % 16]

    for cache, x in ((kc, k), (vc, v)):
        got, want = written(cache), quantize_kv(x)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert (written(kc)[1][1, 2] == 0).all()
    touched = torch.zeros(6, 16, dtype=torch.bool)
    touched.view(-1)[slots] = True
    values, scales = int8_cache_views(kc, 64)
    assert (values.transpose(1, 2)[~touched] == 7).all()  # nothing else written
    assert (scales.transpose(1, 2)[~touched].view(torch.int8) == 7).all()
    # attention.write_kv takes the native call, and without kernels writes the same bytes
    kc2, vc2 = torch.zeros_like(kc), torch.zeros_like(vc)
    attention.write_kv(kc2, vc2, k, v, slots)
    monkeypatch.setattr(kernels, "ops", lambda: None)
    kc3, vc3 = torch.zeros_like(kc), torch.zeros_like(vc)
    attention.write_kv(kc3, vc3, k, v, slots)
    assert torch.equal(kc2, kc3) and torch.equal(vc2, vc3)
    assert torch.equal(written(kc2)[0], quantize_kv(k)[0])


def _caches(context_lens, block_size, kv_heads, dim, seed=0, spare=7):
    g = torch.Generator().manual_seed(seed)
    need = sum(-(-c // block_size) for c in context_lens)
    k = torch.randn(need + spare, block_size, kv_heads, dim, generator=g) * 2
    v = torch.randn(need + spare, block_size, kv_heads, dim, generator=g)
    perm = torch.randperm(need + spare, generator=g).tolist()
    tables, used = [], 0
    for c in context_lens:
        n = -(-c // block_size)
        tables.append(perm[used:used + n])
        used += n
    return quantize_kv_cache(k), quantize_kv_cache(v), tables


@needs_kernels
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (8, 2, 256), (4, 4, 32), (6, 1, 8)])
@pytest.mark.parametrize("window", [None, 5, 33])
@pytest.mark.parametrize("avx512", ["1", "0"], ids=["avx512-if-the-cpu-has-it", "avx2"])
def test_kernel_reads_the_8bit_cache_like_the_reference(monkeypatch, q_dtype, heads, kv_heads, dim, window, avx512):
    monkeypatch.setenv("LEANSERVE_AVX512", avx512)  # read per call: both code paths on an AVX-512 CPU
    clens = [1, 15, 16, 17, 70]
    kc, vc, tables = _caches(clens, 16, kv_heads, dim)
    q = (torch.randn(len(clens), heads, dim, generator=torch.Generator().manual_seed(2)) * 3).to(q_dtype)
    meta = AttentionMetadata.build([1] * len(clens), clens, tables, 16, {window})
    assert attention._decode_kernel(q, kc, vc) is not None
    got = paged_attention(q, kc, vc, meta, SCALE, window)
    assert got.dtype == q_dtype
    want = reference_attention(q.float(), kc, vc, meta, SCALE, window)  # float32 over the dequantized rows
    if q_dtype == torch.float32:  # float32 sums in another order (the scale applied per value, not per dot product)
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)
    else:  # the float32 result rounded once to bfloat16
        torch.testing.assert_close(got.float(), want, atol=1e-5, rtol=2**-8)
    # the gather + SDPA path (CUDA, or no kernels) dequantizes the same rows
    monkeypatch.setattr(attention, "_decode_kernel", lambda *a: None)
    sdpa = paged_attention(q.float(), kc, vc, meta, SCALE, window)
    torch.testing.assert_close(sdpa, want, atol=1e-5, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("fold_upto", [0, attention.FOLD_PREFILL_UPTO], ids=["sdpa-prefill", "folded"])
def test_mixed_batch_over_the_8bit_cache(fold_upto):
    # a prefill chunk (dequantized and gathered for SDPA, or folded into the kernel's rows), a
    # speculative step's consecutive rows and single decodes, in one step
    qlens, clens = [7, 1, 4, 1], [40, 9, 30, 100]
    kc, vc, tables = _caches(clens, 16, 3, 64)
    q = torch.randn(sum(qlens), 9, 64, generator=torch.Generator().manual_seed(4)) * 3
    meta = AttentionMetadata.build(qlens, clens, tables, 16, {None}, fold_upto=fold_upto)
    assert bool(meta.prefills) == (fold_upto == 0)
    got = paged_attention(q, kc, vc, meta, SCALE, None)
    torch.testing.assert_close(got, reference_attention(q, kc, vc, meta, SCALE, None), atol=1e-5, rtol=1e-5)


@needs_kernels
def test_kernel_checks_the_8bit_cache():
    kc, vc, tables = _caches([20], 16, 3, 64)
    q = torch.randn(1, 9, 64)
    bt, lens = torch.tensor([tables[0]]), torch.tensor([20])
    with pytest.raises(RuntimeError, match=r"head_dim of q \(64\) and cache \(64 bytes: head_dim and 2 per 32 for the scales\)"):
        OPS.paged_attention_decode(q, kc[..., :64].contiguous(), vc[..., :64].contiguous(), bt, lens, SCALE, 0)
    with pytest.raises(RuntimeError, match="must both have q.s dtype or both be int8"):
        OPS.paged_attention_decode(q, kc, dequantize_kv_blocks(vc, torch.float32, 64).contiguous(), bt, lens, SCALE, 0)
    with pytest.raises(RuntimeError, match="k and v must be .* float32 or bfloat16"):
        k = torch.randn(2, 3, 64).half()
        OPS.write_kv_(kc, vc, k, k, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="the 8-bit cache's rows are 68 bytes, not those of head_dim 68"):
        k = torch.randn(2, 3, 68)  # the cache's width, not head_dim
        OPS.write_kv_(kc, vc, k, k, torch.tensor([0, 1]))


@needs_kernels
def test_nan_in_a_row_stays_in_that_row():
    # a NaN makes that value 0 (not a number); the scale and the other values are as without it
    x = torch.randn(2, 3, 8)
    x[0, 1, 3] = float("nan")
    kc = torch.zeros(2, 4, 3, kv_row_width(8, torch.int8), dtype=torch.int8)
    OPS.write_kv_(kc, kc.clone(), x, x, torch.tensor([0, 5]))
    values, scales = int8_cache_views(kc, 8)
    assert values[0, 1, 0, 3] == 0
    want_v, want_s = quantize_kv(x[1])
    assert torch.equal(values[1, :, 1], want_v) and torch.equal(scales[1, :, 1], want_s)
    assert torch.equal(values[0, 0, 0], quantize_kv(x[0, 0])[0])


def test_config_takes_auto_and_int8_only():
    assert EngineConfig(kv_cache_dtype="int8").kv_cache_dtype == "int8"
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, int8, got 'fp8'"):
        EngineConfig(kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, int8"):
        CacheConfig(4, kv_cache_dtype="float16")


def test_capacity_line_says_how_many_more_tokens_fit():
    info = ModelInfo(max_model_len=2048, vocab_size=10, kv_cache_tokens=21920, max_num_seqs=8, dtype="bfloat16",
                     device="cpu", kv_cache_dtype="int8", kv_cache_tokens_unquantized=11648)
    assert info.kv_cache_summary() == "21,920 tokens in int8 (1.88x the 11,648 of bfloat16)"
    same = ModelInfo(max_model_len=2048, vocab_size=10, kv_cache_tokens=11648, max_num_seqs=8, dtype="bfloat16",
                     device="cpu", kv_cache_dtype="bfloat16", kv_cache_tokens_unquantized=11648)
    assert same.kv_cache_summary() == "11,648 tokens"
