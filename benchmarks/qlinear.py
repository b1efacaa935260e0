"""The native quantized matmul (leanserve/kernels/csrc/qlinear.cpp) against BLAS on float32 weights.

For SmolLM2-135M's matmul shapes, in the GGUF's own formats (Q4_1 layers, Q8_0 LM head), at 1 to
64 rows of x: median microseconds per call of each, the ratio, and the weight bytes each reads per
call over the time (GB/s). The ratio picks ``KERNEL_ROWS`` in leanserve/model/quant.py: the
kernel is used up to the row count where BLAS catches up. Both run in the same process, one after
the other, per shape and row count.

    .venv/bin/python benchmarks/qlinear.py
    .venv/bin/python benchmarks/qlinear.py --rows 1,4 --repeats 100
    .venv/bin/python benchmarks/qlinear.py --dtype bfloat16     # against bfloat16 weights (AMX where present)
    .venv/bin/python benchmarks/qlinear.py --model-pass         # SmolLM2's own blocks, bf16 rows: AVX512-BF16 vs AVX2
    .venv/bin/python benchmarks/qlinear.py --dense --dtype bfloat16 --rows 1,8,16,32,64,128,256   # blocks only
    .venv/bin/python benchmarks/qlinear.py --dense --layers-only --layer-format Q8_0 --dtype bfloat16 --rows 8,12,16
    .venv/bin/python benchmarks/qlinear.py --dense --layers-only --dtype bfloat16 --rows 64 --tile-rows 512
    .venv/bin/python benchmarks/qlinear.py --dense --layers-only --layer-format Q5_0 --dtype bfloat16 --rows 1,8,16,24
    for p in 0 1 0 1; do .venv/bin/python benchmarks/qlinear.py --model-pass --rows 1 --paths $p; done   # one path per process

--model-pass times what one decode step of SmolLM2 asks of the kernel: every quantized matmul of
the default GGUF (30 layers x 4, then the LM head; 115 MB) once, in forward order, so the weights
stream as they do in the model. bfloat16 rows, the AVX512-BF16 path against the AVX2 one
(``LEANSERVE_AVX512=0``, read per call), alternating pass by pass in one process.
"""

from __future__ import annotations

import argparse
import os
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
    from leanserve.plan.calibrate import median_time as timed

    return timed(fn, repeats, warmup=3)


def model_pass(rows_list: list[int], repeats: int, paths: list[str]) -> None:
    from leanserve.model.loader import load_model

    model = load_model("smollm2-135m", torch.bfloat16).model
    weights = [m.qweight for m in model.modules() if getattr(m, "qweight", None) is not None]
    weights += [model.lm_head_q] if model.lm_head_q is not None else []
    nbytes = sum(w.nbytes for w in weights)
    print(f"{len(weights)} quantized matmuls, {nbytes / 1e6:.0f} MB of blocks (formats: "
          f"{sorted({w.bits for w in weights})} bits)\n")
    names = {"0": "AVX2", "1": "AVX512-BF16"}
    if len(paths) == 2:
        print("| rows | AVX2 ms | AVX512-BF16 ms | speed-up | AVX512-BF16 GB/s |")
        print("| --- | --- | --- | --- | --- |")
    else:
        print(f"| rows | {names[paths[0]]} ms | GB/s |")
        print("| --- | --- | --- |")
    for rows in rows_list:
        xs = {w.shape[1]: torch.randn(rows, w.shape[1]).bfloat16() for w in weights}
        times: dict[str, list[float]] = {p: [] for p in paths}
        for i in range(len(paths) * (repeats + 2)):
            side = paths[i % len(paths)]
            os.environ["LEANSERVE_AVX512"] = side
            t = time.perf_counter()
            for w in weights:
                qlinear(xs[w.shape[1]], w)
            if i >= 2 * len(paths):  # two warm-up passes each
                times[side].append(time.perf_counter() - t)
        med = {p: statistics.median(ts) for p, ts in times.items()}
        if len(paths) == 2:
            off, on = med["0"], med["1"]
            print(f"| {rows} | {off * 1e3:.2f} | {on * 1e3:.2f} | {off / on:.2f}x | {nbytes / on / 1e9:.1f} |", flush=True)
        else:
            print(f"| {rows} | {med[paths[0]] * 1e3:.2f} | {nbytes / med[paths[0]] / 1e9:.1f} |", flush=True)
    os.environ.pop("LEANSERVE_AVX512")


