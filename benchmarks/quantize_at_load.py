"""Decode step time of a float HF model as loaded (none) and quantized at load (int8, int4), side by
side in one process: the median of 16 decode steps at each batch size (prompts of 64 random tokens),
rounds alternating between the three engines.

    .venv/bin/python benchmarks/quantize_at_load.py /path/to/hf-folder --batch 1,4,8,16,64
"""

from __future__ import annotations

import argparse
import random
import statistics
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--batch", default="1,4,8,16,64")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    from leanserve.config import EngineConfig
    from leanserve.engine.engine import LLMEngine
    from leanserve.plan.calibrate import cpu_name

    engines = {q: LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, quantization=q))
               for q in ("none", "int8", "int4")}
    batches = [int(b) for b in args.batch.split(",")]
    results: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for b in batches:
            for q, engine in engines.items():
                results.setdefault((q, b), []).append(decode_step_ms(engine, b, engine.info.vocab_size))
    print(f"CPU: {cpu_name()}; dtype {engines['none'].info.dtype}; median decode step ms over {args.rounds} rounds")
    print(f"{'batch':>5} {'none':>8} {'int8':>8} {'int4':>8} {'int8 x':>7} {'int4 x':>7}")
    for b in batches:
        ms = {q: statistics.median(results[(q, b)]) for q in engines}
        print(f"{b:>5} {ms['none']:>8.2f} {ms['int8']:>8.2f} {ms['int4']:>8.2f} {ms['none'] / ms['int8']:>7.2f} "
              f"{ms['none'] / ms['int4']:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
