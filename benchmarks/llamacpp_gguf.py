"""A GGUF written by ``leanserve quantize``, loaded by llama.cpp: greedy continuations side by side.

For each ``--type``: ``leanserve quantize SRC`` writes the file; llama.cpp's ``llama-server``
(``benchmarks/peers.py install llamacpp`` builds it under ``.peers/``) loads it, and the tensor
types it reports are printed; then the first N MT-Bench questions through the chat template, as
the same token ids, are continued greedily for M tokens (EOS ignored) by llama-server (its
``/completion``, temperature 0) and by leanserve's engine on the same file (in float32 by default,
as llama.cpp computes on a CPU). Printed per type: how
many continuations are the same tokens, and how many tokens the two agree on before they first
differ (the same model in two engines: llama.cpp multiplies the weights by activations it rounds to
8 bits, leanserve by the exact activations, so near-ties may go either way and the texts part).

    .venv/bin/python benchmarks/peers.py install llamacpp
    .venv/bin/python benchmarks/llamacpp_gguf.py /tmp/smol-hf --type int8,int4 --prompts 20 --max-tokens 32
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.peers import PEERS, PY, free_port, wait_ready  # noqa: E402


def complete(port: int, prompt: list[int], max_tokens: int) -> list[int]:
    body = json.dumps({"prompt": prompt, "n_predict": max_tokens, "temperature": 0.0, "ignore_eos": True,
                       "cache_prompt": False, "return_tokens": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/completion", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())["tokens"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="an HF folder leanserve quantize takes (Llama, Qwen2, Qwen3)")
    ap.add_argument("--type", default="int8,int4")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32", help="leanserve's dtype")
    args = ap.parse_args()
    server = PEERS / "llama.cpp" / "build" / "bin" / "llama-server"
    if not server.exists():
        print(f"error: {server} not found; build it with: {PY} benchmarks/peers.py install llamacpp", file=sys.stderr)
        return 2

    from benchmarks.throughput import chat_prompts
    from leanserve.engine.engine import LLM
    from leanserve.types import SamplingParams

    prompts = chat_prompts(args.source, args.prompts)  # token ids: the same input for both
    with tempfile.TemporaryDirectory() as tmp:
        for qtype in args.type.split(","):
            gguf = Path(tmp) / f"model-{qtype}.gguf"
            subprocess.run([PY, "-m", "leanserve", "quantize", args.source, str(gguf), "--type", qtype], check=True,
                           capture_output=True)
            port = free_port()
            log = Path(tmp) / f"llama-{qtype}.log"
            with open(log, "w") as f:
                proc = subprocess.Popen([str(server), "-m", str(gguf), "--port", str(port), "-np", "1", "-c", "2048",
                                         "-t", "2", "-lv", "4"], stdout=f, stderr=subprocess.STDOUT)
            try:
                wait_ready(port, proc, timeout=120)
                theirs = [complete(port, p, args.max_tokens) for p in prompts]
            finally:
                proc.terminate()
                proc.wait()
            types = sorted(set(re.findall(r"type\s+(\w+):\s+(\d+) tensors", log.read_text())))
            llm = LLM(str(gguf), dtype=args.dtype)
            params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
            ours = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
            agree = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                     for a, b in zip(ours, theirs)]
            same = sum(a == b for a, b in zip(ours, theirs))
            print(f"{qtype}: {gguf.stat().st_size / 1e6:.0f} MB; llama.cpp loaded it: "
                  f"{', '.join(f'{n} {t}' for t, n in types) or '(no tensor types in its log)'}")
            print(f"  {same} of {len(prompts)} greedy continuations of {args.max_tokens} tokens the same; tokens agreed "
                  f"before the first difference: median {sorted(agree)[len(agree) // 2]}, min {min(agree)}")
            detok = llm.engine.tokenizer.decode
            print(f"  first prompt: leanserve {detok(ours[0])[:80]!r}\n                llama.cpp {detok(theirs[0])[:80]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
