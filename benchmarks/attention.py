"""Decode attention micro-benchmark: the gather + SDPA path against the native paged-attention kernel.

SmolLM2-135M shapes (9 query heads, 3 KV heads, head_dim 64, block_size 16, float32 or --dtype bfloat16), one query token
per sequence at batch 1, 8, 32, 80 and context 128, 512, 1024, each sequence's blocks scattered over a
shuffled pool. Both paths are timed through ``paged_attention`` as a model layer calls it, with the
step's metadata already built (shared by all layers of a step, so not timed) and, for SDPA, the
runner's reused gather workspace and masks built on the warm-up call. Calls of the two paths
alternate so both see the same machine conditions; each call reads the next of up to 30 layers' caches
(SmolLM2's depth, at most ~512 MB of K/V in all) so small caches are not served from L2 every time.
Prints a markdown table: median ms per call of each path, SDPA / kernel, and the K/V bytes the kernel
reads per second (batch * context * 3 KV heads * 64 * 2 or 4 bytes * 2 (K and V) / its time).

    .venv/bin/python benchmarks/attention.py                        # the full grid, about 30 s
    .venv/bin/python benchmarks/attention.py --batch 32 --context 512 --min-time 2

``--kv-cache-dtype int8``: the kernel over the 8-bit cache against the kernel over the cache in
--dtype (the same random K/V, quantized), instead of SDPA against the kernel; GB/s then are the
8-bit cache's bytes (values and scales).
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
from leanserve.model import attention  # noqa: E402
from leanserve.model.attention import AttentionMetadata, GatherWorkspace, paged_attention, quantize_kv_cache  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, LAYERS = 9, 3, 64, 16, 30
SCALE = HEAD_DIM ** -0.5
MAX_KV_BYTES = 512 << 20


def kv_bytes(batch: int, context: int, dtype: torch.dtype = torch.float32) -> int:
    return batch * context * KV_HEADS * HEAD_DIM * dtype.itemsize * 2


def measure(batch: int, context: int, min_time: float, dtype: torch.dtype = torch.float32,
            seed: int = 0, int8: bool = False) -> tuple[float, float]:
    """Median seconds per call: (gather + SDPA, kernel), or with ``int8`` (kernel over the dtype cache,
    kernel over the 8-bit cache)."""
    g = torch.Generator().manual_seed(seed)
    per_seq = -(-context // BLOCK_SIZE)
    num_blocks = batch * per_seq
    layers = max(1, min(LAYERS, MAX_KV_BYTES // kv_bytes(batch, context, dtype)))
    caches = [(torch.randn(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, generator=g).to(dtype),
               torch.randn(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, generator=g).to(dtype)) for _ in range(layers)]
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = [perm[i * per_seq:(i + 1) * per_seq] for i in range(batch)]
    q = torch.randn(batch, HEADS, HEAD_DIM, generator=g).to(dtype)
    meta = AttentionMetadata.build([1] * batch, [context] * batch, tables, BLOCK_SIZE, {None})
    meta.workspace = GatherWorkspace()

    def sdpa(k, v):  # the kernel switched off the way the CUDA path sees it (a plain swap: cheap)
        real, attention._decode_kernel = attention._decode_kernel, lambda *a: None
        try:
            return paged_attention(q, k, v, meta, SCALE, None)
        finally:
            attention._decode_kernel = real

    def kernel(k, v):
        return paged_attention(q, k, v, meta, SCALE, None)

    quantized = [(quantize_kv_cache(k), quantize_kv_cache(v)) for k, v in caches] if int8 else []

    def kernel_int8(i):  # layer i's cache, quantized
        return paged_attention(q, *quantized[i], meta, SCALE, None)

    first, second = (sdpa, kernel) if not int8 else (kernel, None)
    times: dict = {first: [], second: []}
    with torch.inference_mode():
        if int8:  # warm-up, and a check: the 8-bit cache is within a few percent
            want = kernel(*caches[0]).float()
            assert (kernel_int8(0).float() - want).norm() < 0.05 * want.norm()
        else:
            tol = 1e-5 if dtype == torch.float32 else 2e-2  # bfloat16: the SDPA path rounds more often
            torch.testing.assert_close(kernel(*caches[0]), sdpa(*caches[0]), atol=tol, rtol=tol)  # warm-up, and a check
        start, i = time.perf_counter(), 0
        while i < 5 or (time.perf_counter() - start < min_time and i < 1000):
            for f in (first, second):
                t = time.perf_counter()
                f(*caches[i % layers]) if f is not None else kernel_int8(i % layers)
                times[f].append(time.perf_counter() - t)
            i += 1
    return statistics.median(times[first]), statistics.median(times[second])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 80])
    p.add_argument("--context", type=int, nargs="+", default=[128, 512, 1024])
    p.add_argument("--min-time", type=float, default=2.5, help="seconds of timed calls per cell (both paths)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="q and the K/V cache")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8"],
                   help="int8: the kernel over the 8-bit cache against the kernel over the --dtype cache")
    args = p.parse_args()
    int8 = args.kv_cache_dtype == "int8"
    dtype = getattr(torch, args.dtype)
    if kernels.ops() is None:
        sys.exit(f"the native kernels are unavailable: {kernels.status()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; SmolLM2-135M decode attention "
          f"({HEADS} heads, {KV_HEADS} KV heads, head_dim {HEAD_DIM}, block_size {BLOCK_SIZE}, {args.dtype})\n")
    if int8:
        print(f"| batch | context | kernel, {args.dtype} cache ms | kernel, int8 cache ms | speed-up | int8 K/V GB/s |")
    else:
        print("| batch | context | gather+SDPA ms | kernel ms | SDPA / kernel | kernel K/V GB/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for batch in args.batch:
        for context in args.context:
            old, new = measure(batch, context, args.min_time, dtype, int8=int8)
            moved = kv_bytes(batch, context, dtype) * (HEAD_DIM + 4) // (HEAD_DIM * dtype.itemsize) if int8 else \
                kv_bytes(batch, context, dtype)
            print(f"| {batch} | {context} | {old * 1e3:.3f} | {new * 1e3:.3f} | {old / new:.2f}x | "
                  f"{moved / new / 1e9:.1f} |", flush=True)


if __name__ == "__main__":
    main()
