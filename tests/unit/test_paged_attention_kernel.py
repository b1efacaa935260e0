"""The native decode kernel (kernels/csrc/paged_attention.cpp), through ``paged_attention``, against
``reference_attention`` and against the SDPA path it replaces on CPU, in float32 and bfloat16; and its
input checks."""

from __future__ import annotations

import re

import pytest
import torch

from leanserve import kernels
from leanserve.model import attention
from leanserve.model.attention import AttentionMetadata, paged_attention, reference_attention

OPS = kernels.ops()
pytestmark = pytest.mark.skipif(OPS is None, reason=f"native CPU kernels unavailable: {kernels.status()}")

SCALE = 0.125
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])


def _case(query_lens, context_lens, block_size, heads, kv_heads, dim, seed=0, spare_blocks=7,
          dtype=torch.float32):
    """Random caches; each sequence gets scattered blocks from a shuffled pool, with spare blocks of
    noise around them (a read outside the table shows up as a wrong result)."""
    g = torch.Generator().manual_seed(seed)
    need = sum(-(-c // block_size) for c in context_lens)
    num_blocks = need + spare_blocks
    k = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g)
    v = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, used = [], 0
    for c in context_lens:
        n = -(-c // block_size)
        tables.append(perm[used:used + n])
        used += n
    q = torch.randn(sum(query_lens), heads, dim, generator=g) * 3  # peaky softmax: max subtraction matters
    return q.to(dtype), k.to(dtype), v.to(dtype), tables


def _assert_one_rounding(got, ref32):
    """bfloat16 ``got`` is the float32 result ``ref32`` rounded once, to nearest even."""
    assert got.dtype == torch.bfloat16
    # half a bf16 ulp is at most 2**-8 relative; atol for the float32 differences
    torch.testing.assert_close(got.float(), ref32, atol=1e-5, rtol=2**-8)
    # and it is torch's rounding: bit-equal but where the float32 differences straddle a rounding
    # boundary (truncation would miss about half)
    assert (got == ref32.to(torch.bfloat16)).float().mean() > 0.99


def _sdpa_path(monkeypatch, q, k, v, meta, window):
    """The gather + SDPA decode path, as on CUDA or without the kernels."""
    with monkeypatch.context() as m:
        m.setattr(attention, "_decode_kernel", lambda *a: None)
        return paged_attention(q, k, v, meta, SCALE, window)


def _check(monkeypatch, qlens, clens, block_size, heads, kv_heads, dim, window, q_transform=None,
           dtype=torch.float32, fold_upto=0):
    q, k, v, tables = _case(qlens, clens, block_size, heads, kv_heads, dim, dtype=dtype)
    if q_transform is not None:
        q = q_transform(q)
    meta = AttentionMetadata.build(qlens, clens, tables, block_size, {window}, fold_upto=fold_upto)
    calls = []
    real = attention._decode_kernel
    with monkeypatch.context() as m:  # record that the kernel path was taken
        m.setattr(attention, "_decode_kernel", lambda *a: calls.append(1) or real(*a))
        got = paged_attention(q, k, v, meta, SCALE, window)
    assert calls and real(q, k, v) is not None, "the native kernel path was not taken"
    assert not meta.decode_masks, "the kernel path built SDPA decode masks it does not need"
    assert got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, reference_attention(q, k, v, meta, SCALE, window), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got, _sdpa_path(monkeypatch, q, k, v, meta, window), atol=1e-5, rtol=1e-5)
        return
    # bf16: the decode rows (the kernel's) against float32 attention over the same bf16 inputs; the
    # prefill rows are SDPA's in either path, and SDPA in bf16 is a few bf16 ulps off the kernel
    rows = meta.decode_rows
    ref32 = reference_attention(q.float(), k.float(), v.float(), meta, SCALE, window)
    _assert_one_rounding(got[rows], ref32[rows])
    torch.testing.assert_close(got, _sdpa_path(monkeypatch, q, k, v, meta, window), atol=2e-2, rtol=2e-2)


@DTYPES
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("window", [None, 1, 5, 16, 33, 4096])
def test_decode_gqa_lengths_around_block_edges(monkeypatch, block_size, window, dtype):
    # GQA 9 heads / 3 KV heads, head_dim 64 (SmolLM2); lengths 1, bs-1, bs, bs+1, long
    clens = [1, block_size - 1, block_size, block_size + 1, 517, 3 * block_size, 2]
    _check(monkeypatch, [1] * len(clens), clens, block_size, 9, 3, 64, window, dtype=dtype)


@DTYPES
@pytest.mark.parametrize("num_seqs", [2, 40])  # fewer tasks than threads x 3, and many
@pytest.mark.parametrize("window", [None, 9])
def test_decode_few_and_many_sequences(monkeypatch, num_seqs, window, dtype):
    clens = [(37 * i) % 300 + 1 for i in range(num_seqs)]
    _check(monkeypatch, [1] * num_seqs, clens, 16, 9, 3, 64, window, dtype=dtype)


@DTYPES
@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 4, 64), (8, 2, 256), (6, 1, 8), (2, 1, 24)])
@pytest.mark.parametrize("window", [None, 7, 600])
def test_decode_mha_mqa_and_head_dims(monkeypatch, heads, kv_heads, dim, window, dtype):
    clens = [1, 15, 16, 17, 530]
    _check(monkeypatch, [1] * len(clens), clens, 16, heads, kv_heads, dim, window, dtype=dtype)


