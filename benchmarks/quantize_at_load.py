"""Decode step time of a float HF model as loaded (none) and quantized at load (int8, int4), side by
side in one run: the median of 16 decode steps at each batch size (prompts of 64 random tokens),
rounds alternating between the three, each engine in its own process (a blocks-only engine's big
steps are bimodal between processes: docs/quantization.md).

    .venv/bin/python benchmarks/quantize_at_load.py /path/to/hf-folder --batch 1,4,8,16,64
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def decode_step_ms(engine, batch: int, vocab: int, steps: int = 16) -> float:
    from leanserve.types import SamplingParams

    rng = random.Random(batch)
    ids = []
    for _ in range(batch):
        rid = engine.new_request_id()
        engine.add_request(rid, [rng.randrange(100, vocab - 100) for _ in range(64)],
                           SamplingParams(max_tokens=steps + 40, temperature=0.0, ignore_eos=True))
        ids.append(rid)
    started: set[str] = set()
    while len(started) < batch:
        for out in engine.step().outputs:
            if out.outputs[0].token_ids:
                started.add(out.request_id)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    for rid in ids:
        engine.abort_request(rid)
    return 1e3 * statistics.median(times)


def child(model: str, dtype: str, quantization: str, batches: list[int]) -> None:
    from leanserve.config import EngineConfig
    from leanserve.engine.engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=model, dtype=dtype, quantization=quantization))
    print(json.dumps({"dtype": str(engine.info.dtype),
                      "ms": {b: decode_step_ms(engine, b, engine.info.vocab_size) for b in batches}}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--batch", default="1,4,8,16,64")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--child", help=argparse.SUPPRESS)  # one engine's measurements, as JSON
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batch.split(",")]
    if args.child:
        child(args.model, args.dtype, args.child, batches)
        return 0
    from leanserve.plan.calibrate import cpu_name

    quantizations = ("none", "int8", "int4")
    results: dict[tuple[str, int], list[float]] = {}
    dtype = "?"
    for _ in range(args.rounds):
        for q in quantizations:
            out = subprocess.run([sys.executable, __file__, args.model, "--batch", args.batch, "--dtype", args.dtype,
                                  "--child", q], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            dtype = r["dtype"]
            for b, ms in r["ms"].items():
                results.setdefault((q, int(b)), []).append(ms)
    print(f"CPU: {cpu_name()}; dtype {dtype}; median decode step ms over {args.rounds} rounds")
    print(f"{'batch':>5} {'none':>8} {'int8':>8} {'int4':>8} {'int8 x':>7} {'int4 x':>7}")
    for b in batches:
        ms = {q: statistics.median(results[(q, b)]) for q in quantizations}
        print(f"{b:>5} {ms['none']:>8.2f} {ms['int8']:>8.2f} {ms['int4']:>8.2f} {ms['none'] / ms['int8']:>7.2f} "
              f"{ms['none'] / ms['int4']:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
