"""Speed of quantized weights kept only in their blocks, side by side in one run.

``throughput``: the chat workload (MT-Bench first turns through the model's chat template, 128
output tokens, EOS ignored, greedy), N prompts as one offline batch (the engine saturated as by N
clients), through two engines in one process whose steps alternate, so both see the machine at the
same speed (it switches between two speeds every few seconds to minutes, docs/quantization.md):
each engine's output tokens/s is its tokens over the sum of its own step times. The engines: one
with ``--float-weights`` (the float copy beside the blocks, as a GGUF's simple types were served
before) and the blocks-only default; with ``--kv``, one loaded model with the model's 16-bit (or
float32) KV cache and with ``--kv-cache-dtype int8``, in the same KV memory.

``kv-step``: decode steps over long contexts, the model's KV cache against ``--kv-cache-dtype
int8``: B sequences of C random prompt tokens each, both engines in one process over one loaded
model, their decode steps alternating (median ms a step).

``--five-bits``: blocks only, Q5_0/Q5_1/Q5_K values in the 5-bit layout (where ``five_bits_pay``) against the
same values widened to 8 bits at load, as they were read before that layout.

``five-step``: the same two engines' median decode step at batch B, alternating in one process.

``step``: the median decode step at batch B, this checkout against another one (``--against PATH``,
e.g. a ``git worktree`` of an older commit), each in its own child process, rounds alternating.

    .venv/bin/python benchmarks/quant_speed.py throughput --model smollm2-135m --prompts 80 --rounds 2
    .venv/bin/python benchmarks/quant_speed.py throughput --kv --model smollm2-135m --prompts 80 --rounds 2
    .venv/bin/python benchmarks/quant_speed.py throughput --kv --kv-cache-memory 64MiB --prompts 80 --rounds 2
    .venv/bin/python benchmarks/quant_speed.py throughput --five-bits --model gemma3-270m --prompts 80 --rounds 2
    .venv/bin/python benchmarks/quant_speed.py five-step --model gemma3-270m --batch 1,8 --rounds 5
    .venv/bin/python benchmarks/quant_speed.py step --model gemma3-270m --batch 1,8 --against /tmp/base
    .venv/bin/python benchmarks/quant_speed.py kv-step --model smollm2-135m --batch 16 --context 2000
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from leanserve.config import parse_bytes  # noqa: E402

STEP_CHILD = r"""
import importlib.util, json, sys
sys.path.insert(0, sys.argv[1])
import leanserve  # the measured checkout's package, imported before the helper below puts this one on the path
from leanserve.config import EngineConfig
from leanserve.engine.engine import LLMEngine

