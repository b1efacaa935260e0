"""How fine the 8-bit KV cache's scales must be: K and/or V fake-quantized (int8 with a scale per G
values, then back to the model's dtype) as they are written into an ordinary cache, mean NLL and
perplexity over the first W non-overlapping 1,024-token windows of WikiText-2, prefix caching off.

    DT=float32 .venv/bin/python benchmarks/experiments/kv_group_size.py gemma3-270m 8 0,256:k,32:k
    # modes: G (K and V), G:k, G:v; G 0 = no quantization; KVD=int8 runs the real 8-bit cache
"""
import os
import sys
from importlib.resources import files
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from leanserve.engine.engine import LLM  # noqa: E402
from leanserve.model import attention, layers  # noqa: E402
from leanserve.types import SamplingParams  # noqa: E402

model, W = sys.argv[1], int(sys.argv[2])
modes = sys.argv[3].split(",")
text = (files("leanserve") / "data/eval/wikitext2_test.raw").read_text()
llm = LLM(model, enable_prefix_caching=False, kv_cache_dtype=os.environ.get("KVD", "auto"),
          dtype=os.environ.get("DT", "auto"))
tok = llm.engine.tokenizer
ids = tok.encode(text[:400000])
windows = [ids[i * 1024:(i + 1) * 1024] for i in range(W)]
real = attention.write_kv

def fake(group, which):
    def q(x):
        if group == 0: return x
        shp = x.shape
        xg = x.float().reshape(*shp[:-1], shp[-1] // group, group)
        s = xg.abs().amax(-1, keepdim=True) / 127
        v = torch.where(s > 0, torch.round(xg / s), 0.0).clamp(-127, 127)
        return (v * s).reshape(shp).to(x.dtype)
    def w(kc, vc, k, v, slots):
        real(kc, vc, q(k) if "k" in which else k, q(v) if "v" in which else v, slots)
    return w

params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0, prompt_logprobs_start=1)
for mode in modes:
    g, which = mode.split(":") if ":" in mode else (mode, "kv")
    layers.write_kv = fake(int(g), which)
    outs = llm.generate(windows, params, use_tqdm=False)
    nll = -sum(lp.logprob for o in outs for lp in o.prompt_logprobs[1:]) / sum(len(w) - 1 for w in windows)
    print(f"{model} group {g} ({which}): mean NLL {nll:.5f}, ppl {torch.tensor(nll).exp():.4f}", flush=True)
