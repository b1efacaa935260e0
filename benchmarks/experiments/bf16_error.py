"""How far bfloat16 logits are from float32, teacher-forced, so one near-tie does not end the comparison.

Greedy agreement (bf16_agreement.py) stops counting at the first flipped near-tie, so a few flips
decide it. Here both models see the same tokens: N MT-Bench prompts (plain text, no chat
template) are prefilled in one batch, then decoded together for T steps, each step feeding both
models the float32 model's greedy token. Per step and sequence: whether the bfloat16 argmax is
the float32 one, and KL(p_fp32 || p_bf16) of the next-token distributions. The batch decodes N
rows at once, so with N > 4 the bf16 matmuls are the dense path (AMX on CPUs that have it).
Compare paths by environment: LEANSERVE_AMX=0 (oneDNN), LEANSERVE_AVX512=0 (AVX2 attention).

    .venv/bin/python benchmarks/experiments/bf16_error.py
    LEANSERVE_AMX=0 .venv/bin/python benchmarks/experiments/bf16_error.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from leanserve import kernels  # noqa: E402
from leanserve.model.attention import AttentionMetadata  # noqa: E402
from leanserve.model.loader import load_model  # noqa: E402

BLOCK = 16


class Run:
    """One model with a paged KV cache for the batch: each sequence owns consecutive blocks."""

    def __init__(self, model: str, dtype: torch.dtype, lengths: list[int]) -> None:
        loaded = load_model(model, dtype)
        self.net, cfg = loaded.model, loaded.model.cfg
        per_seq = -(-max(lengths) // BLOCK)
        self.tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(lengths))]
        shape = (per_seq * len(lengths), BLOCK, cfg.num_kv_heads, cfg.head_dim)
        self.cache = [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in self.net.model.layers]
        self.windows = set(cfg.layer_windows)

    @torch.no_grad()
    def forward(self, ids: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Each sequence's new tokens `ids[i]` at positions starts[i]...; float32 logits of each last one."""
        qlens = [len(x) for x in ids]
        clens = [s + q for s, q in zip(starts, qlens)]
        meta = AttentionMetadata.build(qlens, clens, self.tables, BLOCK, self.windows)
        flat = torch.tensor([t for x in ids for t in x])
        pos = torch.cat([torch.arange(s, s + q) for s, q in zip(starts, qlens)])
        hidden = self.net(flat, pos, meta, self.cache)
        last = torch.tensor(qlens).cumsum(0) - 1
        return self.net.compute_logits(hidden[last]).float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--num-prompts", type=int, default=40)
    ap.add_argument("--steps", type=int, default=64)
    args = ap.parse_args()
    path = ROOT / "leanserve" / "data" / "mt_bench_questions.jsonl"
    texts = [json.loads(line)["turns"][0] for line in path.read_text().splitlines() if line.strip()][: args.num_prompts]
    tok = load_model(args.model, torch.float32).tokenizer
    prompts = [tok.encode(t) for t in texts]
    lengths = [len(p) + args.steps for p in prompts]
    runs = {dt: Run(args.model, dt, lengths) for dt in (torch.float32, torch.bfloat16)}
    agree, kls, n = 0, [], 0
    logits = {dt: r.forward(prompts, [0] * len(prompts)) for dt, r in runs.items()}
    pos = [len(p) for p in prompts]
    for _ in range(args.steps):
        ref, got = logits[torch.float32], logits[torch.bfloat16]
        nxt = ref.argmax(-1)
        agree += int((got.argmax(-1) == nxt).sum())
        n += len(prompts)
        kls.append(torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                              reduction="none").sum(-1))
        feed = [[int(t)] for t in nxt]
        logits = {dt: r.forward(feed, pos) for dt, r in runs.items()}
        pos = [p + 1 for p in pos]
    kl = torch.cat(kls)
    print(f"{args.model}: bfloat16 vs float32, teacher-forced, {len(prompts)} prompts x {args.steps} decode steps "
          f"(+ the prefill's last position); {kernels.status()}")
    print(f"  argmax agreement: {agree}/{n} = {agree / n:.2%}")
    print(f"  KL(fp32 || bf16) per token: mean {kl.mean():.2e}, median {kl.median():.2e}, p99 {kl.quantile(0.99):.2e}")


if __name__ == "__main__":
    main()