spec = importlib.util.spec_from_file_location("quantize_at_load", sys.argv[5])  # this checkout's decode_step_ms
helper = importlib.util.module_from_spec(spec)
spec.loader.exec_module(helper)
model, dtype, batches = sys.argv[2], sys.argv[3], [int(b) for b in sys.argv[4].split(",")]
engine = LLMEngine(EngineConfig(model=model, dtype=dtype, kv_cache_memory=256 << 20))
assert engine.__class__.__module__ == "leanserve.engine.engine" and leanserve.__file__.startswith(sys.argv[1])
print(json.dumps({b: helper.decode_step_ms(engine, b, engine.info.vocab_size) for b in batches}))
"""


def step(args: argparse.Namespace) -> None:
    trees = {"this": str(ROOT), "against": str(Path(args.against).resolve())}
    results: dict[str, dict[int, list[float]]] = {k: {} for k in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            out = subprocess.run([sys.executable, "-c", STEP_CHILD, tree, args.model, args.dtype, args.batch,
                                  str(ROOT / "benchmarks" / "quantize_at_load.py")],
                                 capture_output=True, text=True, cwd=tree, check=True)
            for b, ms in json.loads(out.stdout.strip().splitlines()[-1]).items():
                results[name].setdefault(int(b), []).append(ms)
    print("each round, ms:", {n: {b: [round(v, 2) for v in vs] for b, vs in r.items()} for n, r in results.items()})
    print(f"{args.model}, dtype {args.dtype}; median decode step ms of {args.rounds} rounds (each a median of 16 steps); "
          f"this = {trees['this']}, against = {trees['against']}\n")
    print("| batch | against ms | this ms | speed-up |")
    print("| --- | --- | --- | --- |")
    for b in sorted(results["this"]):
        a, t = statistics.median(results["against"][b]), statistics.median(results["this"][b])
        print(f"| {b} | {a:.2f} | {t:.2f} | {a / t:.2f}x |")


def workload(model: str, n: int) -> list[list[int]]:
    """The chat workload's first n prompts; a model without a chat template (Gemma 3's GGUF) gets the
    questions as plain text."""
    from benchmarks.throughput import chat_prompts

    try:
        return chat_prompts(model, n)
    except ValueError:
        from leanserve.bench.workloads import load_mt_bench
        from leanserve.model.loader import load_config_and_tokenizer, resolve

        tokenizer = load_config_and_tokenizer(resolve(model))[1]
        return [tokenizer.encode(q["turns"][0]) for q in load_mt_bench(None)][:n]


def five_bit_engines(config) -> tuple:
    """(engine with Q5_x values widened to 8 bits at load, engine with the 5-bit layout where it pays)"""
    import leanserve.model.base as base
    from leanserve.engine.engine import LLMEngine

    pays = base.five_bits_pay
    base.five_bits_pay = lambda dtype: False
    try:
        wide = LLMEngine(config)
    finally:
        base.five_bits_pay = pays
    return wide, LLMEngine(config)


def five_step(args: argparse.Namespace) -> None:
    from benchmarks.quantize_at_load import decode_step_ms

    from leanserve.config import EngineConfig

    engines = dict(zip(("5-bit as 8-bit", "5-bit"),
                       five_bit_engines(EngineConfig(model=args.model, dtype=args.dtype, kv_cache_memory=256 << 20))))
    batches = [int(b) for b in args.batch.split(",")]
    times = {(name, b): [] for name in engines for b in batches}
    for _ in range(args.rounds):
        for b in batches:
            for name, engine in engines.items():
                times[(name, b)].append(decode_step_ms(engine, b, engine.info.vocab_size))
    print(f"{args.model}, {engines['5-bit'].info.dtype}; {engines['5-bit'].loaded.model.quantized_summary()}\n"
          f"median decode step ms of {args.rounds} rounds alternating in one process (each a median of 16 steps)\n")
    print("| batch | 5-bit as 8-bit ms | 5-bit ms | speed-up |")
    print("| --- | --- | --- | --- |")
    for b in batches:
        w, f = (statistics.median(times[(n, b)]) for n in engines)
        print(f"| {b} | {w:.2f} | {f:.2f} | {w / f:.3f}x |")


def throughput(args: argparse.Namespace) -> None:
    from leanserve.config import EngineConfig
    from leanserve.engine.engine import LLMEngine
    from leanserve.types import SamplingParams

    prompts = workload(args.model, args.prompts)
    config = dict(model=args.model, dtype=args.dtype, max_num_seqs=max(args.prompts, 1))
    if args.kv_cache_memory:
        config["kv_cache_memory"] = args.kv_cache_memory
    if args.kv:  # (baseline, measured): one loaded model, two caches
        names = ("KV model dtype", "KV int8")
        engines = {names[0]: LLMEngine(EngineConfig(**config))}
        engines[names[1]] = LLMEngine(EngineConfig(**config, kv_cache_dtype="int8"), loaded=engines[names[0]].loaded)
    elif args.five_bits:  # two loaded models, blocks only: 5-bit values widened to 8 at load, or not
        names = ("5-bit as 8-bit", "5-bit")
        engines = dict(zip(names, five_bit_engines(EngineConfig(**config))))
    else:  # two loaded models
        names = ("float copy", "blocks only")
        engines = {names[0]: LLMEngine(EngineConfig(**config, float_weights=True)),
                   names[1]: LLMEngine(EngineConfig(**config))}
    warm = SamplingParams(temperature=0.0, max_tokens=4)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    for engine in engines.values():  # warm-up
        for p in prompts[:2]:
            engine.add_request(engine.new_request_id(), p, warm)
        while engine.has_unfinished():
            engine.step()
    rows = []
    for _ in range(args.rounds):
        seconds = {name: 0.0 for name in engines}
        tokens = {name: 0 for name in engines}
        steps = {name: 0 for name in engines}
        batch = {name: 0 for name in engines}
        preempted = {name: engine.scheduler.num_preemptions_total for name, engine in engines.items()}
        for engine in engines.values():
            for p in prompts:
                engine.add_request(engine.new_request_id(), p, params)
        while any(e.has_unfinished() for e in engines.values()):
            for name, engine in engines.items():
                if not engine.has_unfinished():
                    continue
                start = time.perf_counter()
                result = engine.step()
                seconds[name] += time.perf_counter() - start
                steps[name] += 1
                batch[name] += len(result.scheduled)
                tokens[name] += sum(o.num_generated_tokens for o in result.outputs if o.finished)
        rows.append({name: (tokens[name] / seconds[name], batch[name] / steps[name],
                            engine.scheduler.num_preemptions_total - preempted[name])
                     for name, engine in engines.items()})
    for name, engine in engines.items():
        print(f"{name}: {engine.loaded.model.quantized_summary()}; KV cache {engine.info.kv_cache_summary()}")
    print(f"\n{args.model}, {engines[names[1]].info.dtype}, {args.prompts} prompts x {args.max_tokens} tokens, both "
          f"engines in one process, steps alternating, {args.rounds} round(s)\n")
    print("| round | engine | output tok/s | mean requests a step | preemptions |")
    print("| --- | --- | --- | --- | --- |")
    for i, row in enumerate(rows):
        for name, (rate, mean_batch, preemptions) in row.items():
            print(f"| {i + 1} | {name} | {rate:.1f} | {mean_batch:.1f} | {preemptions} |")
    ratios = [row[names[1]][0] / row[names[0]][0] for row in rows]
    print(f"\n{names[1]} / {names[0]}: {statistics.median(ratios):.3f}x (median of {', '.join(f'{r:.3f}' for r in ratios)})")


def kv_step(args: argparse.Namespace) -> None:
    import random

    from leanserve.config import EngineConfig
    from leanserve.engine.engine import LLMEngine
    from leanserve.types import SamplingParams

    memory = args.batch * (args.context + args.steps + 64) * 2 ** 16  # room for every sequence, whatever the dtype
    engines = {"model dtype": LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, kv_cache_memory=memory))}
    engines["int8"] = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, kv_cache_memory=memory,
                                             kv_cache_dtype="int8"), loaded=engines["model dtype"].loaded)
    vocab = engines["int8"].info.vocab_size
    for engine in engines.values():
        rng = random.Random(0)
        for _ in range(args.batch):
            engine.add_request(engine.new_request_id(), [rng.randrange(100, vocab - 100) for _ in range(args.context)],
                               SamplingParams(max_tokens=args.steps + 8, temperature=0.0, ignore_eos=True))
        started: set[str] = set()
        while len(started) < args.batch:  # the prompts prefilled, every sequence decoding
            started.update(o.request_id for o in engine.step().outputs)
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.steps):
        for name, engine in engines.items():
            start = time.perf_counter()
            engine.step()
            times[name].append(time.perf_counter() - start)
    info = engines["int8"].info
    print(f"{args.model}, {info.dtype}, {args.batch} sequences of {args.context} prompt tokens, {args.steps} decode "
          f"steps each, alternating; KV cache: {info.kv_cache_summary()}\n")
    print("| KV cache | median decode step ms |")
    print("| --- | --- |")
    for name, t in times.items():
        print(f"| {name} | {1e3 * statistics.median(t):.2f} |")
    print(f"\nint8 speed-up: {statistics.median(times['model dtype']) / statistics.median(times['int8']):.3f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    kt = sub.add_parser("throughput")
    kt.add_argument("--kv", action="store_true", help="compare the KV cache's dtypes (the model's / int8), not the weights")
    kt.add_argument("--five-bits", action="store_true",
                    help="compare Q5_x values in the 5-bit layout with the same values widened to 8 bits (blocks only)")
    kt.add_argument("--model", default="smollm2-135m")
    kt.add_argument("--dtype", default="auto")
    kt.add_argument("--prompts", type=int, default=80)
    kt.add_argument("--max-tokens", type=int, default=128)
    kt.add_argument("--rounds", type=int, default=1, help="the workload this many times through both engines")
    kt.add_argument("--kv-cache-memory", type=parse_bytes, default=None, metavar="SIZE",
                    help="the KV cache's bytes for both engines (default: the engine's), e.g. 64MiB")
    s = sub.add_parser("step")
    s.add_argument("--model", default="gemma3-270m")
    s.add_argument("--dtype", default="auto")
    s.add_argument("--batch", default="1,8")
    s.add_argument("--rounds", type=int, default=3)
    s.add_argument("--against", required=True, help="another checkout of leanserve (its own kernels and code)")
    f = sub.add_parser("five-step")
    f.add_argument("--model", default="gemma3-270m")
    f.add_argument("--dtype", default="auto")
    f.add_argument("--batch", default="1,8")
    f.add_argument("--rounds", type=int, default=5)
    k = sub.add_parser("kv-step")
    k.add_argument("--model", default="smollm2-135m")
    k.add_argument("--dtype", default="auto")
    k.add_argument("--batch", type=int, default=16)
    k.add_argument("--context", type=int, default=2000)
    k.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    from leanserve.plan.calibrate import cpu_name

    print(f"CPU: {cpu_name()}")
    {"throughput": throughput, "step": step, "five-step": five_step, "kv-step": kv_step}[args.cmd](args)


if __name__ == "__main__":
    main()
