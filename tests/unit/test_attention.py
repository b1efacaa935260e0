"""The fast paged-attention path against the obviously-correct reference, and the metadata it builds."""

from __future__ import annotations

import pytest
import torch

from leanserve.model.attention import FOLD_PREFILL_UPTO, FOLD_QUERY_UPTO, AttentionMetadata, paged_attention, reference_attention, write_kv


def _setup(query_lens, context_lens, block_size=4, num_blocks=40, heads=4, kv_heads=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, used = [], 0
    for c in context_lens:
        n = -(-c // block_size)
        tables.append(perm[used:used + n])
        used += n
    q = torch.randn(sum(query_lens), heads, dim, generator=g)
    return q, k_cache, v_cache, tables


@pytest.mark.parametrize("window", [None, 3, 6])
@pytest.mark.parametrize("fold_upto", [0, 10, FOLD_PREFILL_UPTO], ids=["sdpa", "some-folded", "all-folded"])
def test_fast_path_matches_reference_mixed_batch(window, fold_upto):
    # two decodes, a short chunk mid-prompt, a long one, another decode
    qlens, clens = [1, 1, 5, 20, 1], [7, 13, 11, 24, 1]
    q, k, v, tables = _setup(qlens, clens)
    meta = AttentionMetadata.build(qlens, clens, tables, 4, {window}, fold_upto=fold_upto)
    assert len(meta.prefills) == {0: 2, 10: 1, FOLD_PREFILL_UPTO: 0}[fold_upto]
    got = paged_attention(q, k, v, meta, 0.3, window)
    ref = reference_attention(q, k, v, meta, 0.3, window)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_slot_mapping_points_at_new_tokens():
    # sequence 0: blocks [5, 2], context 6, 2 new tokens at positions 4, 5 -> block 2 offsets 0, 1
    # sequence 1: blocks [7], context 3, 1 new token at position 2 -> block 7 offset 2
    meta = AttentionMetadata.build([2, 1], [6, 3], [[5, 2], [7]], 4, {None}, fold_upto=0)
    assert meta.slot_mapping.tolist() == [2 * 4 + 0, 2 * 4 + 1, 7 * 4 + 2]
    assert meta.decode_rows.tolist() == [2]
    assert meta.decode_tables.tolist() == [[7]]
    assert meta.decode_masks[None][0, 0, 0].tolist() == [True, True, True, False]  # the block's 4th slot is empty
    assert len(meta.prefills) == 1 and meta.prefills[0].blocks.tolist() == [5, 2]


def test_short_prefill_folds_into_decode_rows():
    # the same step with folding: each of sequence 0's two new tokens is a decode row seeing its own
    # causal prefix (5 and 6 tokens) through sequence 0's table; the tables pad with block 0
    meta = AttentionMetadata.build([2, 1], [6, 3], [[5, 2], [7]], 4, {None}, fold_upto=6)
    assert meta.prefills == []
    assert meta.decode_rows.tolist() == [0, 1, 2]
    assert meta.decode_lens.tolist() == [5, 6, 3]
    assert meta.decode_tables.tolist() == [[5, 2], [5, 2], [7, 0]]
    assert meta.decode_masks[None][:, 0, 0].tolist() == [[True] * 5 + [False] * 3, [True] * 6 + [False] * 2,
                                                         [True] * 3 + [False] * 5]
    # a context one past the limit stays a prefill, unless the chunk is short (FOLD_QUERY_UPTO new
    # tokens: a speculative step's drafts); off the CPU nothing folds
    table = list(range(8))
    assert len(AttentionMetadata.build([FOLD_QUERY_UPTO + 1], [30], [table], 4, {None}, fold_upto=29).prefills) == 1
    assert len(AttentionMetadata.build([FOLD_QUERY_UPTO + 1], [30], [table], 4, {None}, fold_upto=30).prefills) == 0
    short = AttentionMetadata.build([FOLD_QUERY_UPTO], [30], [table], 4, {None}, fold_upto=1)
    assert short.prefills == [] and short.decode_lens.tolist() == list(range(31 - FOLD_QUERY_UPTO, 31))
    assert AttentionMetadata.build([2], [6], [[5, 2]], 4, {None}, device="meta", fold_upto=6).decode_rows is None


def test_write_kv_then_attention_reads_it():
    k = torch.zeros(4, 2, 1, 2)
    v = torch.zeros(4, 2, 1, 2)
    new = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]])
    write_kv(k, v, new, new * 10, torch.tensor([5, 0]))
    assert k[2, 1, 0].tolist() == [1.0, 2.0] and k[0, 0, 0].tolist() == [3.0, 4.0]
    assert v[2, 1, 0].tolist() == [10.0, 20.0]


def test_decode_window_mask_keeps_exactly_the_window():
    meta = AttentionMetadata.build([1], [10], [[0, 1, 2]], 4, {None, 3})
    assert meta.decode_masks[None][0, 0, 0].tolist() == [True] * 10 + [False] * 2
    assert meta.decode_masks[3][0, 0, 0].tolist() == [False] * 7 + [True] * 3 + [False] * 2
