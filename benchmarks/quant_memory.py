"""Resident memory a loaded model takes, against the bytes of its weights on disk.

Each case runs in a fresh process: import torch and leanserve, load the native kernels (their
libraries are the same for every model), load the model once and let it go (the libraries'
first-use pages, ~25-35 MB of imports and code, stay: they are in every process that has loaded a
model), read RSS (the baseline), load the model again, read RSS again. The difference is what the
model holds (the first load's difference is printed too, as "cold"): its tokenizer (measured alone in another process, the same
whatever the weights: Gemma 3's 262k-token vocabulary takes ~100 MB) and the rest (weights, rotary
tables, what the loader leaves). For a GGUF file the rest is compared with the file's tensor bytes
(the sum of its tensors' sizes in their GGUF types); for an HF folder with the float32 model (4
bytes a parameter).

    .venv/bin/python benchmarks/quant_memory.py                          # both built-in GGUF models
    .venv/bin/python benchmarks/quant_memory.py --hf /path/to/hf-folder  # and that folder: none / int8 / int4
    .venv/bin/python benchmarks/quant_memory.py --float-weights          # with the float copy kept too
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, torch
from leanserve import kernels
from leanserve.model.loader import load_model, model_size

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

model, quantization, dtype, float_weights = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3]), sys.argv[4] == "1"
from leanserve.model.loader import _return_freed_memory, load_config_and_tokenizer, resolve

def load():
    if quantization == "tokenizer":  # what the tokenizer alone keeps (the loader's reader dropped)
        _, tokenizer, reader = load_config_and_tokenizer(resolve(model))
        del reader
        _return_freed_memory()
        return tokenizer
    return load_model(model, dtype, "cpu", quantization, float_weights)

kernels.ops()
base = rss()
first = load()
cold = rss() - base
del first
_return_freed_memory()
base = rss()  # the libraries' first-use pages now in the baseline
second = load()
warm = rss() - base
params = model_size(second.model)[0] if quantization != "tokenizer" else 0
print(json.dumps({"cold": cold, "rss": warm, "params": params}))
"""


def gguf_tensor_bytes(path: Path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors)


def measure(model: str, quantization: str, dtype: str, float_weights: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, model, quantization, dtype, "1" if float_weights else "0"],
                         capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", action="append", default=[], help="an HF float folder to load as none, int8 and int4")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--float-weights", action="store_true", help="keep the float copy beside the blocks")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from leanserve import kernels
    from leanserve.model.registry import builtin_path

    print(f"{kernels.status()}; dtype {args.dtype}; float copy {'kept' if args.float_weights else 'not kept'}\n")
    print("| model | --quantization | RSS after load (MB) | of it the tokenizer | the rest | reference (MB) | "
          "rest / reference | all / reference | cold load (MB) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")

    def row(label: str, q: str, r: dict, ref: float, ref_name: str, tok: float) -> None:
        rest = r["rss"] - tok
        print(f"| {label} | {q} | {r['rss'] / 1e6:.0f} | {tok / 1e6:.0f} | {rest / 1e6:.0f} | {ref / 1e6:.0f} {ref_name} | "
              f"{rest / ref:.2f}x | {r['rss'] / ref:.2f}x | {r['cold'] / 1e6:.0f} |", flush=True)

    for name in ("smollm2-135m", "gemma3-270m"):
        tok = measure(name, "tokenizer", args.dtype, args.float_weights)["rss"]
        row(f"{name} (GGUF)", "none", measure(name, "none", args.dtype, args.float_weights),
            gguf_tensor_bytes(builtin_path(name)), "GGUF tensor bytes", tok)
    for folder in args.hf:
        tok = measure(folder, "tokenizer", args.dtype, args.float_weights)["rss"]
        results = {q: measure(folder, q, args.dtype, args.float_weights) for q in ("none", "int8", "int4")}
        for q, r in results.items():
            row(f"{Path(folder).name} (HF)", q, r, 4 * results["none"]["params"], "float32", tok)

if __name__ == "__main__":
    main()
