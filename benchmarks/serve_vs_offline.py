"""Output tokens/s of the offline engine against the HTTP server, on the same prompts, side by side.

Workload: the MT-Bench first turns (80 by default) through the model's chat template, a fixed
number of output tokens each (ignore_eos, greedy). The offline side is ``LLM.generate`` on all
prompts at once; the server side is ``leanserve serve`` started as a subprocess and driven by
``leanserve.bench`` with N concurrent streaming clients. The ratio server/offline is what the HTTP
layer, the engine thread and the client cost (the goal: >= 90%).

    .venv/bin/python benchmarks/serve_vs_offline.py                      # 80 prompts x 128 tokens, 32 clients
    .venv/bin/python benchmarks/serve_vs_offline.py --num-prompts 16 --max-tokens 32   # a quick check

The two sides run one after the other, never at once, so they do not share the CPU. Both use the
same engine settings (--max-num-seqs etc. are passed to both).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--num-prompts", type=int, default=80, help="MT-Bench first turns to send (default 80: all)")
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens per request (default 128)")
    p.add_argument("--concurrency", type=int, default=32, help="streaming clients at once (default 32)")
    p.add_argument("--data-dir", type=Path, default=None, help="folder with mt_bench_questions.jsonl "
                                                               "(default: the copy shipped in the package)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--kv-cache-memory", default=None, help="e.g. 1GiB (default: the engine's)")
    p.add_argument("--skip-offline", action="store_true", help="measure the server only")
    p.add_argument("--json", type=Path, default=None, help="write both results here")
    args = p.parse_args(argv)
    if args.num_prompts < 1 or args.max_tokens < 1 or args.concurrency < 1:
        p.error("--num-prompts, --max-tokens and --concurrency must be >= 1")
    return args


def workload(args: argparse.Namespace):
    """The exact conversations the HTTP client will send, so both sides see the same prompts."""
    from leanserve.bench.workloads import WorkloadSpec, build_messages, iter_conversations

    spec = WorkloadSpec(name="chat", data_dir=args.data_dir, output_len=args.max_tokens)
    messages = [build_messages(c, 0, []) for c in iter_conversations(spec, args.num_prompts)]
    return spec, messages


def engine_kwargs(args: argparse.Namespace) -> dict:
    from leanserve.config import parse_bytes

    return dict(dtype=args.dtype, device=args.device, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens,
                kv_cache_memory=parse_bytes(args.kv_cache_memory) if args.kv_cache_memory else None)


def run_offline(args: argparse.Namespace, messages: list[list[dict]]) -> dict:
    from leanserve.engine.engine import LLM
    from leanserve.types import SamplingParams

    llm = LLM(args.model, **engine_kwargs(args))
    prompts = [llm.tokenizer.encode_chat(m) for m in messages]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)  # warm-up, as the client's
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    n_out = sum(o.num_generated_tokens for o in outs)
    n_in = sum(o.num_prompt_tokens for o in outs)
    del llm, outs
    gc.collect()
    return {"output_tokens": n_out, "input_tokens": n_in, "duration_s": elapsed, "output_throughput": n_out / elapsed}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_server(args: argparse.Namespace, spec) -> dict:
    from leanserve.bench.client import LoadSpec
    from leanserve.bench.runner import BenchSettings, run_benchmark

    port = _free_port()
    cmd = [sys.executable, "-m", "leanserve", "serve", args.model, "--port", str(port), "--log-level", "warning",
           "--dtype", args.dtype, "--device", args.device, "--max-num-seqs", str(args.max_num_seqs),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if args.kv_cache_memory:
        cmd += ["--kv-cache-memory", args.kv_cache_memory]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode}:\n{proc.stdout.read()[-3000:]}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not start within 300 s")
            time.sleep(0.25)
        settings = BenchSettings(base_url=base, endpoint="chat", workload=spec,
                                 load=LoadSpec(concurrency=args.concurrency, num_prompts=args.num_prompts,
                                               label=f"concurrency {args.concurrency}"),
                                 ignore_eos=True, temperature=0.0, progress=False)
        result = run_benchmark(settings)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    keys = ("completed", "failed", "duration", "total_output_tokens", "total_input_tokens", "output_throughput",
            "median_ttft_ms", "median_tpot_ms", "median_itl_ms", "prefix_cache_hit_rate", "errors_by_kind")
    return {k: result.get(k) for k in keys}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec, messages = workload(args)
    print(f"workload: {len(messages)} MT-Bench first turns through the chat template, {args.max_tokens} output tokens "
          f"each (ignore_eos, greedy); model {args.model}, max_num_seqs {args.max_num_seqs}", flush=True)
    offline = None
    if not args.skip_offline:
        offline = run_offline(args, messages)
        print(f"offline  LLM.generate, all {len(messages)} prompts at once: {offline['output_throughput']:8.1f} output "
              f"tok/s ({offline['output_tokens']} tokens in {offline['duration_s']:.1f} s)", flush=True)
    server = run_server(args, spec)
    if not server["completed"] or server["failed"]:
        print(f"server run had failures: {server}", file=sys.stderr)
    print(f"server   {args.concurrency} concurrent streaming clients:    {server['output_throughput']:8.1f} output "
          f"tok/s ({server['total_output_tokens']} tokens in {server['duration']:.1f} s; median TTFT "
          f"{server['median_ttft_ms']:.0f} ms, median TPOT {server['median_tpot_ms']:.1f} ms)", flush=True)
    ratio = None
    if offline:
        ratio = server["output_throughput"] / offline["output_throughput"]
        print(f"ratio    server / offline: {ratio:.1%} (target >= 90%)")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                         "offline": offline, "server": server, "ratio": ratio}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