def dense_pass(rows_list: list[int], repeats: int, dtype: torch.dtype, layer_format: str = "Q4_1",
               head: bool = True, tile_rows: int = 0) -> None:
    """SmolLM2's matmuls (30 layers x 4 in ``layer_format``, then, with ``head``, the Q8_0 LM head;
    random values), one pass per step as a decode step asks them: the float copy (dense matmul),
    qlinear (the kernel reading the blocks) and qlinear_dense (tiles of the blocks dequantized, then
    the dense matmul), in turn; with ``tile_rows``, qlinear_dense with tiles of at most that many rows too;
    Q5_0/Q5_1 layers (5-bit values): qlinear on the same values widened to 8 bits too, as they were read
    before the 5-bit layout."""
    ops = kernels.ops()
    rng = np.random.default_rng(0)

    def weight(fmt: str, n: int, k: int) -> tuple:
        raw = quantize(rng.standard_normal((n, k)).astype(np.float32), GGMLQuantizationType[fmt])
        return from_gguf_blocks(raw, fmt, n, k), torch.from_numpy(dequantize(raw, GGMLQuantizationType[fmt])).to(dtype)

    weights = [weight(layer_format, n, k) for _ in range(30) for _, _, n, k in SHAPES[:-1]]
    if head:
        _, fmt, n, k = SHAPES[-1]
        weights.append(weight(fmt, n, k))
    print(f"{layer_format} layers{', Q8_0 LM head' if head else ''}; {dtype}\n")
    five = layer_format.startswith("Q5")
    extra = f" qlinear_dense, {tile_rows}-row tiles ms | that / float copy |" if tile_rows else ""
    extra += " qlinear, values as 8-bit ms | 8-bit / 5-bit |" if five else ""
    print("| rows | float copy ms | qlinear ms | qlinear_dense ms | dense / float copy |" + extra)
    print("| --- | --- | --- | --- | --- |" + (" --- | --- |" if tile_rows else "") + (" --- | --- |" if five else ""))
    wide = [(q.widened(8), w) for q, w in weights] if five else []
    for rows in rows_list:
        xs = {k: torch.randn(rows, k).to(dtype) for k in {w.shape[1] for _, w in weights}}
        paths = {
            "float": lambda: [torch.nn.functional.linear(xs[w.shape[1]], w) for _, w in weights],
            "qlinear": lambda: [ops.qlinear(xs[w.shape[1]], q.qs, q.scales, q.mins, q.bits) for q, w in weights],
            "dense": lambda: [ops.qlinear_dense(xs[w.shape[1]], q.qs, q.scales, q.mins, q.bits, 0) for q, w in weights],
        }
        if tile_rows:
            paths["tiles"] = lambda: [ops.qlinear_dense(xs[w.shape[1]], q.qs, q.scales, q.mins, q.bits, tile_rows)
                                      for q, w in weights]
        if five:
            paths["wide"] = lambda: [ops.qlinear(xs[w.shape[1]], q.qs, q.scales, q.mins, q.bits) for q, w in wide]
        times: dict[str, list[float]] = {p: [] for p in paths}
        for i in range(repeats + 2):  # paths in turn, pass by pass; two warm-up passes
            for name, fn in paths.items():
                t = time.perf_counter()
                fn()
                if i >= 2:
                    times[name].append(time.perf_counter() - t)
        med = {p: statistics.median(ts) * 1e3 for p, ts in times.items()}
        tiles = f" {med['tiles']:.1f} | {med['tiles'] / med['float']:.2f} |" if tile_rows else ""
        tiles += f" {med['wide']:.1f} | {med['wide'] / med['qlinear']:.2f} |" if five else ""
        print(f"| {rows} | {med['float']:.1f} | {med['qlinear']:.1f} | {med['dense']:.1f} | "
              f"{med['dense'] / med['float']:.2f} |" + tiles, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,4,8,16,24,32,48,64")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="activations and the dense weight (bfloat16: the kernel widens x, oneDNN/AMX on the weight)")
    ap.add_argument("--model-pass", action="store_true", help="SmolLM2's own blocks, one pass per step (see above)")
    ap.add_argument("--dense", action="store_true",
                    help="a model pass: float copy vs qlinear vs qlinear_dense (blocks only), --dtype rows")
    ap.add_argument("--layer-format", default="Q4_1", choices=["Q4_1", "Q5_0", "Q5_1", "Q8_0"],
                    help="--dense: the layers' format")
    ap.add_argument("--layers-only", action="store_true", help="--dense: without the LM head")
    ap.add_argument("--tile-rows", type=int, default=0,
                    help="--dense: time qlinear_dense with tiles of at most this many rows too (0: only the default, a core's L2)")
    ap.add_argument("--paths", default="0,1", choices=["0,1", "0", "1"],
                    help="--model-pass: LEANSERVE_AVX512 values to time (one alone: for alternating processes)")
    args = ap.parse_args()
    if kernels.ops() is None:
        raise SystemExit(f"qlinear benchmark: {kernels.status()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {kernels.status()}\n")
    if args.model_pass:
        model_pass([int(r) for r in args.rows.split(",") if int(r) <= 8] if args.rows != ap.get_default("rows")
                   else [1, 2, 4], args.repeats, args.paths.split(","))
        return
    dtype = getattr(torch, args.dtype)
    if args.dense:
        dense_pass([int(r) for r in args.rows.split(",")], args.repeats if args.repeats != 30 else 7, dtype,
                   args.layer_format, not args.layers_only, args.tile_rows)
        return
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
