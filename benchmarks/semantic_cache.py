"""The semantic cache's threshold, measured: false hits among distinct questions, hits on repeats.

Embeds every TriviaQA question of the packaged subset (3,000) the way the gateway's semantic stage
does (leanserve/gateway/semantic.py: the completion prompt "Question: ...\\nAnswer:", normalized,
then the model's embedding, as /v1/embeddings gives it) and reports, for a range of thresholds:

* false hits: distinct questions (after normalization) whose nearest other question reaches the
  threshold, i.e. requests the cache would answer with another question's answer;
* hit rate on trivially varied repeats of each question: upper case, lower case, doubled spaces,
  punctuation removed or added;
* hit rate on light rewordings (one small word dropped, "What" <-> "Which"): what the embedding adds
  beyond normalization (these are near-misses by design; a hit here may or may not be right).

    .venv/bin/python benchmarks/semantic_cache.py [--model smollm2-135m] [--limit 3000] [--variants-of 1000]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import time
from pathlib import Path

import numpy as np

from leanserve.engine.engine import LLM
from leanserve.eval.tasks import load_triviaqa
from leanserve.gateway.semantic import DEFAULT_THRESHOLD, normalize_text
from leanserve.types import SamplingParams

THRESHOLDS = (0.97, 0.98, 0.99, 0.995, 0.999, 0.9995, 0.9999)
EMBED = SamplingParams(max_tokens=1, temperature=0.0, embed=True)


def trivial_variants(q: str) -> list[str]:
    return [q.upper(), q.lower(), re.sub(r" ", "  ", q), re.sub(r"[^\w\s]", "", q), q.replace("?", " ?!")]


def rewordings(q: str) -> list[str]:
    out = []
    for w in (" the ", " a ", " of "):
        if w in q:
            out.append(q.replace(w, " ", 1))
            break
    if q.startswith("Question: What "):
        out.append(q.replace("Question: What ", "Question: Which ", 1))
    elif q.startswith("Question: Which "):
        out.append(q.replace("Question: Which ", "Question: What ", 1))
    return out


def embed(llm: LLM, texts: list[str]) -> np.ndarray:
    ids = [llm.engine.tokenizer.encode(normalize_text(t)) for t in texts]
    outs = llm.generate(ids, EMBED, use_tqdm=False)
    return np.asarray([o.embedding for o in outs], dtype=np.float32)


def cpu_name() -> str:
    text = Path("/proc/cpuinfo").read_text(errors="replace")
    name = re.search(r"model name\s*:\s*(.*)", text)
    flags = set(re.search(r"flags\s*:\s*(.*)", text).group(1).split()) if "flags" in text else set()
    isa = [f for f in ("avx512_bf16", "amx_bf16") if f in flags] or (["avx2"] if "avx2" in flags else [])
    return f"{name.group(1).strip() if name else 'unknown'} ({', '.join(isa)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--limit", type=int, default=3000)
    ap.add_argument("--variants-of", type=int, default=1000, metavar="N",
                    help="make the repeats and rewordings of the first N distinct questions (default 1000)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    items = load_triviaqa()[:args.limit]
    prompts = [it.prompt for it in items]
    # distinct after normalization: the same question twice is a true hit, not a false one
    distinct, seen = [], set()
    for p in prompts:
        if normalize_text(p) not in seen:
            seen.add(normalize_text(p))
            distinct.append(p)
    llm = LLM(args.model)
    t0 = time.perf_counter()
    base = embed(llm, distinct)
    secs = time.perf_counter() - t0
    sims = base @ base.T
    np.fill_diagonal(sims, -1.0)
    nearest = sims.max(1)
    some = distinct[:args.variants_of]
    var = [v for p in some for v in trivial_variants(p)]
    var_owner = [i for i, p in enumerate(some) for _ in trivial_variants(p)]
    var_sims = (embed(llm, var) * base[var_owner]).sum(1)
    rew = [v for p in some for v in rewordings(p)]
    rew_owner = [i for i, p in enumerate(some) for _ in rewordings(p)]
    rew_sims = (embed(llm, rew) * base[rew_owner]).sum(1) if rew else np.zeros(0)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "leanserve"], capture_output=True, text=True).stdout
    rows = []
    for t in THRESHOLDS:
        rows.append({"threshold": t, "false_hit_questions": int((nearest >= t).sum()),
                     "false_hit_rate": float((nearest >= t).mean()),
                     "trivial_repeat_hit_rate": float((var_sims >= t).mean()),
                     "rewording_hit_rate": float((rew_sims >= t).mean()) if len(rew_sims) else None})
    result = {"model": args.model, "dtype": llm.engine.info.dtype, "questions": len(prompts), "distinct": len(distinct),
              "trivial_variants": len(var), "rewordings": len(rew), "embed_seconds": secs,
              "nearest_other_similarity": {q: float(np.quantile(nearest, q / 100)) for q in (50, 90, 99, 100)},
              "default_threshold": DEFAULT_THRESHOLD, "rows": rows, "cpu": cpu_name(),
              "commit": commit + (" + uncommitted changes" if dirty else "")}
    print(f"{args.model} ({result['dtype']}), {len(distinct)} distinct of {len(prompts)} TriviaQA questions, "
          f"{len(var)} trivial variants, {len(rew)} rewordings; embedding the questions took {secs:.1f} s")
    print(f"nearest other question's similarity: median {result['nearest_other_similarity'][50]:.4f}, p90 "
          f"{result['nearest_other_similarity'][90]:.4f}, p99 {result['nearest_other_similarity'][99]:.4f}, "
          f"max {result['nearest_other_similarity'][100]:.4f}")
    print("| threshold | false hits (questions) | false-hit rate | trivial repeats hit | rewordings hit |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        mark = " (default)" if r["threshold"] == DEFAULT_THRESHOLD else ""
        rw = "-" if r["rewording_hit_rate"] is None else f"{r['rewording_hit_rate']:.1%}"
        print(f"| {r['threshold']}{mark} | {r['false_hit_questions']} | {r['false_hit_rate']:.2%} | "
              f"{r['trivial_repeat_hit_rate']:.1%} | {rw} |")
    print(f"CPU: {result['cpu']}; commit {result['commit']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
