"""ARC-Easy through `leanserve eval`'s in-process backend against a plain HF transformers loop, side by
side on the same machine: the same items, the same token ids, float32, the same GGUF file.

The HF loop is what a script without an engine does: one forward per choice over context + choice,
summing the continuation's log-softmax. leanserve batches every choice of a batch of items into
the engine, which computes each shared context once (prefix cache) and only the continuation's
logits. Prints items/s of each, the speed ratio, and whether both chose the same answers.

    .venv/bin/python benchmarks/eval_vs_hf.py                 # all 2,376 items
    .venv/bin/python benchmarks/eval_vs_hf.py --items 200     # the first 200
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--items", type=int, default=None, help="the first N ARC-Easy items (default: all)")
    p.add_argument("--batch-size", type=int, default=64, help="items per batch for leanserve")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    args = p.parse_args()

    import transformers

    from leanserve.config import EngineConfig
    from leanserve.eval.inprocess import InProcessBackend
    from leanserve.eval.tasks import EvalOptions, Selection, builtin_task, continuation_request, load_arc_easy
    from leanserve.model.loader import resolve

    items = load_arc_easy()
    if args.items is not None:
        items = items[:args.items]
    backend = InProcessBackend(EngineConfig(model=args.model, dtype="float32"))
    task = builtin_task("arc_easy")
    options = EvalOptions(selection=Selection(first=len(items)), batch_size=args.batch_size)
    warm = min(8, len(items))
    task.run(backend, EvalOptions(selection=Selection(first=warm), batch_size=warm))  # warm-up (kernels, allocator)
    t0 = time.perf_counter()
    ours = task.run(backend, options)
    ours_s = time.perf_counter() - t0

    path = resolve(args.model).path
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    requests = []
    for item in items:
        ctx = backend.tokenize(item.context)
        requests.append([continuation_request(backend, item.context, " " + c, ctx) for c in item.choices])
    t0 = time.perf_counter()
    chosen = []
    with torch.inference_mode():
        for reqs in requests:
            sums = []
            for r in reqs:
                lp = torch.log_softmax(hf(torch.tensor([r.token_ids])).logits[0].float(), dim=-1)
                sums.append(sum(lp[i - 1, r.token_ids[i]].item() for i in range(r.start, len(r.token_ids))))
            chosen.append(max(range(len(sums)), key=lambda i: sums[i]))
    hf_s = time.perf_counter() - t0

    same = sum(a == r["chosen"] for a, r in zip(chosen, ours.items))
    result = {"items": len(items), "leanserve_s": round(ours_s, 2), "hf_s": round(hf_s, 2),
              "leanserve_items_per_s": round(len(items) / ours_s, 2), "hf_items_per_s": round(len(items) / hf_s, 2),
              "speedup": round(hf_s / ours_s, 2), "acc": ours.metrics["acc"], "same_choices": same,
              "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "cores": os.cpu_count()}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"ARC-Easy, {len(items)} items, {args.model} float32, {torch.get_num_threads()} threads")
        print(f"  leanserve eval (in-process): {ours_s:8.1f} s  {result['leanserve_items_per_s']:7.2f} items/s  "
              f"acc {ours.metrics['acc']:.4f}")
        print(f"  HF transformers loop:        {hf_s:8.1f} s  {result['hf_items_per_s']:7.2f} items/s")
        print(f"  speed-up {result['speedup']:.2f}x; the same answer on {same} of {len(items)} items")


if __name__ == "__main__":
    main()
