"""Run a leanserve model over the paged KV cache the way the engine does, chunk by chunk."""

from __future__ import annotations

import torch

from leanserve.model.attention import AttentionMetadata, kv_row_width


def new_kv_caches(model, num_blocks: int, block_size: int, dtype=torch.float32):
    """Zeroed caches of every layer; dtype torch.int8: the 8-bit cache (rows of head_dim + 4 bytes)."""
    c = model.cfg
    shape = (num_blocks, block_size, c.num_kv_heads, kv_row_width(c.head_dim, dtype))
    return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in range(c.num_layers)]


@torch.inference_mode()
def paged_logits(model, seqs: list[list[int]], chunk_plan: list[int], block_size: int = 4,
                 block_tables: list[list[int]] | None = None, num_blocks: int = 64) -> list[torch.Tensor]:
    """Feed every sequence through the model in steps: step k computes ``chunk_plan[k]`` new tokens
    of each sequence (after the plan runs out: one token per step, i.e. decode). All sequences share
    each step's flat batch. Returns per sequence the logits of every position, (len, vocab)."""
    kv = new_kv_caches(model, num_blocks, block_size)
    windows = set(model.cfg.layer_windows)
    if block_tables is None:  # scattered, non-contiguous blocks: a slot-mapping bug cannot hide
        per = -(-max(len(s) for s in seqs) // block_size)
        ids = list(range(num_blocks))[::-1]
        block_tables = [ids[i * per:(i + 1) * per] for i in range(len(seqs))]
    done = [0] * len(seqs)
    out: list[list[torch.Tensor]] = [[] for _ in seqs]
    step = 0
    while any(d < len(s) for d, s in zip(done, seqs)):
        want = chunk_plan[step] if step < len(chunk_plan) else 1
        ids_, pos, qlens, clens, tables, active = [], [], [], [], [], []
        for i, s in enumerate(seqs):
            n = min(want, len(s) - done[i])
            if n <= 0:
                continue
            ids_ += s[done[i]:done[i] + n]
            pos += range(done[i], done[i] + n)
            qlens.append(n)
            clens.append(done[i] + n)
            tables.append(block_tables[i])
            active.append(i)
        meta = AttentionMetadata.build(qlens, clens, tables, block_size, windows)
        hidden = model(torch.tensor(ids_), torch.tensor(pos), meta, kv)
        logits = model.compute_logits(hidden)
        row = 0
        for i, n in zip(active, qlens):
            out[i].append(logits[row:row + n])
            done[i] += n
            row += n
        step += 1
    return [torch.cat(o) for o in out]
