"""The native decode kernel (kernels/csrc/paged_attention.cpp), through ``paged_attention``, against
``reference_attention`` and against the SDPA path it replaces on CPU; and its input checks."""

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


def _case(query_lens, context_lens, block_size, heads, kv_heads, dim, seed=0, spare_blocks=7):
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
    return q, k, v, tables


def _sdpa_path(monkeypatch, q, k, v, meta, window):
    """The gather + SDPA decode path, as on CUDA or without the kernels."""
    with monkeypatch.context() as m:
        m.setattr(attention, "_decode_kernel", lambda *a: None)
        return paged_attention(q, k, v, meta, SCALE, window)


def _check(monkeypatch, qlens, clens, block_size, heads, kv_heads, dim, window, q_transform=None):
    q, k, v, tables = _case(qlens, clens, block_size, heads, kv_heads, dim)
    if q_transform is not None:
        q = q_transform(q)
    meta = AttentionMetadata.build(qlens, clens, tables, block_size, {window})
    calls = []
    real = attention._decode_kernel
    with monkeypatch.context() as m:  # record that the kernel path was taken
        m.setattr(attention, "_decode_kernel", lambda *a: calls.append(1) or real(*a))
        got = paged_attention(q, k, v, meta, SCALE, window)
    assert calls and real(q, k, v) is not None, "the native kernel path was not taken"
    assert not meta.decode_masks, "the kernel path built SDPA decode masks it does not need"
    torch.testing.assert_close(got, reference_attention(q, k, v, meta, SCALE, window), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, _sdpa_path(monkeypatch, q, k, v, meta, window), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("window", [None, 1, 5, 16, 33, 4096])
def test_decode_gqa_lengths_around_block_edges(monkeypatch, block_size, window):
    # GQA 9 heads / 3 KV heads, head_dim 64 (SmolLM2); lengths 1, bs-1, bs, bs+1, long
    clens = [1, block_size - 1, block_size, block_size + 1, 517, 3 * block_size, 2]
    _check(monkeypatch, [1] * len(clens), clens, block_size, 9, 3, 64, window)


@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 4, 64), (8, 2, 256), (6, 1, 8), (2, 1, 24)])
@pytest.mark.parametrize("window", [None, 7, 600])
def test_decode_mha_mqa_and_head_dims(monkeypatch, heads, kv_heads, dim, window):
    clens = [1, 15, 16, 17, 530]
    _check(monkeypatch, [1] * len(clens), clens, 16, heads, kv_heads, dim, window)


@pytest.mark.parametrize("window", [None, 4, 20])
def test_mixed_batch_decode_rows_use_the_kernel(monkeypatch, window):
    # decodes between prefill chunks (a chunk mid-prompt, a whole prompt): decode rows go through the
    # kernel, the chunks through SDPA
    qlens = [1, 7, 1, 40, 1, 1]
    clens = [33, 20, 1, 40, 16, 300]
    _check(monkeypatch, qlens, clens, 16, 9, 3, 64, window)


def test_non_contiguous_q(monkeypatch):
    # q as the model makes it: a slice of a wider projection output (row stride > heads * dim)
    def slice_of_wider(q):
        wide = torch.randn(q.shape[0], q.shape[1] + 3, q.shape[2])
        wide[:, :q.shape[1]] = q
        return wide[:, :q.shape[1]]

    clens = [5, 40, 100]
    for qlens in ([1, 1, 1], [1, 9, 1]):
        _check(monkeypatch, qlens, clens, 16, 9, 3, 64, 30, q_transform=slice_of_wider)


def test_large_scores_need_the_max_subtraction():
    # scores in the hundreds: exp overflows float32 unless the max is subtracted first
    clens = [1, 9, 300]
    q, k, v, tables = _case([1, 1, 1], clens, 16, 9, 3, 64)
    q = q * 20
    meta = AttentionMetadata.build([1, 1, 1], clens, tables, 16, {None})
    got = paged_attention(q, k, v, meta, SCALE, None)
    assert got.isfinite().all()
    torch.testing.assert_close(got, reference_attention(q, k, v, meta, SCALE, None), atol=1e-4, rtol=1e-4)


def test_kernel_direct_with_padded_tables():
    # block tables padded past each sequence's used blocks (here with an out-of-range id: never read)
    clens = [3, 40, 17]
    q, k, v, tables = _case([1, 1, 1], clens, 16, 9, 3, 64)
    padded = torch.tensor([t + [10**6] * (5 - len(t)) for t in tables])
    meta = AttentionMetadata.build([1, 1, 1], clens, tables, 16, {None, 10})
    for window in (None, 10):
        got = OPS.paged_attention_decode(q, k, v, padded, torch.tensor(clens), SCALE, window or 0)
        torch.testing.assert_close(got, reference_attention(q, k, v, meta, SCALE, window), atol=1e-5, rtol=1e-5)
    empty = OPS.paged_attention_decode(q[:0], k, v, padded[:0], torch.tensor([], dtype=torch.long), SCALE, 0)
    assert empty.shape == (0, 9, 64)


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
    (lambda a: a.update(q=a["q"].double()), "q must be a (num_seqs, num_heads, head_dim) float32"),
    (lambda a: a.update(q=a["q"][0]), "q must be a (num_seqs, num_heads, head_dim) float32"),
    (lambda a: a.update(k_cache=a["k_cache"].half()), "k_cache must be a contiguous"),
    (lambda a: a.update(k_cache=a["k_cache"].transpose(1, 2)), "k_cache must be a contiguous"),
    (lambda a: a.update(v_cache=a["v_cache"][:, :8]), "v_cache must be contiguous float32 of k_cache's shape"),
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
