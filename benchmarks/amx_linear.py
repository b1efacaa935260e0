"""bfloat16 matmuls of a whole SmolLM2-135M decode step: torch (oneDNN) against the AMX kernel on
weights packed once (kernels/csrc/amx_linear.cpp), side by side in one run.

Per row count M, one "step" multiplies M rows by the weights of 30 layers (qkv 960x576, o 576x576,
gate_up 3072x576, down 576x1536, each layer its own tensors, 210 MB in all, so they stream from
memory as in the model) and by the 49152x576 LM head. The two sides alternate, `--repeats` (5)
timed steps each after two warm-ups; prints the median ms per step, GFLOP/s and the speed-up.

    .venv/bin/python benchmarks/amx_linear.py
    .venv/bin/python benchmarks/amx_linear.py --rows 16,80
    .venv/bin/python benchmarks/amx_linear.py --rows 1,16 --layers 1 --repeats 1   # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leanserve import kernels  # noqa: E402

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
LAYERS, HEAD = 30, (49152, 576)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,4,8,16,32,64,80,128,256,512")
    ap.add_argument("--layers", type=int, default=LAYERS, help=f"layers of distinct weights (default {LAYERS}: SmolLM2's)")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps of each side (default 5)")
    args = ap.parse_args()
    if not kernels.amx_available():
        sys.exit("amx_linear.py: this CPU (or process) has no AMX-BF16, or the native kernels are off")
    ops = kernels.ops()
    torch.manual_seed(0)
    weights = [{n: torch.randn(*s).bfloat16() for n, s in SHAPES.items()} for _ in range(args.layers)]
    packed = [{n: ops.amx_pack(w) for n, w in layer.items()} for layer in weights]
    head = torch.randn(*HEAD).bfloat16()
    head_packed = ops.amx_pack(head)
    flops_per_row = args.layers * sum(2 * n * k for n, k in SHAPES.values()) + 2 * HEAD[0] * HEAD[1]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; SmolLM2-135M matmuls of one decode step, bfloat16\n")
    print("| rows | torch (oneDNN) ms | AMX kernel ms | speed-up | AMX GFLOP/s |")
    print("|---:|---:|---:|---:|---:|")
    for m in (int(r) for r in args.rows.split(",")):
        xs = {n: torch.randn(m, k).bfloat16() for n, (_, k) in SHAPES.items()}
        xh = torch.randn(m, HEAD[1]).bfloat16()

        def step_torch() -> None:
            for layer in weights:
                for n, w in layer.items():
                    F.linear(xs[n], w)
            F.linear(xh, head)

        def step_amx() -> None:
            for layer in packed:
                for n, p in layer.items():
                    ops.amx_linear(xs[n], p)
            ops.amx_linear(xh, head_packed)

        times: dict[str, list[float]] = {"torch": [], "amx": []}
        for _ in range(2):
            step_torch()
            step_amx()
        for _ in range(args.repeats):  # alternate, so both see the same machine
            for name, fn in (("torch", step_torch), ("amx", step_amx)):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        t_torch, t_amx = statistics.median(times["torch"]), statistics.median(times["amx"])
        print(f"| {m} | {t_torch * 1e3:.1f} | {t_amx * 1e3:.1f} | {t_torch / t_amx:.2f}x | {m * flops_per_row / t_amx / 1e9:.0f} |")


if __name__ == "__main__":
    main()
