"""Offline throughput on the chat workload: leanserve's engine against HF transformers `generate`
one request at a time (the naive deployment), measured in one run on the same machine.

Chat workload (docs/performance.md): MT-Bench first turns through the model's chat template,
fixed output length (EOS ignored), greedy, float32. leanserve runs all prompts as one offline batch;
HF runs ``--hf-prompts`` of them one after another (its rate per request does not depend on how
many it runs, so a subset keeps the run short; the count is printed). Prints output tokens/s for
both, the ratio, and the compute achieved against this machine's measured float32 matmul peak.

    .venv/bin/python benchmarks/throughput.py                     # 80 prompts x 128 tokens
    .venv/bin/python benchmarks/throughput.py --num-prompts 16 --hf-prompts 2 --max-tokens 32

``--model`` takes a built-in name, a .gguf file or an HF folder (the smoke test's tiny model).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch


def measure_matmul_peak(dtype: torch.dtype = torch.float32, size: int = 1024, repeats: int = 10) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * size**3 / statistics.median(times)


def run_hf(model: str, prompts: list[list[int]], max_tokens: int) -> tuple[int, float]:
    import transformers

    from leanserve.model.loader import resolve

    source = resolve(model)
    if source.kind == "gguf":
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(source.path.parent), gguf_file=source.path.name,
                                                               dtype=torch.float32)
    else:
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(source.path), dtype=torch.float32)
    hf = hf.eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    hf.generate(torch.tensor([prompts[0]]), max_new_tokens=4, do_sample=False)  # warm-up
    tokens, start = 0, time.perf_counter()
    with torch.no_grad():
        for ids in prompts:
            out = hf.generate(torch.tensor([ids]), max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
            tokens += out.shape[1] - len(ids)
    return tokens, time.perf_counter() - start


def chat_prompts(model: str, num_prompts: int, data_dir: Path | None = None) -> list[list[int]]:
    """The chat workload's prompts as token ids: the first ``num_prompts`` MT-Bench first turns, in the
    file's order, through the model's chat template (the questions shipped in the package, or ``data_dir``'s)."""
    from leanserve.bench.workloads import load_mt_bench
    from leanserve.model.loader import load_config_and_tokenizer, resolve

    _, tokenizer, _ = load_config_and_tokenizer(resolve(model))
    questions = [q["turns"][0] for q in load_mt_bench(data_dir)]
    return [tokenizer.encode_chat([{"role": "user", "content": q}]) for q in questions[:num_prompts]]


def run_leanserve(model: str, prompts: list[list[int]], max_tokens: int, max_num_seqs: int,
                  dtype: str = "float32", one_at_a_time: bool = False) -> tuple[int, float, int]:
    """(output tokens, seconds, prompt tokens computed) of all prompts as one offline batch, or with
    ``one_at_a_time`` one after another (what one client asks of a server, without HTTP)."""
    from leanserve.engine.engine import LLM
    from leanserve.types import SamplingParams

    llm = LLM(model, dtype=dtype, max_num_seqs=max_num_seqs, max_num_batched_tokens=1024)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False) if not one_at_a_time else [
        out for p in prompts for out in llm.generate([p], params, use_tqdm=False)]
    elapsed = time.perf_counter() - start
    # prompt tokens the model computed: not those found in the prefix cache (the chat template's
    # shared start; the warm-up's two prompts)
    computed = sum(o.num_prompt_tokens - max(0, o.num_cached_tokens) for o in outs)
    return sum(o.num_generated_tokens for o in outs), elapsed, computed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--num-prompts", type=int, default=80)
    ap.add_argument("--hf-prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="folder with mt_bench_questions.jsonl (default: the copy shipped in the package)")
    args = ap.parse_args()

    from leanserve.model.loader import load_config_and_tokenizer, resolve

    cfg, _, _ = load_config_and_tokenizer(resolve(args.model))
    prompts = chat_prompts(args.model, args.num_prompts, args.data_dir)

    peak = measure_matmul_peak()
    hf_tokens, hf_s = run_hf(args.model, prompts[: args.hf_prompts], args.max_tokens)
    ls_tokens, ls_s, ls_prompt = run_leanserve(args.model, prompts, args.max_tokens, args.max_num_seqs)
    hf_tps, ls_tps = hf_tokens / hf_s, ls_tokens / ls_s
    flop_per_token = 2 * cfg.num_params
    achieved = (ls_tokens + ls_prompt) * flop_per_token / ls_s

    print(f"model {args.model}, {torch.get_num_threads()} threads, float32, {args.max_tokens} output tokens per request")
    print(f"machine float32 matmul peak (1024^3): {peak / 1e9:.0f} GFLOP/s")
    print(f"HF transformers generate, one at a time ({args.hf_prompts} prompts): {hf_tps:8.1f} output tok/s")
    print(f"leanserve offline batch ({args.num_prompts} prompts):             {ls_tps:8.1f} output tok/s")
    print(f"ratio leanserve / HF: {ls_tps / hf_tps:.2f}x")
    print(f"leanserve compute: {achieved / 1e9:.0f} GFLOP/s ({achieved / peak:.0%} of the measured peak; "
          f"{flop_per_token / 1e9:.2f} GFLOP per token, prompt tokens included)")


if __name__ == "__main__":
    main()