@DTYPES
@pytest.mark.parametrize("window", [None, 4, 20])
@pytest.mark.parametrize("fold_upto", [0, attention.FOLD_PREFILL_UPTO], ids=["sdpa-prefill", "folded"])
def test_mixed_batch_decode_rows_use_the_kernel(monkeypatch, window, dtype, fold_upto):
    # decodes between prefill chunks (a chunk mid-prompt, a whole prompt, a long prompt): decode rows
    # go through the kernel, the chunks through SDPA, or the short ones folded into the kernel too
    qlens = [1, 7, 1, 40, 1, 1, 150]
    clens = [33, 20, 1, 40, 16, 300, 150]
    _check(monkeypatch, qlens, clens, 16, 9, 3, 64, window, dtype=dtype, fold_upto=fold_upto)


@DTYPES
def test_non_contiguous_q(monkeypatch, dtype):
    # q as the model makes it: a slice of a wider projection output (row stride > heads * dim)
    def slice_of_wider(q):
        wide = torch.randn(q.shape[0], q.shape[1] + 3, q.shape[2]).to(q.dtype)
        wide[:, :q.shape[1]] = q
        return wide[:, :q.shape[1]]

    clens = [5, 40, 100]
    for qlens in ([1, 1, 1], [1, 9, 1]):
        _check(monkeypatch, qlens, clens, 16, 9, 3, 64, 30, q_transform=slice_of_wider, dtype=dtype)


@DTYPES
def test_large_scores_need_the_max_subtraction(dtype):
    # scores in the hundreds: exp overflows float32 unless the max is subtracted first
    clens = [1, 9, 300]
    q, k, v, tables = _case([1, 1, 1], clens, 16, 9, 3, 64, dtype=dtype)
    q = q * 20
    meta = AttentionMetadata.build([1, 1, 1], clens, tables, 16, {None})
    got = paged_attention(q, k, v, meta, SCALE, None)
    assert got.isfinite().all()
    ref32 = reference_attention(q.float(), k.float(), v.float(), meta, SCALE, None)
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref32, atol=1e-4, rtol=1e-4)
    else:
        _assert_one_rounding(got, ref32)


@DTYPES
def test_kernel_direct_with_padded_tables(dtype):
    # block tables padded past each sequence's used blocks (here with an out-of-range id: never read)
    clens = [3, 40, 17]
    q, k, v, tables = _case([1, 1, 1], clens, 16, 9, 3, 64, dtype=dtype)
    padded = torch.tensor([t + [10**6] * (5 - len(t)) for t in tables])
    meta = AttentionMetadata.build([1, 1, 1], clens, tables, 16, {None, 10})
    for window in (None, 10):
        got = OPS.paged_attention_decode(q, k, v, padded, torch.tensor(clens), SCALE, window or 0)
        ref32 = reference_attention(q.float(), k.float(), v.float(), meta, SCALE, window)
        if dtype == torch.float32:
            torch.testing.assert_close(got, ref32, atol=1e-5, rtol=1e-5)
        else:
            _assert_one_rounding(got, ref32)
    empty = OPS.paged_attention_decode(q[:0], k, v, padded[:0], torch.tensor([], dtype=torch.long), SCALE, 0)
    assert empty.shape == (0, 9, 64) and empty.dtype == dtype


