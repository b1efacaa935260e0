"""The native quantized matmul (leanserve/kernels/csrc/qlinear.cpp) against BLAS on float32 weights.

For SmolLM2-135M's matmul shapes, in the GGUF's own formats (Q4_1 layers, Q8_0 LM head), at 1 to
64 rows of x: median microseconds per call of each, the ratio, and the weight bytes each reads per
call over the time (GB/s). The ratio picks ``KERNEL_ROWS`` in leanserve/model/quant.py: the
kernel is used up to the row count where BLAS catches up. Both run in the same process, one after
the other, per shape and row count.

    .venv/bin/python benchmarks/qlinear.py
    .venv/bin/python benchmarks/qlinear.py --rows 1,4 --repeats 100
    .venv/bin/python benchmarks/qlinear.py --dtype bfloat16     # against bfloat16 weights (AMX where present)
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from leanserve import kernels
from leanserve.model.quant import from_gguf_blocks, qlinear

SHAPES = [  # (name, GGUF type, out_features N, in_features K) of SmolLM2-135M
    ("qkv_proj", "Q4_1", 960, 576),
    ("o_proj", "Q4_1", 576, 576),
    ("gate_up_proj", "Q4_1", 3072, 576),
    ("down_proj", "Q4_1", 576, 1536),
    ("lm_head", "Q8_0", 49152, 576),
]


def median_time(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,4,8,16,24,32,48,64")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="activations and the dense weight (bfloat16: the kernel widens x, oneDNN/AMX on the weight)")
    args = ap.parse_args()
    if kernels.ops() is None:
        raise SystemExit(f"qlinear benchmark: {kernels.status()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {kernels.status()}\n")
    dtype = getattr(torch, args.dtype)
    d = {"float32": "fp32", "bfloat16": "bf16"}[args.dtype]
    print(f"| matmul | format | rows | qlinear µs | BLAS {d} µs | BLAS / qlinear | qlinear GB/s | {d} GB/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    rng = np.random.default_rng(0)
    for name, fmt, n, k in SHAPES:
        raw = quantize(rng.standard_normal((n, k)).astype(np.float32), GGMLQuantizationType[fmt])
        w = torch.from_numpy(dequantize(raw, GGMLQuantizationType[fmt])).to(dtype)
        qw = from_gguf_blocks(raw, fmt, n, k)
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, k).to(dtype)
            tq = median_time(lambda: qlinear(x, qw), args.repeats)
            tf = median_time(lambda: x @ w.t(), args.repeats)
            print(f"| {name} {n}x{k} | {fmt} | {rows} | {tq * 1e6:.0f} | {tf * 1e6:.0f} | {tf / tq:.2f} | "
                  f"{qw.nbytes / tq / 1e9:.1f} | {w.nbytes / tf / 1e9:.1f} |", flush=True)


if __name__ == "__main__":
    main()
