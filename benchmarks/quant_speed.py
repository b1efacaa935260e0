"""Speed of quantized weights kept only in their blocks, side by side in one run.

``throughput``: the chat workload (MT-Bench first turns through the model's chat template, 128
output tokens, EOS ignored, greedy), N prompts as one offline batch (the engine saturated as by N
clients), the blocks-only engine and one with ``--float-weights`` (the float copy beside the blocks,
as a GGUF's simple types were served before) alternating rounds, each run in a fresh process (big
steps' timings are bimodal between processes, docs/quantization.md): output tokens/s. With
``--kv``, the same workload with the model's 16-bit (or float32) KV cache against
``--kv-cache-dtype int8`` instead, both with the blocks as the only copy of the weights.

``kv-step``: decode steps over long contexts, the model's KV cache against ``--kv-cache-dtype
int8``: B sequences of C random prompt tokens each, both engines in one process over one loaded
model, their decode steps alternating (median ms a step).

``step``: the median decode step at batch B, this checkout against another one (``--against PATH``,
e.g. a ``git worktree`` of an older commit), each in its own child process, rounds alternating.

    .venv/bin/python benchmarks/quant_speed.py throughput --model smollm2-135m --prompts 80 --rounds 3
    .venv/bin/python benchmarks/quant_speed.py throughput --kv --model smollm2-135m --prompts 80 --rounds 3
    .venv/bin/python benchmarks/quant_speed.py throughput --kv --kv-cache-memory 64MiB --prompts 80 --rounds 3
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
    print(f"{args.model}, dtype {args.dtype}; median decode step ms of {args.rounds} rounds (each a median of 16 steps); "
          f"this = {trees['this']}, against = {trees['against']}\n")
    print("| batch | against ms | this ms | speed-up |")
    print("| --- | --- | --- | --- |")
    for b in sorted(results["this"]):
        a, t = statistics.median(results["against"][b]), statistics.median(results["this"][b])
        print(f"| {b} | {a:.2f} | {t:.2f} | {a / t:.2f}x |")


THROUGHPUT_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from benchmarks.quant_speed import workload
from leanserve.engine.engine import LLM
from leanserve.types import SamplingParams

model, dtype, float_weights, n, max_tokens = sys.argv[2], sys.argv[3], sys.argv[4] == "1", int(sys.argv[5]), int(sys.argv[6])
prompts = workload(model, n)
memory = int(sys.argv[8]) or None  # 0: the engine's default
llm = LLM(model, dtype=dtype, float_weights=float_weights, max_num_seqs=max(n, 1), kv_cache_dtype=sys.argv[7],
          kv_cache_memory=memory)
llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm-up
start = time.perf_counter()
outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
rate = sum(o.num_generated_tokens for o in outs) / (time.perf_counter() - start)
info = llm.engine.info
print(json.dumps({"rate": rate, "summary": f"{llm.engine.loaded.model.quantized_summary()}; KV cache {info.kv_cache_summary()}"}))
"""


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


def throughput(args: argparse.Namespace) -> None:
    # name -> (float copy, KV cache dtype); the first is the one compared against the second
    runs = {"KV int8": ("0", "int8"), "KV model dtype": ("0", "auto")} if args.kv else \
        {"blocks only": ("0", "auto"), "float copy": ("1", "auto")}
    rates: dict[str, list[float]] = {name: [] for name in runs}
    summaries = {}
    for _ in range(args.rounds):
        for name, (float_copy, kv) in runs.items():
            out = subprocess.run([sys.executable, "-c", THROUGHPUT_CHILD, str(ROOT), args.model, args.dtype,
                                  float_copy, str(args.prompts), str(args.max_tokens), kv, str(args.kv_cache_memory or 0)],
                                 capture_output=True, text=True, cwd=ROOT, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rates[name].append(r["rate"])
            summaries[name] = r["summary"]
    for name, summary in summaries.items():
        print(f"{name}: {summary}")
    memory = f", KV cache memory {args.kv_cache_memory / 2**20:.0f} MiB" if args.kv_cache_memory else ""
    print(f"\n{args.model}, dtype {args.dtype}, {args.prompts} prompts x {args.max_tokens} tokens{memory}, {args.rounds} "
          "rounds alternating, each run in its own process\n")
    print("| engine | output tok/s (median) | each round |")
    print("| --- | --- | --- |")
    for name, r in rates.items():
        print(f"| {name} | {statistics.median(r):.1f} | {', '.join(f'{x:.1f}' for x in r)} |")
    first, second = runs
    print(f"\n{first} / {second}: {statistics.median(rates[first]) / statistics.median(rates[second]):.3f}x")


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
    t = sub.add_parser("throughput")
    t.add_argument("--model", default="smollm2-135m")
    t.add_argument("--dtype", default="auto")
    t.add_argument("--prompts", type=int, default=80)
    t.add_argument("--max-tokens", type=int, default=128)
    t.add_argument("--rounds", type=int, default=3)
    t.add_argument("--kv", action="store_true", help="compare the KV cache's dtypes (int8 / the model's), not the weights")
    t.add_argument("--kv-cache-memory", type=parse_bytes, default=None, metavar="SIZE",
                   help="the KV cache's bytes for every engine (default: the engine's), e.g. 64MiB")
    s = sub.add_parser("step")
    s.add_argument("--model", default="gemma3-270m")
    s.add_argument("--dtype", default="auto")
    s.add_argument("--batch", default="1,8")
    s.add_argument("--rounds", type=int, default=3)
    s.add_argument("--against", required=True, help="another checkout of leanserve (its own kernels and code)")
    k = sub.add_parser("kv-step")
    k.add_argument("--model", default="smollm2-135m")
    k.add_argument("--dtype", default="auto")
    k.add_argument("--batch", type=int, default=16)
    k.add_argument("--context", type=int, default=2000)
    k.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    from leanserve.plan.calibrate import cpu_name

    print(f"CPU: {cpu_name()}")
    {"throughput": throughput, "step": step, "kv-step": kv_step}[args.cmd](args)


if __name__ == "__main__":
    main()
