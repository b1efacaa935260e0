"""How often bfloat16 greedy decoding agrees with float32, on the same model and prompts.

Runs the chat workload's first N MT-Bench prompts through leanserve twice, float32 and bfloat16
(`--dtype`), greedy, EOS ignored, and prints: the share of prompts whose tokens are identical, the
share of generated tokens before each prompt's first divergence, and the mean position of that
divergence. bfloat16 has an 8-bit mantissa, so once two candidates are close a tie breaks
differently and the continuations part; agreement up to the first divergence is the honest measure.

On a CPU without AVX512-BF16/AMX torch emulates bfloat16 (about 1 GFLOP/s here), so keep N small:

    .venv/bin/python benchmarks/experiments/bf16_agreement.py --num-prompts 8 --max-tokens 32
    .venv/bin/python benchmarks/experiments/bf16_agreement.py --num-prompts 40 --max-tokens 64 --hf   # with HF's own rate
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from leanserve.engine.engine import LLM
from leanserve.types import SamplingParams

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--hf", action="store_true",
                    help="also HF transformers' own bfloat16 vs float32 agreement on the same prompts (the baseline "
                         "for what bfloat16 alone does to greedy decoding), and leanserve bf16 vs HF bf16")
    args = ap.parse_args()
    path = ROOT / "leanserve" / "data" / "mt_bench_questions.jsonl"
    prompts = [json.loads(line)["turns"][0] for line in path.read_text().splitlines() if line.strip()][: args.num_prompts]
    messages = [[{"role": "user", "content": p}] for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    tokens = {}
    for dtype in ("float32", "bfloat16"):
        llm = LLM(args.model, dtype=dtype, device=args.device)
        t = time.perf_counter()
        tokens[dtype] = [o.outputs[0].token_ids for o in llm.chat(messages, params, use_tqdm=False)]
        print(f"{dtype}: {time.perf_counter() - t:.1f} s for {len(prompts)} prompts x {args.max_tokens} tokens", flush=True)
        del llm
    report(f"{args.model}, leanserve", tokens["float32"], tokens["bfloat16"], args.max_tokens)
    if args.hf:
        hf = {dtype: run_hf(args.model, messages, args.max_tokens, dtype) for dtype in ("float32", "bfloat16")}
        report(f"{args.model}, HF transformers", hf["float32"], hf["bfloat16"], args.max_tokens)
        report(f"{args.model}, leanserve bfloat16 vs HF bfloat16", hf["bfloat16"], tokens["bfloat16"], args.max_tokens)


def report(what: str, ref: list[list[int]], other: list[list[int]], n: int) -> None:
    firsts = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(ref, other)]
    print(f"\n{what}{'' if ' vs ' in what else ', bfloat16 vs float32'}: {len(firsts)} prompts x {n} greedy tokens")
    print(f"  identical outputs: {sum(f == n for f in firsts)}/{len(firsts)}")
    print(f"  tokens before the first divergence: {sum(firsts)}/{n * len(firsts)} = {sum(firsts) / (n * len(firsts)):.1%}")
    print(f"  first divergence per prompt: {firsts}")


def run_hf(model: str, messages: list[list[dict]], max_tokens: int, dtype: str) -> list[list[int]]:
    import torch
    import transformers

    from leanserve.model.loader import load_config_and_tokenizer, resolve

    path = resolve(model).path
    _, tokenizer, _ = load_config_and_tokenizer(resolve(model))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                          dtype=getattr(torch, dtype)).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    t, out = time.perf_counter(), []
    with torch.no_grad():
        for m in messages:
            ids = tokenizer.encode_chat(m)
            gen = hf.generate(torch.tensor([ids]), max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
            out.append(gen[0, len(ids):].tolist())
    print(f"HF {dtype}: {time.perf_counter() - t:.1f} s", flush=True)
    return out


if __name__ == "__main__":
    main()