def test_bf16_output_rounds_to_nearest_even():
    # q = 0: equal weights, so each output is the mean of 2, 4 or 8 V rows. V holds integers below 256
    # (exact in bf16) scaled by 2**-6: the float32 means are exact and often fall between two bf16
    # values, ties included, so the one rounding must be torch's (nearest, ties to even) bit for bit.
    g = torch.Generator().manual_seed(3)
    clens = [2, 4, 8, 8]
    k = torch.randn(4, 8, 2, 64, generator=g).bfloat16()
    v = (torch.randint(-255, 256, (4, 8, 2, 64), generator=g) * 2.0**-6).bfloat16()
    q = torch.zeros(4, 6, 64, dtype=torch.bfloat16)
    tables = torch.tensor([[3], [1], [0], [2]])
    got = OPS.paged_attention_decode(q, k, v, tables, torch.tensor(clens), SCALE, 0)
    assert got.dtype == torch.bfloat16
    mean = torch.stack([v[b, :n].float().mean(0) for b, n in zip(tables[:, 0].tolist(), clens)])  # (4, 2, 64)
    want = mean.repeat_interleave(3, dim=1)  # query heads 3j..3j+2 read KV head j
    bits = want.view(torch.int32)
    truncated = (bits & ~0xFFFF).view(torch.float32).bfloat16()
    half_up = ((bits + 0x8000) & ~0xFFFF).view(torch.float32).bfloat16()
    # the case tells nearest-even from truncation and from rounding ties up
    assert (want.bfloat16() != truncated).any() and (want.bfloat16() != half_up).any()
    assert torch.equal(got.view(torch.int16), want.bfloat16().view(torch.int16))


@DTYPES
def test_nan_in_v_reaches_only_the_rows_that_see_it(dtype):
    # a NaN V row reaches the outputs of sequences that attend to it (bf16: still NaN, not inf), and
    # no others: rows outside the window or the table are never read
    q, k, v, tables = _case([1, 1], [20, 5], 16, 9, 3, 64, dtype=dtype)
    v[tables[0][0], 2, 1] = float("nan")  # sequence 0, position 2, KV head 1
    bt = torch.tensor([tables[0], tables[1] + [0]])
    full = OPS.paged_attention_decode(q, k, v, bt, torch.tensor([20, 5]), SCALE, 0)
    assert full[0, 3:6].isnan().all() and not full[0, :3].isnan().any() and not full[0, 6:].isnan().any()
    assert not full[1].isnan().any()
    windowed = OPS.paged_attention_decode(q, k, v, bt, torch.tensor([20, 5]), SCALE, 10)  # sees 10 .. 19
    assert not windowed.isnan().any()


@pytest.mark.parametrize("q_dtype,cache_dtype,ok", [
    (torch.float32, torch.float32, True), (torch.bfloat16, torch.bfloat16, True),
    (torch.bfloat16, torch.float32, False), (torch.float32, torch.bfloat16, False),
    (torch.float16, torch.float16, False), (torch.float64, torch.float64, False),
    (torch.float32, torch.int8, True), (torch.bfloat16, torch.int8, True), (torch.float16, torch.int8, False),
])
def test_decode_kernel_dtypes(q_dtype, cache_dtype, ok):
    q, cache = torch.zeros(2, 4, 64, dtype=q_dtype), torch.zeros(3, 16, 2, 64, dtype=cache_dtype)
    assert (attention._decode_kernel(q, cache, cache) is not None) == ok
    other = cache.bfloat16() if cache_dtype == torch.float32 else cache.float()
    assert attention._decode_kernel(q, cache, other) is None  # v_cache's dtype counts too
    assert attention._decode_kernel(q[..., :12], cache[..., :12], cache[..., :12]) is None


def test_metadata_builds_masks_only_on_demand():
    meta = AttentionMetadata.build([1, 1], [10, 3], [[0, 1, 2], [3]], 4, {None, 3})
    assert meta.decode_lens.tolist() == [10, 3] and not meta.decode_masks
    assert meta.decode_masks[3][0, 0, 0].tolist() == [False] * 7 + [True] * 3 + [False] * 2
    assert meta.decode_masks[None][1, 0, 0].tolist() == [True] * 3 + [False] * 9
    assert set(meta.decode_masks) == {3, None}


def _good():
    q, k, v, tables = _case([1, 1], [20, 5], 16, 9, 3, 64)
    bt = torch.tensor([tables[0], tables[1] + [0]])
    return dict(q=q, k_cache=k, v_cache=v, block_tables=bt, context_lens=torch.tensor([20, 5]))


