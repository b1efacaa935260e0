"""Speculative decoding on against off, through the HTTP server, side by side in one run.

Starts one `leanserve serve` per method (off, ngram, auto by default; ``draft@self:8`` is
``--speculative draft --draft-model self:8``; the same model and options otherwise) and drives each in turn with `leanserve bench` on the same rows, so all three see the
same machine conditions row by row:

    rag, code-edit, summarize, spec-bench   1 client, greedy, natural lengths (up to --output-len)
    rag, code-edit, summarize               4 clients
    chat (MT-Bench)                         --saturation clients, EOS ignored: the batch is compute-bound

Greedy output is the same with speculation on or off, so every method generates the same tokens and
output tokens/s compares directly. Prints a markdown table: output tokens/s of each method, its
ratio to off, the decode-only ratio (mean TPOT of off over the method's: the prompt's prefill,
which speculation does not change, left out), $ per million output tokens (the server's own meter at the default price), and the
acceptance rate and tokens per verifying step from the server's /metrics.

    .venv/bin/python benchmarks/spec_decode.py                       # about 30 minutes on 2 cores
    .venv/bin/python benchmarks/spec_decode.py --methods off,ngram --num-prompts 4 --rows rag:1
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import free_port, wait_ready  # noqa: E402  (benchmarks/peers.py)

PY = sys.executable
GROUNDED = ("rag", "code-edit", "summarize")
DEFAULT_ROWS = [f"{w}:1" for w in (*GROUNDED, "spec-bench")] + [f"{w}:4" for w in GROUNDED] + ["chat:sat"]


def spec_counters(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
        m = re.search(rf"^leanserve:spec_decode_{name}_total\{{[^}}]*\}} (\S+)$", text, re.M)
        out[name] = float(m.group(1)) if m else 0.0
    return out


def bench(port: int, workload: str, clients: int, num_prompts: int, output_len: int, out: Path) -> dict:
    cmd = [PY, "-m", "leanserve", "bench", "--base-url", f"http://127.0.0.1:{port}", "--endpoint", "chat",
           "--workload", workload, "--num-prompts", str(num_prompts), "--output-len", str(output_len),
           "--temperature", "0", "--concurrency", str(clients), "--no-progress", "--quiet", "--json", str(out)]
    if workload == "chat":
        cmd.append("--ignore-eos")
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default="off,ngram,auto",
                   help="comma-separated --speculative values; METHOD@MODEL adds --draft-model MODEL (draft@self:8)")
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="WORKLOAD:CLIENTS,... (CLIENTS 'sat': --saturation)")
    p.add_argument("--num-prompts", type=int, default=8, help="prompts per row at 1 client (4 x clients otherwise)")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--saturation", type=int, default=32, help="clients of the chat:sat row")
    p.add_argument("--serve-args", default="", help="more `leanserve serve` options for every server")
    args = p.parse_args(argv)
    methods = args.methods.split(",")
    rows = [(w, args.saturation if c == "sat" else int(c)) for w, c in (r.split(":") for r in args.rows.split(","))]
    tmp = Path(tempfile.mkdtemp(prefix="spec-bench-"))
    servers: dict[str, tuple[int, subprocess.Popen]] = {}
    try:
        for m in methods:  # all up at once; an idle server takes no CPU
            port = free_port()
            log = open(tmp / f"{m}.log", "w")
            method, _, draft = m.partition("@")  # draft@self:8: --speculative draft --draft-model self:8
            cmd = [PY, "-m", "leanserve", "serve", args.model, "--port", str(port), "--log-level", "warning",
                   "--speculative", method, "--max-num-seqs", str(max(args.saturation, 8)), *args.serve_args.split()]
            if draft:
                cmd += ["--draft-model", draft]
            servers[m] = (port, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
        for port, proc in servers.values():
            wait_ready(port, proc)
        results: dict[tuple[str, int], dict[str, dict]] = {}
        for workload, clients in rows:
            n = args.num_prompts if clients == 1 else 4 * clients if workload != "chat" else 2 * clients
            for m in methods:
                port = servers[m][0]
                before = spec_counters(port)
                r = bench(port, workload, clients, n, args.output_len, tmp / f"{workload}-{clients}-{m}.json")
                after = spec_counters(port)
                r["spec"] = {k: after[k] - before[k] for k in after}
                results.setdefault((workload, clients), {})[m] = r
                print(f"{workload:10s} {clients:3d} clients  {m:7s} {r['output_throughput']:7.1f} out tok/s", flush=True)
    finally:
        for _, proc in servers.values():
            proc.terminate()
            proc.wait(30)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"\n{args.model}, greedy, up to {args.output_len} output tokens; {cpu}\n")
    head = "| workload | clients | " + " | ".join(f"{m} tok/s" + ("" if m == "off" else f" (x off)") for m in methods)
    spec_methods = [m for m in methods if m != "off"]
    print(head + " | " + " | ".join(f"{m} $/Mtok" for m in methods) + " | " +
          " | ".join(f"{m} decode x off" for m in spec_methods) + " | " +
          " | ".join(f"{m} accepted / per step" for m in spec_methods) + " |")
    print("|---|---:|" + "---:|" * (2 * len(methods) + 2 * len(spec_methods)))
    for (workload, clients), per in results.items():
        base = per.get("off", {}).get("output_throughput")
        cells = []
        for m in methods:
            t = per[m]["output_throughput"]
            cells.append(f"{t:.1f}" + (f" ({t / base:.2f}x)" if base and m != "off" else ""))
        costs = [f"{per[m].get('server_cost_per_million_output_tokens') or 0:.3f}" for m in methods]  # the server's own meter
        # decode only: mean time per output token after the first (TTFT, the prompt's prefill, is
        # outside what speculation changes)
        base_tpot = per.get("off", {}).get("mean_tpot_ms")
        tpot = [f"{base_tpot / per[m]['mean_tpot_ms']:.2f}x" if base_tpot and per[m].get("mean_tpot_ms") else "-"
                for m in spec_methods]
        acc = []
        for m in methods:
            if m == "off":
                continue
            s = per[m]["spec"]
            rate = s["num_accepted_tokens"] / s["num_draft_tokens"] if s["num_draft_tokens"] else 0.0
            per_step = 1 + s["num_accepted_tokens"] / s["num_drafts"] if s["num_drafts"] else 0.0
            acc.append(f"{rate:.2f} / {per_step:.2f}")
        print(f"| {workload} | {clients} | " + " | ".join(cells + costs + tpot + acc) + " |")


if __name__ == "__main__":
    main()
