"""Paged attention over a flat batch of tokens from many sequences.

KV cache of one layer, K and V alike::

    cache: (num_blocks, block_size, num_kv_heads, head_dim)
    flat view: (num_blocks * block_size, num_kv_heads, head_dim); slot = block_id * block_size + offset

A sequence's token at position p lives in slot block_table[p // block_size] * block_size + p % block_size.

The 8-bit cache (``--kv-cache-dtype int8``) is int8, sized (num_blocks, block_size, num_kv_heads,
``kv_row_width``): each (token, KV head) row is head_dim int8 values with a float16 scale per 32 of
them, GGUF's Q8_0 (``quantize_kv``: scale = max |x| / 127, values rounded to nearest; a head_dim that
is not a multiple of 32 takes one scale), so K and V stay one tensor each per layer. Inside a block
the bytes are head-major (``int8_cache_views``): the values (num_kv_heads, block_size, head_dim), so
one KV head's rows of a block are contiguous and, at head_dim 64, each one cache line, then the
scales (num_kv_heads, block_size, head_dim / 32). Writes quantize, reads dequantize: the native
kernels in place, the other paths through ``dequantize_kv_blocks`` after the gather.

The flat batch holds, for each scheduled sequence, its new tokens (positions
``context_len - query_len .. context_len - 1``) back to back. Each layer first writes the new
tokens' K and V into their slots (``slot_mapping``) and then attends, so a sequence can read K/V that
another sequence of the same step wrote (prefix-cache hits inside one step).

Implementations, tested against each other:
- ``reference_attention``: a loop over sequences and explicit softmax in float32; obviously right.
- ``paged_attention``: decode sequences (one query token) and prefill chunks separately.
  Decode, float32 or bfloat16 on CPU with the native kernels (``leanserve.kernels.ops()``): one call of
  ``paged_attention_decode`` (kernels/csrc/paged_attention.cpp), which reads each sequence's K/V rows
  in place through its block table (no gather, no padding, no mask) with the query heads of a KV
  head sharing each row (GQA). Otherwise (CUDA, other dtypes, no kernels): one batched SDPA call over
  the K/V gathered a whole block at a time (block tables padded to the longest) with masks, the
  query heads of each KV head grouped so no K/V is repeated. Prefill chunks: one SDPA call per
  sequence; on CPU a chunk whose context is at most ``FOLD_PREFILL_UPTO`` tokens, or with at most
  ``FOLD_QUERY_UPTO`` new tokens, is folded into the decode rows instead, one row per query token
  seeing its own causal prefix. Index tensors are built once per step in ``AttentionMetadata`` and shared by every
  layer; the SDPA decode masks only when first asked for (``DecodeMasks``), so the kernel path never
  builds them, nor fills the gather workspace.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from leanserve import kernels


# On CPU, a prefill chunk whose context is at most FOLD_PREFILL_UPTO tokens, or that has at most
# FOLD_QUERY_UPTO new tokens (a speculative step's drafts, a short turn after a long cached context),
# goes to the decode path as one row per query token (each seeing its own causal prefix): one native
# call for every such chunk of a step instead of a gather and an SDPA call (with a mask, off the fast
# kernel) per sequence per layer. Chosen by benchmarks/attention_fold.py.
FOLD_PREFILL_UPTO = 128
FOLD_QUERY_UPTO = 16


@dataclass
class PrefillSeq:
    query_start: int  # first row of this sequence in the flat batch
    query_len: int
    context_len: int
    blocks: torch.Tensor  # (num_blocks,) the blocks holding positions 0..context_len-1
    masks: dict[int | None, torch.Tensor | None]  # window -> (query_len, context_len) bool, None: plain causal


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (num_tokens,) where each new token's K/V is written
    query_lens: list[int]  # per sequence, in batch order
    context_lens: list[int]  # per sequence: tokens in its context after this step
    block_tables: list[list[int]]  # per sequence
    block_size: int
    # fast path, built by `build`:
    decode_rows: torch.Tensor | None = None  # (num_decode,) rows of decode tokens in the flat batch
    decode_tables: torch.Tensor | None = None  # (num_decode, max_blocks) block tables, padded with block 0
    decode_lens: torch.Tensor | None = None  # (num_decode,) context lengths (int64)
    # window -> (num_decode, 1, 1, max_blocks * block_size), for the SDPA path; built on first use
    decode_masks: dict[int | None, torch.Tensor] = field(default_factory=dict)
    prefills: list[PrefillSeq] = field(default_factory=list)
    workspace: "GatherWorkspace | None" = None  # reusable gather buffers (the runner keeps one)

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        windows: set[int | None],
        device: torch.device | str = "cpu",
        fold_upto: int = FOLD_PREFILL_UPTO,
    ) -> "AttentionMetadata":
        slots: list[int] = []  # plain ints: a tensor per sequence cost ~10 us each at 80 sequences
        rows, lens, owners, prefills = [], [], [], []  # decode rows: flat-batch row, context length, sequence
        cpu = torch.device(device).type == "cpu"
        fold, fold_query = (fold_upto, FOLD_QUERY_UPTO if fold_upto else 0) if cpu else (0, 0)
        row = 0
        for i, (q_len, ctx_len, table) in enumerate(zip(query_lens, context_lens, block_tables)):
            slots += [table[p // block_size] * block_size + p % block_size for p in range(ctx_len - q_len, ctx_len)]
            if q_len <= max(1, fold_query) or ctx_len <= fold:  # each query token a row seeing its causal prefix
                rows += range(row, row + q_len)
                lens += range(ctx_len - q_len + 1, ctx_len + 1)
                owners += [i] * q_len
            else:
                blocks = torch.tensor(table[: -(-ctx_len // block_size)], dtype=torch.long)
                prefills.append(PrefillSeq(row, q_len, ctx_len, blocks,
                                           {w: _prefill_mask(q_len, ctx_len, w) for w in windows}))
            row += q_len
        meta = cls(torch.tensor(slots, dtype=torch.long), query_lens, context_lens, block_tables, block_size, prefills=prefills)
        if rows:
            meta.decode_rows = torch.tensor(rows)
            meta.decode_lens = torch.tensor(lens)
            max_blocks = -(-max(lens) // block_size)
            seqs = sorted(set(owners))
            padded = {}
            for i in seqs:
                used = block_tables[i][: -(-context_lens[i] // block_size)]
                padded[i] = used + [0] * (max_blocks - len(used))
            table_rows = torch.tensor([padded[i] for i in seqs])  # (sequences with decode rows, max_blocks)
            where = {i: j for j, i in enumerate(seqs)}
            meta.decode_tables = table_rows[torch.tensor([where[i] for i in owners])]  # (num_decode, max_blocks)
            meta.decode_masks = DecodeMasks(meta.decode_lens, max_blocks * block_size)
        return meta.to(device)

    def to(self, device: torch.device | str) -> "AttentionMetadata":
        if torch.device(device).type == "cpu":
            return self
        self.slot_mapping = self.slot_mapping.to(device, non_blocking=True)
        if self.decode_rows is not None:
            self.decode_rows = self.decode_rows.to(device, non_blocking=True)
            self.decode_tables = self.decode_tables.to(device, non_blocking=True)
            self.decode_lens = self.decode_lens.to(device, non_blocking=True)
            self.decode_masks = self.decode_masks.to(device)
        for p in self.prefills:
            p.blocks = p.blocks.to(device, non_blocking=True)
            p.masks = {w: (m.to(device, non_blocking=True) if m is not None else None) for w, m in p.masks.items()}
        return self


class DecodeMasks(dict):
    """window -> (num_decode, 1, 1, width) bool mask of the padded decode K/V for SDPA: True at the
    positions a sequence's query sees. Built the first time a window is asked for (then shared by
    every layer of the step), on the device of ``lens``: the native decode kernel needs no masks."""

    def __init__(self, lens: torch.Tensor, width: int) -> None:
        super().__init__()
        self.lens, self.width = lens, width  # (num_decode,) context lengths; max_blocks * block_size

    def __missing__(self, window: int | None) -> torch.Tensor:
        pos = torch.arange(self.width, device=self.lens.device)[None, :]
        lens = self.lens[:, None]
        mask = pos < lens
        if window is not None:
            mask &= pos > lens - 1 - window
        self[window] = mask[:, None, None, :]
        return self[window]

    def to(self, device: torch.device | str) -> "DecodeMasks":
        moved = DecodeMasks(self.lens.to(device, non_blocking=True), self.width)
        moved.update({w: m.to(device, non_blocking=True) for w, m in self.items()})
        return moved


def _slots(table: list[int], length: int, block_size: int) -> torch.Tensor:
    blocks = torch.tensor(table[: -(-length // block_size)], dtype=torch.long)
    return (blocks[:, None] * block_size + torch.arange(block_size)).flatten()[:length]


def _prefill_mask(q_len: int, ctx_len: int, window: int | None) -> torch.Tensor | None:
    if q_len == ctx_len and window is None:
        return None  # plain causal: SDPA's is_causal
    q_pos = torch.arange(ctx_len - q_len, ctx_len)[:, None]
    k_pos = torch.arange(ctx_len)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


KV_GROUP = 32  # values per float16 scale in the 8-bit cache (Q8_0's block)


def kv_group(head_dim: int) -> int:
    """Values per scale in the 8-bit cache: 32, or the whole row where head_dim is not a multiple of 32."""
    return KV_GROUP if head_dim % KV_GROUP == 0 else head_dim


def kv_row_width(head_dim: int, dtype: torch.dtype) -> int:
    """The cache's last dimension for ``dtype``: head_dim, or in int8 head_dim bytes and 2 per scale."""
    return head_dim + 2 * (head_dim // kv_group(head_dim)) if dtype == torch.int8 else head_dim


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., head_dim) float -> the 8-bit cache's rows: int8 values (..., head_dim) and float16 scales
    (..., head_dim / group): per group, scale = max |x| / 127 rounded to float16, values x / scale
    rounded to nearest even (0 where the scale is 0 or the quotient is not a number), clamped to
    [-127, 127]. The reference of the native write_kv_, bit for bit."""
    d = x.shape[-1]
    g = kv_group(d)
    xg = x.float().reshape(*x.shape[:-1], d // g, g)
    scale = (xg.abs().amax(-1, keepdim=True) / 127).half()
    s = scale.float()
    values = torch.where(s > 0, torch.round(xg / s), 0.0).nan_to_num(0.0).clamp(-127, 127).to(torch.int8)
    return values.reshape(x.shape), scale[..., 0]


def int8_cache_views(cache: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8-bit cache (num_blocks, block_size, num_kv_heads, kv_row_width) as views of its bytes: values
    (num_blocks, num_kv_heads, block_size, head_dim) int8 and scales (num_blocks, num_kv_heads,
    block_size, head_dim / group) float16; writing them writes the cache."""
    nb, bs, kvh, width = cache.shape
    if width != kv_row_width(head_dim, torch.int8):
        raise ValueError(f"an 8-bit cache of {width}-byte rows does not hold head_dim {head_dim}")
    flat = cache.view(nb, bs * kvh * width)
    split = kvh * bs * head_dim
    values = flat[:, :split].view(nb, kvh, bs, head_dim)
    return values, flat[:, split:].view(torch.float16).view(nb, kvh, bs, head_dim // kv_group(head_dim))


def quantize_kv_cache(x: torch.Tensor) -> torch.Tensor:
    """(num_blocks, block_size, num_kv_heads, head_dim) float -> the 8-bit cache of those rows."""
    nb, bs, kvh, d = x.shape
    cache = torch.empty(nb, bs, kvh, kv_row_width(d, torch.int8), dtype=torch.int8, device=x.device)
    values, scales = int8_cache_views(cache, d)
    v, s = quantize_kv(x)
    values.copy_(v.transpose(1, 2))
    scales.copy_(s.transpose(1, 2))
    return cache


def dequantize_kv_blocks(blocks: torch.Tensor, dtype: torch.dtype, head_dim: int) -> torch.Tensor:
    """Whole blocks of a cache (n, block_size, num_kv_heads, width) as (n, block_size, num_kv_heads,
    head_dim) of ``dtype``: the 8-bit cache's values times their scales, a float cache's converted."""
    if blocks.dtype != torch.int8:
        return blocks.to(dtype)
    values, scales = int8_cache_views(blocks, head_dim)
    g = kv_group(head_dim)
    grouped = values.float().view(*values.shape[:-1], head_dim // g, g) * scales.float()[..., None]
    return grouped.view(values.shape).to(dtype).transpose(1, 2)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    # k, v: (num_tokens, num_kv_heads, head_dim) -> their slots in the flat cache (quantized into the 8-bit one)
    if (k_cache.is_cpu and k.dtype == v.dtype and k_cache.dtype in (k.dtype, torch.int8) and v_cache.dtype == k_cache.dtype
            and k.dtype in (torch.float32, torch.bfloat16) and k.stride(-1) == 1 and v.stride(-1) == 1
            and k.stride(1) == k.shape[2] and v.stride(1) == v.shape[2] and (ops := kernels.ops()) is not None):
        ops.write_kv_(k_cache, v_cache, k, v, slot_mapping)  # one native call for both (kernels/csrc/paged_attention.cpp)
        return
    if k_cache.dtype == torch.int8:
        block, offset = slot_mapping // k_cache.shape[1], slot_mapping % k_cache.shape[1]
        for cache, x in ((k_cache, k), (v_cache, v)):
            values, scales = int8_cache_views(cache, x.shape[-1])
            values[block, :, offset], scales[block, :, offset] = quantize_kv(x)
        return
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention(
    q: torch.Tensor,  # (num_tokens, num_heads, head_dim)
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None,
) -> torch.Tensor:  # (num_tokens, num_heads, head_dim)
    _, block_size, num_kv_heads, _ = k_cache.shape
    head_dim = q.shape[-1]
    group = q.shape[1] // num_kv_heads
    ops = _decode_kernel(q, k_cache, v_cache) if meta.decode_rows is not None else None
    kernel_args = (k_cache, v_cache, meta.decode_tables, meta.decode_lens, scale, window or 0)  # window 0: full
    if ops is not None and not meta.prefills:  # decode only: the decode rows are the whole batch, in order
        return ops.paged_attention_decode(q, *kernel_args)
    out = torch.empty_like(q)
    if ops is not None:  # the native kernel reads K/V in place: no gather, no masks
        out[meta.decode_rows] = ops.paged_attention_decode(q[meta.decode_rows], *kernel_args)
    elif meta.decode_rows is not None:
        n = meta.decode_rows.shape[0]
        # query head h reads KV head h // group: (n, num_kv_heads, group, head_dim)
        qd = q[meta.decode_rows].view(n, num_kv_heads, group, head_dim)
        ws = meta.workspace
        kd = _gather_blocks(k_cache, meta.decode_tables, ws and ws.get(0, k_cache, meta.decode_tables.numel()))
        vd = _gather_blocks(v_cache, meta.decode_tables, ws and ws.get(1, v_cache, meta.decode_tables.numel()))
        # (n, num_kv_heads, max_blocks * block_size, head_dim)
        kd = _rows(kd, k_cache, q.dtype, head_dim).view(n, -1, num_kv_heads, head_dim).transpose(1, 2)
        vd = _rows(vd, v_cache, q.dtype, head_dim).view(n, -1, num_kv_heads, head_dim).transpose(1, 2)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_masks[window], scale=scale)
        out[meta.decode_rows] = od.reshape(n, -1, head_dim)
    for p in meta.prefills:
        qp = q[p.query_start:p.query_start + p.query_len].transpose(0, 1)  # (num_heads, query_len, head_dim)
        kp = _rows(_gather_blocks(k_cache, p.blocks), k_cache, q.dtype, head_dim)[:p.context_len].transpose(0, 1)
        vp = _rows(_gather_blocks(v_cache, p.blocks), v_cache, q.dtype, head_dim)[:p.context_len].transpose(0, 1)
        mask = p.masks[window]
        # 4-D (a batch of one): on CPU only 4-D inputs take the flash kernel; 3-D ones fall back to
        # the math path, 2.6x (float32) to 4.4x (bfloat16) slower for a 100-token prompt
        op = F.scaled_dot_product_attention(qp[None], kp[None], vp[None], attn_mask=mask, is_causal=mask is None,
                                            scale=scale, enable_gqa=True)[0]
        out[p.query_start:p.query_start + p.query_len] = op.transpose(0, 1)
    return out


def _decode_kernel(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor):
    """``torch.ops.leanserve`` when the native decode kernel applies (q float32 or bfloat16, the caches
    of q's dtype or both 8-bit, on CPU, head_dim a multiple of 8), else None."""
    if (k_cache.dtype in (q.dtype, torch.int8) and v_cache.dtype == k_cache.dtype
            and q.dtype in (torch.float32, torch.bfloat16) and q.is_cpu
            and k_cache.is_cpu and q.shape[-1] % 8 == 0):
        return kernels.ops()
    return None


def _rows(gathered: torch.Tensor, cache: torch.Tensor, dtype: torch.dtype, head_dim: int) -> torch.Tensor:
    """Gathered whole blocks of ``cache`` as token rows (tokens, num_kv_heads, head_dim) of ``dtype``."""
    blocks = dequantize_kv_blocks(gathered.view(-1, *cache.shape[1:]), dtype, head_dim)
    return blocks.reshape(-1, *blocks.shape[2:])


def _gather_blocks(cache: torch.Tensor, blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    # whole blocks as rows of a 2-D view: index_select copies each block in one piece, ~5x faster on
    # CPU than advanced indexing of the 4-D cache
    rows = cache.view(cache.shape[0], -1)
    if out is None:
        return torch.index_select(rows, 0, blocks.flatten())
    return torch.index_select(rows, 0, blocks.flatten(), out=out)


class GatherWorkspace:
    """Buffers for gathered K/V blocks, reused by every layer and step. A fresh tens-of-MB tensor
    per layer costs more in page faults on CPU than the copy itself (measured: 6.5 ms vs 1.3 ms)."""

    def __init__(self) -> None:
        self.buffers: dict[int, torch.Tensor] = {}

    def get(self, slot: int, cache: torch.Tensor, num_blocks: int) -> torch.Tensor:
        width = cache[0].numel()
        buf = self.buffers.get(slot)
        if buf is None or buf.numel() < num_blocks * width or buf.dtype != cache.dtype or buf.device != cache.device:
            buf = self.buffers[slot] = torch.empty(num_blocks * width, dtype=cache.dtype, device=cache.device)
        return buf[: num_blocks * width].view(num_blocks, width)


def reference_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """Per sequence, per position, explicit float32 softmax(q k^T) v over the paged cache."""
    out = torch.empty_like(q)
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    row = 0
    for q_len, ctx_len, table in zip(meta.query_lens, meta.context_lens, meta.block_tables):
        slots = _slots(table, ctx_len, meta.block_size).to(q.device)
        k = _rows(k_cache, k_cache, torch.float32, q.shape[-1])[slots]  # (ctx_len, num_kv_heads, head_dim)
        v = _rows(v_cache, v_cache, torch.float32, q.shape[-1])[slots]
        k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)  # (ctx_len, num_heads, head_dim)
        v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)
        for i in range(q_len):
            pos = ctx_len - q_len + i
            lo = 0 if window is None else max(0, pos - window + 1)
            scores = torch.einsum("hd,khd->hk", q[row + i].float(), k[lo:pos + 1]) * scale
            out[row + i] = torch.einsum("hk,khd->hd", scores.softmax(-1), v[lo:pos + 1]).to(q.dtype)
        row += q_len
    return out