@pytest.mark.parametrize("change,message", [
    (lambda a: a.update(q=a["q"].double()), "q must be a (num_seqs, num_heads, head_dim) float32 or bfloat16"),
    (lambda a: a.update(q=a["q"][0]), "q must be a (num_seqs, num_heads, head_dim) float32 or bfloat16"),
    (lambda a: a.update({n: a[n].half() for n in a if n.endswith(("q", "cache"))}),
     "float32 or bfloat16 CPU tensor, got [2, 9, 64] Half"),
    (lambda a: a.update(q=a["q"].bfloat16()), "(the 8-bit cache), got q BFloat16, k_cache Float, v_cache Float"),
    (lambda a: a.update(k_cache=a["k_cache"].bfloat16()), "(the 8-bit cache), got q Float, k_cache BFloat16, v_cache Float"),
    (lambda a: a.update(v_cache=a["v_cache"].bfloat16()), "(the 8-bit cache), got q Float, k_cache Float, v_cache BFloat16"),
    (lambda a: a.update(k_cache=a["k_cache"].half()), "(the 8-bit cache), got q Float, k_cache Half, v_cache Float"),
    (lambda a: a.update(k_cache=a["k_cache"].transpose(1, 2)), "k_cache must be a contiguous"),
    (lambda a: a.update({n: a[n].bfloat16() for n in a if n.endswith(("q", "cache"))},
                        k_cache=a["k_cache"].bfloat16().transpose(1, 2)), "k_cache must be a contiguous"),
    (lambda a: a.update(v_cache=a["v_cache"][:, :8]), "v_cache must be contiguous of k_cache's shape"),
    (lambda a: a.update(q=a["q"][:, :, :32]), "head_dim of q (32) and cache (64) differ"),
    (lambda a: a.update(q=a["q"][:, :8]), "num_heads (8) must be a multiple of num_kv_heads (3)"),
    (lambda a: a.update(block_tables=a["block_tables"].int()), "block_tables must be (num_seqs=2, max_blocks) int64"),
    (lambda a: a.update(block_tables=a["block_tables"][:1]), "block_tables must be (num_seqs=2, max_blocks) int64"),
    (lambda a: a.update(context_lens=a["context_lens"].int()), "context_lens must be (num_seqs=2,) int64"),
    (lambda a: a.update(context_lens=torch.tensor([20, 0])), "context_lens[1] = 0 is outside"),
    (lambda a: a.update(context_lens=torch.tensor([33, 5])), "context_lens[0] = 33 is outside"),
    (lambda a: a["block_tables"].__setitem__((1, 0), 999), "block_tables[1, 0] = 999 is not a block of the cache"),
    (lambda a: a["block_tables"].__setitem__((0, 1), -1), "block_tables[0, 1] = -1 is not a block of the cache"),
])
def test_bad_inputs_raise(change, message):
    args = _good()
    change(args)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        OPS.paged_attention_decode(args["q"], args["k_cache"], args["v_cache"], args["block_tables"],
                                   args["context_lens"], SCALE, 0)


def test_bad_window_and_head_dim_raise():
    a = _good()
    with pytest.raises(RuntimeError, match="window must be >= 0"):
        OPS.paged_attention_decode(a["q"], a["k_cache"], a["v_cache"], a["block_tables"], a["context_lens"], SCALE, -1)
    k = torch.randn(4, 16, 3, 12)
    with pytest.raises(RuntimeError, match="head_dim must be a multiple of 8, got 12"):
        OPS.paged_attention_decode(torch.randn(1, 3, 12), k, k, torch.zeros(1, 1, dtype=torch.long),
                                   torch.tensor([4]), SCALE, 0)


@DTYPES
def test_write_kv_native_matches_index_copy(dtype):
    # k and v as the model passes them: strided views of the fused qkv output (heads contiguous)
    g = torch.Generator().manual_seed(5)
    kc, vc = torch.randn(6, 16, 3, 64, generator=g).to(dtype), torch.randn(6, 16, 3, 64, generator=g).to(dtype)
    qkv = torch.randn(5, 9 * 64 + 2 * 3 * 64, generator=g).to(dtype)
    _, k, v = qkv.split([9 * 64, 3 * 64, 3 * 64], dim=-1)
    k, v = k.view(5, 3, 64), v.view(5, 3, 64)
    slots = torch.tensor([0, 17, 95, 40, 3])
    want_k, want_v = kc.clone(), vc.clone()
    want_k.view(-1, 3, 64).index_copy_(0, slots, k)
    want_v.view(-1, 3, 64).index_copy_(0, slots, v)
    OPS.write_kv_(kc, vc, k, v, slots)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    # and attention.write_kv takes the native call for such inputs
    kc2, vc2 = want_k.clone().zero_(), want_v.clone().zero_()
    attention.write_kv(kc2, vc2, k, v, slots)
    assert torch.equal(kc2.view(-1, 3, 64)[slots], k) and torch.equal(vc2.view(-1, 3, 64)[slots], v)


