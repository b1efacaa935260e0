"""Prefill attention on CPU: one SDPA call per sequence against folding each chunk into the native decode kernel.

A folded chunk becomes one decode row per query token, each seeing its own causal prefix, so a
step's short prompts take one native call per layer instead of one SDPA call (and a gather) per
sequence per layer. This picks ``attention.FOLD_PREFILL_UPTO`` (the longest context folded) and
``FOLD_QUERY_UPTO`` (chunks this short fold at any context: a speculative step's drafts).

SmolLM2-135M shapes (9 query heads, 3 KV heads, head_dim 64, block_size 16, float32), ``batch``
sequences each computing ``query`` new tokens at the end of a ``context``-token context (query ==
context: a fresh prompt; query < context: the rest after a prefix-cache hit). Per cell, the median
of alternating calls of each path for one step: the metadata build (once per step) plus 30 layer
calls (SmolLM2's depth, each reading its own cache). Prints a markdown table.

    .venv/bin/python benchmarks/attention_fold.py
    .venv/bin/python benchmarks/attention_fold.py --batch 64 --context 48 --query 48
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leanserve import kernels  # noqa: E402
from leanserve.model.attention import FOLD_PREFILL_UPTO, AttentionMetadata, paged_attention  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, LAYERS = 9, 3, 64, 16, 30
SCALE = HEAD_DIM ** -0.5
GRID = [(64, 32, 32), (64, 48, 16), (16, 128, 128), (8, 256, 256), (4, 256, 32), (4, 512, 512), (2, 1024, 1024),
        (1, 1024, 5), (4, 2048, 5), (8, 512, 9), (1, 1024, 16), (2, 1024, 32)]


def measure(batch: int, context: int, query: int, min_time: float, seed: int = 0) -> tuple[float, float]:
    """Median seconds per step of 30 layers, metadata included: (SDPA per sequence, folded)."""
    g = torch.Generator().manual_seed(seed)
    per_seq = -(-context // BLOCK_SIZE)
    num_blocks = batch * per_seq
    caches = [(torch.randn(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, generator=g),
               torch.randn(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, generator=g)) for _ in range(LAYERS)]
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = [perm[i * per_seq:(i + 1) * per_seq] for i in range(batch)]
    q = torch.randn(batch * query, HEADS, HEAD_DIM, generator=g)

    def step(fold_upto: int) -> torch.Tensor:
        meta = AttentionMetadata.build([query] * batch, [context] * batch, tables, BLOCK_SIZE, {None},
                                       fold_upto=fold_upto)
        for k, v in caches:
            out = paged_attention(q, k, v, meta, SCALE, None)
        return out

    paths = {"sdpa": lambda: step(0), "fold": lambda: step(max(context, 1))}
    times: dict[str, list[float]] = {name: [] for name in paths}
    with torch.inference_mode():
        torch.testing.assert_close(paths["fold"](), paths["sdpa"](), atol=1e-5, rtol=1e-5)  # warm-up, and a check
        start, i = time.perf_counter(), 0
        while i < 3 or (time.perf_counter() - start < min_time and i < 200):
            for name, f in paths.items():
                t = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t)
            i += 1
    return statistics.median(times["sdpa"]), statistics.median(times["fold"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int)
    p.add_argument("--context", type=int)
    p.add_argument("--query", type=int)
    p.add_argument("--min-time", type=float, default=2.0, help="seconds of timed steps per cell (both paths)")
    args = p.parse_args()
    if kernels.ops() is None:
        sys.exit(f"the native kernels are unavailable: {kernels.status()}")
    grid = GRID
    if args.batch or args.context or args.query:
        if not (args.batch and args.context and args.query) or args.query > args.context:
            sys.exit("give --batch, --context and --query together, with query <= context")
        grid = [(args.batch, args.context, args.query)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; SmolLM2-135M prefill attention, {LAYERS} "
          f"layers a step, float32; FOLD_PREFILL_UPTO = {FOLD_PREFILL_UPTO}\n")
    print("| batch | context | query | SDPA per sequence ms | folded ms | SDPA / folded |")
    print("|---:|---:|---:|---:|---:|---:|")
    for batch, context, query in grid:
        old, new = measure(batch, context, query, args.min_time)
        print(f"| {batch} | {context} | {query} | {old * 1e3:.2f} | {new * 1e3:.2f} | {old / new:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
