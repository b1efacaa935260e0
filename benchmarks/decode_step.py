"""Time of one engine decode step, native CPU kernels on vs off, side by side in one run.

Offline engine, SmolLM2-135M float32 (or --dtype bfloat16), B sequences decoding together (greedy, EOS ignored, a
short prompt each; steps timed after 20 warm-up steps). "off" is the same code with
LEANSERVE_KERNELS=0 (BLAS on float32 weights, gather + SDPA attention, PyTorch norms and RoPE), in
a child process so both sides build their models the same way; `--off VAR=VALUE` sets another
switch for that side instead (`LEANSERVE_AMX=0`: oneDNN's bf16 matmul in place of the AMX kernel). With --profile, the top operators
of the "on" side per batch size (torch.profiler over 5 steps). With --native, one process instead
alternates the native decode loop (kernels/csrc/decode_layers.cpp: all layers in one call) with the
Python layers, step blocks of each in turn on the same sequences.

    .venv/bin/python benchmarks/decode_step.py
    .venv/bin/python benchmarks/decode_step.py --batch 1,32 --profile
    .venv/bin/python benchmarks/decode_step.py --dtype bfloat16 --batch 1,8,16,64,128
    .venv/bin/python benchmarks/decode_step.py --dtype bfloat16 --off LEANSERVE_AMX=0   # AMX matmul vs oneDNN
    .venv/bin/python benchmarks/decode_step.py --dtype bfloat16 --batch 1,8,80 --native   # native layer loop vs Python
    .venv/bin/python benchmarks/decode_step.py --dtype bfloat16 --batch 1,8,32 --native --model gemma3-270m
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _prompt(i: int, context: int, vocab_size: int) -> str | list[int]:
    if not context:
        return f"Write a long story about a cat and a dog, in great detail {i}"
    # distinct token ids: no prefix hits
    return [(100 + (i * 7919 + j * 31) % 40000) % vocab_size for j in range(context)]


def measure(batches: list[int], steps: int, profile: bool, dtype: str = "float32", context: int = 0,
            model_name: str = "smollm2-135m", warmup: int = 20) -> dict[int, float]:
    from leanserve.engine.engine import LLM
    from leanserve.types import SamplingParams

    llm = LLM(model_name, dtype=dtype, max_num_seqs=max(batches), max_num_batched_tokens=1024)
    eng = llm.engine
    vocab = eng.runner.model.cfg.vocab_size
    result = {}
    for b in batches:
        params = SamplingParams(max_tokens=warmup + steps + 10, temperature=0.0, ignore_eos=True)
        for i in range(b):
            eng.add_request(eng.new_request_id(), _prompt(i, context, vocab), params)
        for _ in range(warmup):
            eng.step()
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            eng.step()
            times.append(time.perf_counter() - t)
        result[b] = statistics.median(times)
        if profile:
            from torch.profiler import profile as prof

            with prof() as p:
                for _ in range(5):
                    eng.step()
            print(f"\nbatch {b}:", file=sys.stderr)
            print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=6), file=sys.stderr)
        while eng.has_unfinished():
            eng.step()
    return result


def compare_native(batches: list[int], steps: int, dtype: str, context: int, rounds: int = 5,
                   model_name: str = "smollm2-135m", warmup: int = 20) -> None:
    """Median step time with the native decode loop on and off, alternating blocks of `steps` steps."""
    from leanserve.engine.engine import LLM
    from leanserve.types import SamplingParams

    llm = LLM(model_name, dtype=dtype, max_num_seqs=max(batches), max_num_batched_tokens=1024)
    eng, model = llm.engine, llm.engine.runner.model
    print(f"{model_name}, {dtype}; native loop applies: {model.native_plan() is not None}")
    print("| batch | step ms, Python layers | step ms, native loop | speed-up | out tok/s native |")
    print("| --- | --- | --- | --- | --- |")
    for b in batches:
        params = SamplingParams(max_tokens=warmup + 2 * rounds * steps + 10, temperature=0.0, ignore_eos=True)
        for i in range(b):
            eng.add_request(eng.new_request_id(), _prompt(i, context, model.cfg.vocab_size), params)
        for _ in range(warmup):
            eng.step()
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(rounds):
            for native in (True, False):
                model.native_decode = native
                for _ in range(steps):
                    t = time.perf_counter()
                    eng.step()
                    times[native].append(time.perf_counter() - t)
        model.native_decode = True
        on, off = statistics.median(times[True]), statistics.median(times[False])
        print(f"| {b} | {off * 1e3:.2f} | {on * 1e3:.2f} | {off / on:.2f}x | {b / on:.0f} |")
        while eng.has_unfinished():
            eng.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="1,4,16,32,64")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--context", type=int, default=0, help="prompt length in tokens (default: a short sentence)")
    ap.add_argument("--off", default="LEANSERVE_KERNELS=0",
                    help="environment setting of the 'off' side (e.g. LEANSERVE_AMX=0: the AMX matmul off, oneDNN's on)")
    ap.add_argument("--native", action="store_true", help="native decode loop vs Python layers, alternating in one process")
    ap.add_argument("--model", default="smollm2-135m", help="the model (a built-in name, .gguf or HF folder)")
    ap.add_argument("--warmup", type=int, default=20, help="steps run before timing, per batch size (default 20)")
    ap.add_argument("--rounds", type=int, default=5, help="--native: alternations of the two sides (default 5)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    if args.native:
        compare_native(batches, args.steps, args.dtype, args.context, args.rounds, args.model, args.warmup)
        return
    if args.child:
        print(json.dumps(measure(batches, args.steps, False, args.dtype, args.context, args.model, args.warmup)))
        return
    off = subprocess.run([sys.executable, __file__, "--child", "--batch", args.batch, "--steps", str(args.steps),
                          "--dtype", args.dtype, "--context", str(args.context), "--model", args.model,
                          "--warmup", str(args.warmup)],
                         env={**os.environ, args.off.split("=", 1)[0]: args.off.split("=", 1)[1]}, check=True,
                         capture_output=True, text=True)
    off_times = {int(k): v for k, v in json.loads(off.stdout.strip().splitlines()[-1]).items()}
    on_times = measure(batches, args.steps, args.profile, args.dtype, args.context, args.model, args.warmup)
    from leanserve import kernels

    print(f"\n{args.dtype}, {kernels.status()}, {__import__('torch').get_num_threads()} threads")
    print(f"| batch | step ms, {args.off} | step ms, on | speed-up | out tok/s on |")
    print("| --- | --- | --- | --- | --- |")
    for b in batches:
        print(f"| {b} | {off_times[b] * 1e3:.1f} | {on_times[b] * 1e3:.1f} | {off_times[b] / on_times[b]:.2f}x | "
              f"{b / on_times[b]:.0f} |")


if __name__ == "__main__":
    main()
