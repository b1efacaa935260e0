"""Versions of the quantized-matmul kernel (kernels/csrc/qlinear.cpp) against each other, in one process.

Each given source is built as its own operator namespace (``lsab_<name>``), then model passes
alternate between them: every quantized matmul of SmolLM2-135M's GGUF at one row of bfloat16 x, in
forward order, on the real weights (so the weights stream as in a decode step), the Q4 layers and
the Q8 LM head timed apart. The first source is the baseline; the others' outputs are checked
against it (largest difference) and their medians given as its ratio. The machine's speed drifts
minute to minute, so only ratios from one run mean anything.

    git show HEAD:leanserve/kernels/csrc/qlinear.cpp > /tmp/base.cpp    # then edit a copy
    .venv/bin/python benchmarks/experiments/qlinear_ab.py /tmp/base.cpp /tmp/variant.cpp --threads 2 --passes 40
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils import cpp_extension

from leanserve import kernels
from leanserve.model.loader import load_model


def build(source: Path, name: str, folder: Path):
    """``source`` compiled with the kernels' flags, its operators registered as ``torch.ops.lsab_<name>``."""
    text = source.read_text().replace("TORCH_LIBRARY_FRAGMENT(leanserve", f"TORCH_LIBRARY_FRAGMENT(lsab_{name}")
    text = text.replace("TORCH_LIBRARY_IMPL(leanserve", f"TORCH_LIBRARY_IMPL(lsab_{name}")
    text = re.sub(r'\n\s*m\.def\("avx512_bf16_available[^\n]*\n', "\n", text)  # defined once, by leanserve
    out = folder / name
    out.mkdir(parents=True)
    (out / f"{name}.cpp").write_text(text)
    for header in kernels.CSRC.glob("*.h"):
        shutil.copy(header, out)
    cpp_extension.load(name=f"lsab_{name}", sources=[str(out / f"{name}.cpp")], extra_cflags=list(kernels.CFLAGS),
                       extra_ldflags=list(kernels.LDFLAGS), build_directory=str(out), is_python_module=False)
    return getattr(torch.ops, f"lsab_{name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sources", nargs="+", type=Path, help="qlinear.cpp versions; the first is the baseline")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--passes", type=int, default=40, help="model passes per version")
    args = ap.parse_args()
    names = [f"v{i}_{re.sub(r'[^A-Za-z0-9]', '_', s.stem)}" for i, s in enumerate(args.sources)]
    with tempfile.TemporaryDirectory() as tmp:
        ops = {n: build(s, n, Path(tmp)) for n, s in zip(names, args.sources)}
    model = load_model("smollm2-135m", torch.bfloat16).model
    weights = [m.qweight for m in model.modules() if getattr(m, "qweight", None) is not None]
    if model.lm_head_q is not None:
        weights.append(model.lm_head_q)
    xs = {k: torch.randn(1, k, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(k))
          for k in {w.shape[1] for w in weights}}
    torch.set_num_threads(args.threads)
    base = [ops[names[0]].qlinear(xs[w.shape[1]], w.qs, w.scales, w.mins, w.bits) for w in weights]
    for n in names[1:]:
        diff = max((ops[n].qlinear(xs[w.shape[1]], w.qs, w.scales, w.mins, w.bits).float() - b.float()).abs().max().item()
                   for w, b in zip(weights, base))
        print(f"{n}: largest difference from {names[0]} {diff:g}")

    def one_pass(op, group) -> float:
        t = time.perf_counter()
        for w in group:
            op.qlinear(xs[w.shape[1]], w.qs, w.scales, w.mins, w.bits)
        return time.perf_counter() - t

    print(f"\n{args.threads} threads, {args.passes} passes each, alternating (median ms, baseline / version)")
    for label, bits in (("Q4 layers", 4), ("Q8 LM head", 8)):
        group = [w for w in weights if w.bits == bits]
        if not group:
            continue
        times: dict[str, list[float]] = {n: [] for n in names}
        for i in range(args.passes):
            for n in names[i % len(names):] + names[:i % len(names)]:  # rotate who goes first
                times[n].append(one_pass(ops[n], group))
        ref = statistics.median(times[names[0]])
        print(f"{label}: " + "; ".join(f"{n} {statistics.median(t) * 1e3:.3f} ({ref / statistics.median(t):.2f}x)"
                                       for n, t in times.items()))


if __name__ == "__main__":
    main()
