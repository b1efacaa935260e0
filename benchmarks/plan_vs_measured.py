"""`leanserve plan`'s predictions against the real server on this machine, side by side.

For each model, context (short: prompts of 64-192 tokens, 128 output tokens; long: 768-1280 and 64)
and number of concurrent clients (1, 8, 32, 80), the real server (`leanserve serve`, a subprocess)
is driven by `leanserve bench` (random prompts, /v1/completions, ignore_eos, streamed), and the
planner replays the very same requests (their lengths from the bench JSON, the same number of
clients) through its roofline and scheduler with this machine's calibration. Printed: output
tokens/s and median TPOT, measured and predicted, and their ratio (the target: within 25%).

    .venv/bin/python -m leanserve plan calibrate --model smollm2-135m --model gemma3-270m
    .venv/bin/python benchmarks/plan_vs_measured.py --json plan_vs_measured.json

Run it on an idle machine: a second process on the cores slows the measured side only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONTEXTS = {"short": ("64:192", 128), "long": ("768:1280", 64)}
KV_CACHE_MEMORY = 3 << 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "leanserve", "serve", model, "--port", str(port), "--kv-cache-memory",
           str(KV_CACHE_MEMORY), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("server not ready in 300 s")


def bench(port: int, inputs: str, outputs: int, clients: int, num: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "leanserve", "bench", "--base-url", f"http://127.0.0.1:{port}", "--endpoint",
           "completions", "--workload", "random", "--input-len-range", inputs, "--output-len", str(outputs),
           "--ignore-eos", "--concurrency", str(clients), "--num-prompts", str(num), "--json", str(out),
           "--no-progress", "--quiet", "--seed", str(clients)]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def predict(model: str, run: dict, clients: int, calibration: dict) -> dict:
    from leanserve.plan.model import load_shape
    from leanserve.plan.planner import build_targets
    from leanserve.plan.simulate import Limits, SimRequest, roofline_timer, simulate

    shape = load_shape(model)
    target = build_targets(["cpu-local"], calibration, model)[0]
    if target.precision is None:
        raise SystemExit(f"no calibration of {model} on this machine: run `leanserve plan calibrate --model {model}`")
    reqs = sorted((r for r in run["requests"] if r.get("success")), key=lambda r: r["start_ms"])
    sims = [SimRequest(0.0, int(r["input_tokens"]), int(r["output_tokens"])) for r in reqs]
    kv_tokens = int(KV_CACHE_MEMORY // shape.kv_bytes_per_token(target.precision.kv_cache))
    timer = roofline_timer(shape, target.precision, target.machine, target.efficiency)
    return simulate(shape, timer, Limits(kv_cache_tokens=kv_tokens), sims, concurrency=clients).summary()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2-135m,gemma3-270m")
    p.add_argument("--concurrency", default="1,8,32,80")
    p.add_argument("--contexts", default="short,long")
    p.add_argument("--calibration", type=Path, default=None, help="default: $LEANSERVE_HOME/plan/calibration.json")
    p.add_argument("--json", type=Path, default=None, help="write every row here")
    args = p.parse_args(argv)
    from leanserve.plan.calibrate import calibration_path, cpu_name, load_calibrations

    calibration = load_calibrations(args.calibration or calibration_path())
    if not calibration:
        raise SystemExit("no calibration: run `leanserve plan calibrate` first")
    rows = []
    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical CPUs; python {platform.python_version()}")
    print(f"{'model':<14} {'context':<7} {'clients':>7} {'out tok/s':>10} {'predicted':>10} {'ratio':>6} "
          f"{'TPOT ms':>8} {'predicted':>10} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            port = free_port()
            server = start_server(model, port)
            try:
                for ctx in args.contexts.split(","):
                    inputs, outputs = CONTEXTS[ctx]
                    for clients in (int(c) for c in args.concurrency.split(",")):
                        num = 8 if clients == 1 else max(clients, 32)
                        run = bench(port, inputs, outputs, clients, num, Path(tmp) / "b.json")
                        pred = predict(model, run, clients, calibration)
                        row = {"model": model, "context": ctx, "clients": clients, "requests": num,
                               "measured_output_throughput": run["output_throughput"],
                               "predicted_output_throughput": pred["output_throughput"],
                               "measured_median_tpot_ms": run["median_tpot_ms"],
                               "predicted_median_tpot_ms": pred["median_tpot_ms"]}
                        row["throughput_ratio"] = row["predicted_output_throughput"] / row["measured_output_throughput"]
                        row["tpot_ratio"] = row["predicted_median_tpot_ms"] / row["measured_median_tpot_ms"]
                        rows.append(row)
                        print(f"{model:<14} {ctx:<7} {clients:>7} {row['measured_output_throughput']:>10.1f} "
                              f"{row['predicted_output_throughput']:>10.1f} {row['throughput_ratio']:>6.2f} "
                              f"{row['measured_median_tpot_ms']:>8.1f} {row['predicted_median_tpot_ms']:>10.1f} "
                              f"{row['tpot_ratio']:>6.2f}", flush=True)
            finally:
                server.terminate()
                server.wait(timeout=30)
    within = sum(1 for r in rows if abs(r["throughput_ratio"] - 1) <= 0.25 and abs(r["tpot_ratio"] - 1) <= 0.25)
    print(f"{within} of {len(rows)} configurations within 25% on both output tokens/s and median TPOT")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