def test_write_kv_rejects_bad_input():
    kc = torch.zeros(2, 4, 3, 8)
    k = torch.ones(2, 3, 8)
    with pytest.raises(RuntimeError, match=re.escape("slot_mapping[1] = 8 is outside the cache (8 slots)")):
        OPS.write_kv_(kc, kc.clone(), k, k, torch.tensor([0, 8]))
    with pytest.raises(RuntimeError, match="slot_mapping\\[0\\] = -1"):
        OPS.write_kv_(kc, kc.clone(), k, k, torch.tensor([-1, 0]))
    with pytest.raises(RuntimeError, match="k and v must be"):
        OPS.write_kv_(kc, kc.clone(), k.bfloat16(), k, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="k and v must be"):
        OPS.write_kv_(kc, kc.clone(), torch.ones(2, 8, 3).transpose(1, 2), k, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="one shape and dtype"):
        OPS.write_kv_(kc, kc.bfloat16(), k, k, torch.tensor([0, 1]))


@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (8, 2, 256), (4, 1, 32), (6, 1, 8)])
def test_bf16_avx512_and_avx2_paths_agree(monkeypatch, heads, kv_heads, dim):
    # on a CPU with AVX512-BF16 the default run takes the AVX-512 code (head_dim % 32 == 0) and
    # LEANSERVE_AVX512=0 the AVX2 code; each is held to the float32 reference above, and here to
    # each other: the same float32 math up to summation order, so within one bf16 rounding
    clens = [1, 15, 16, 17, 300]
    q, k, v, tables = _case([1] * len(clens), clens, 16, heads, kv_heads, dim, dtype=torch.bfloat16)
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    for window in (0, 7):
        monkeypatch.delenv("LEANSERVE_AVX512", raising=False)
        wide = OPS.paged_attention_decode(q, k, v, padded, torch.tensor(clens), SCALE, window)
        monkeypatch.setenv("LEANSERVE_AVX512", "0")
        narrow = OPS.paged_attention_decode(q, k, v, padded, torch.tensor(clens), SCALE, window)
        torch.testing.assert_close(wide.float(), narrow.float(), rtol=2**-7, atol=1e-5)
        assert (wide == narrow).float().mean() > 0.97


@DTYPES
@pytest.mark.parametrize("window", [None, 6, 40])
def test_rows_of_one_sequence_read_together_equal_each_row_alone(dtype, window):
    # a speculative step's rows: consecutive positions over one block table (here 5 and 20 rows, the
    # latter past the kernel's group of 16) between two single decodes. Taken together they share
    # each K/V load; each row must still see exactly its own causal prefix (and window).
    L = 70
    clens = [33] + list(range(L - 4, L + 1)) + list(range(L + 10, L + 30)) + [9]
    q, k, v, tables = _case([1], [L + 29], 16, 9, 3, 64, dtype=dtype, spare_blocks=20)
    other = [[t] for t in range(3)]  # the single decodes read other blocks (noise)
    rows = [other[0]] + [tables[0]] * 25 + [other[1]]
    width = max(len(t) for t in rows)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in rows])
    q = torch.randn(len(clens), 9, 64, generator=torch.Generator().manual_seed(1)).to(dtype) * 3
    lens = torch.tensor(clens)
    together = OPS.paged_attention_decode(q, k, v, padded, lens, SCALE, window or 0)
    alone = torch.cat([OPS.paged_attention_decode(q[i:i + 1], k, v, padded[i:i + 1], lens[i:i + 1], SCALE, window or 0)
                       for i in range(len(clens))])
    if window is None:
        assert torch.equal(together, alone)  # the group only adds exact zeros to each row's sums
    else:
        torch.testing.assert_close(together.float(), alone.float(), atol=1e-5 if dtype == torch.float32 else 1e-2,
                                   rtol=1e-5 if dtype == torch.float32 else 1e-2)
