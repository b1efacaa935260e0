"""A batch beside an interactive load: does it fill the idle time without slowing the interactive requests?

Starts one ``leanserve serve MODEL`` (a fresh ledger and batch folder in a temporary folder) and, in
one run against it:

1. **Saturation**: a closed-loop ``leanserve bench`` (chat workload = the MT-Bench first turns,
   ``--concurrency 32 --num-prompts 64``, ``--output-len 64 --ignore-eos``, greedy); its request
   throughput is the saturated interactive rate.
2. **Phase A, interactive alone**: ``leanserve bench`` with Poisson arrivals at ``--rate-fraction``
   (default 0.4) of that rate for ``--duration`` seconds (default 120), same workload and output
   length. Right when it ends, ``GET /v1/cost?window=DURATION``: utilization (busy / wall) and the
   blended $ per million tokens of the window.
3. **Phase B, with a batch**: a ``--batch-lines`` (default 2,000) line batch file (chat requests
   over the same prompts cycled, ``max_tokens`` = the output length, temperature 0, ``ignore_eos``
   so every line makes the same number of tokens, custom_ids ``line-0``...) is uploaded
   (``POST /v1/files``) and started (``POST /v1/batches``); once one line has finished, the same
   Poisson load runs again for the same duration. At its end: the same /v1/cost window, then the
   batch's ``request_counts`` and ``usage`` (the batch's own $/Mtok = usage.usd / total_tokens, and
   lines/s over the phase); then the batch is cancelled and the run waits until it is ``cancelled``.

Prints a markdown table (both phases: interactive req/s offered and achieved, p99 TTFT, median
TPOT, utilization, blended $/Mtok of the window, batch lines finished in the phase, the batch's
$/Mtok), the B/A ratios of p99 TTFT and median TPOT, and the issue's targets (at most +10% on both,
utilization above 90%, a lower blended $/Mtok) marked met or not. The price is the server's default
(a labelled placeholder): ratios carry over to any price, dollar amounts do not. The billed $/Mtok
counts busy time only (what requests are billed); the "all-in" $/Mtok beside it is the wall time at
the price (busy + idle) over the tokens of the window, the figure that idle time inflates. Every 2 s
of each phase it also reads the engine's gauges (/metrics: running, waiting, KV-cache usage) and the
mean step time of the last 2 s (/v1/cost), summarized under the table and kept in the JSON.

    .venv/bin/python benchmarks/batch_idle.py                      # about 5 minutes on 2 cores
    .venv/bin/python benchmarks/batch_idle.py --duration 10 --batch-lines 50   # a quick check
    .venv/bin/python benchmarks/batch_idle.py --batch-max-in-flight 4 --json out.json
    .venv/bin/python benchmarks/batch_idle.py --serve-args "--batch-seqs-beside-interactive 0"
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from response_cache import commit_line, cpu_line, free_port  # noqa: E402  (benchmarks/response_cache.py)

PY = sys.executable


class BenchError(SystemExit):
    """A one-line failure of the run (printed by SystemExit, exit status 1)."""

    def __init__(self, message: str) -> None:
        super().__init__(f"batch_idle: {message}")


class Interrupted(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


# ---- the server -------------------------------------------------------------------------------------

class Server:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / "server.log"
        cmd = [PY, "-m", "leanserve", "serve", args.model, "--port", str(self.port), "--log-level", "warning",
               "--ledger", str(tmp / "ledger.sqlite"), "--batch-dir", str(tmp / "batches")]
        if args.dtype:
            cmd += ["--dtype", args.dtype]
        if args.batch_max_in_flight is not None:
            cmd += ["--batch-max-in-flight", str(args.batch_max_in_flight)]
        cmd += args.serve_args.split()
        self.cmd = cmd
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                     start_new_session=True)  # Ctrl-C reaches this script only: it stops the server

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:].strip()
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log_tail().splitlines()
            raise BenchError(f"the server exited with {self.proc.returncode}"
                             f"{': ' + tail[-1] if tail else ''} (log: {self.log_path})")

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"the server did not answer /health within {timeout:.0f} s (log: {self.log_path})")
            time.sleep(0.5)

    def stop(self) -> None:
        stop_process(self.proc, 30)
        self._log.close()

    def call(self, method: str, path: str, timeout: float = 60, **kw) -> dict:
        self.check_alive()
        try:
            r = httpx.request(method, self.base + path, timeout=timeout, **kw)
        except httpx.HTTPError as e:
            self.check_alive()
            raise BenchError(f"{method} {path}: {type(e).__name__}: {e}") from None
        if r.status_code != 200:
            raise BenchError(f"{method} {path}: HTTP {r.status_code}: {r.text[:300]}")
        return r.json()


# ---- the load (leanserve bench) ---------------------------------------------------------------------

def stop_process(proc: subprocess.Popen, grace: float = 10) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def bench(server: Server, args: argparse.Namespace, out: Path, label: str, *, rate: float | None = None) -> dict:
    cmd = [PY, "-m", "leanserve", "bench", "--base-url", server.base, "--endpoint", "chat", "--workload", "chat",
           "--output-len", str(args.output_len), "--ignore-eos", "--temperature", "0", "--seed", str(args.seed),
           "--no-progress", "--quiet", "--json", str(out)]
    if args.model:
        cmd += ["--model", args.model]
    if rate is None:
        cmd += ["--concurrency", str(args.sat_concurrency), "--num-prompts", str(args.sat_prompts)]
    else:
        cmd += ["--request-rate", f"{rate:.6g}", "--duration", f"{args.duration:g}"]
    log = out.with_suffix(".log")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait()
        finally:
            stop_process(proc)  # interrupted: the load stops too
    server.check_alive()
    if rc != 0 or not out.exists():
        tail = log.read_text(errors="replace").strip().splitlines()
        raise BenchError(f"leanserve bench ({label}) exited with {rc}{': ' + tail[-1] if tail else ''} (log: {log})")
    res = json.loads(out.read_text())
    if not res.get("completed"):
        raise BenchError(f"leanserve bench ({label}): no request completed (log: {log})")
    if res.get("failed"):
        print(f"  warning: {res['failed']} of the {label} requests failed (see {out})", flush=True)
    return res


def phase_window(args: argparse.Namespace, res: dict) -> int:
    """The /v1/cost window read at a phase's end: --duration seconds, or the load's own wall time (whole
    seconds, rounded down) when that was shorter (a Poisson run stops at its last arrival before the
    deadline), so the window never reaches back into the previous phase."""
    window = max(1, round(args.duration))
    load_s = res.get("duration")
    if load_s is not None and load_s < window:
        print(f"  note: the load lasted {load_s:.1f} s < --duration: /v1/cost window {max(1, math.floor(load_s))} s",
              flush=True)
        return max(1, math.floor(load_s))
    return window


class Sampler:
    """Every ``period`` seconds during a phase: the engine's gauges from /metrics (running, waiting,
    in flight, KV-cache usage) and the last seconds' steps and busy time from /v1/cost (so the mean
    step time), to see what the engine did when latency moved. Cheap: two small GETs a period."""

    GAUGES = ("num_requests_running", "num_requests_waiting", "num_requests_in_flight", "kv_cache_usage_perc")

    def __init__(self, server: Server, period: float = 2.0) -> None:
        self.server, self.period = server, period
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "Sampler":
        self.t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _loop(self) -> None:
        with httpx.Client(base_url=self.server.base, timeout=5) as client:
            while not self._stop.wait(self.period):
                try:
                    text = client.get("/metrics").text
                    w = client.get("/v1/cost", params={"window": round(self.period)}).json()["window"]
                except (httpx.HTTPError, ValueError, KeyError):
                    continue
                row = {"t": round(time.monotonic() - self.t0, 1)}
                for name in self.GAUGES:
                    m = re.search(rf"^leanserve:{name}\{{[^}}]*\}} (\S+)$", text, re.M)
                    row[name] = float(m.group(1)) if m else None
                row["steps"], row["busy_s"] = w.get("steps"), w.get("busy_seconds")
                row["mean_step_ms"] = w["busy_seconds"] / w["steps"] * 1e3 if w.get("steps") else None
                self.samples.append(row)

    def summary(self) -> dict:
        def col(k: str) -> list[float]:
            return [r[k] for r in self.samples if r.get(k) is not None]
        steps = col("mean_step_ms")
        return {"samples": len(self.samples),
                "max_running": max(col("num_requests_running"), default=None),
                "max_waiting": max(col("num_requests_waiting"), default=None),
                "max_kv_cache_usage": max(col("kv_cache_usage_perc"), default=None),
                "median_step_ms": statistics.median(steps) if steps else None,
                "max_step_ms": max(steps, default=None)}


def cost_window(server: Server, window: int) -> dict:
    c = server.call("GET", f"/v1/cost?window={window}")
    if "window" not in c or "utilization" not in c["window"]:
        raise BenchError("GET /v1/cost has no window.utilization (more than one model served?)")
    w = c["window"]
    total = w["tokens"]["total"]
    wall_usd = (w.get("machine_usd") or 0.0) + (w.get("idle_usd") or 0.0)
    return {"window_s": window, "utilization": w["utilization"], "busy_seconds": w["busy_seconds"], "wall_seconds": w["wall_seconds"],
            "usd": w["usd"], "tokens": w["tokens"], "requests": w["requests"],
            "usd_per_mtok": (w.get("usd_per_million_tokens") or {}).get("total"),
            "all_in_usd_per_mtok": wall_usd / total * 1e6 if total else None,
            "machine_usd": w.get("machine_usd"), "idle_usd": w.get("idle_usd"), "raw": c}


def interactive(res: dict) -> dict:
    return {k: res.get(k) for k in ("completed", "failed", "duration", "request_throughput", "output_throughput",
                                    "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "median_e2el_ms", "p99_e2el_ms")}


# ---- the batch --------------------------------------------------------------------------------------

def batch_file(args: argparse.Namespace, model: str) -> bytes:
    from leanserve.bench.workloads import load_mt_bench

    prompts = [row["turns"][0] for row in load_mt_bench(None)]
    lines = []
    for i in range(args.batch_lines):
        body = {"model": model, "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
                "max_tokens": args.output_len, "temperature": 0, "ignore_eos": True}
        lines.append(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                                 "body": body}))
    return ("\n".join(lines) + "\n").encode()


def done_lines(batch: dict) -> int:
    rc = batch["request_counts"]
    return rc["completed"] + rc["failed"]


def wait_batch(server: Server, batch_id: str, until, what: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        b = server.call("GET", f"/v1/batches/{batch_id}")
        if until(b):
            return b
        if b["status"] in ("failed", "expired") or (b["status"] in ("completed", "cancelled") and not until(b)):
            raise BenchError(f"batch {batch_id} is {b['status']} while waiting for {what} "
                             f"(request_counts {b['request_counts']})")
        if time.monotonic() > deadline:
            raise BenchError(f"batch {batch_id}: no {what} within {timeout:.0f} s "
                             f"(status {b['status']}, request_counts {b['request_counts']})")
        time.sleep(0.5)


# ---- the report -------------------------------------------------------------------------------------

def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def ratio(b: float | None, a: float | None) -> float | None:
    return b / a if a and b is not None else None


def table(rows: list[dict]) -> str:
    lines = ["| phase | interactive req/s offered | achieved | requests | p99 TTFT (ms) | median TPOT (ms) | "
             "utilization | blended $/Mtok (window) | all-in $/Mtok (window) | batch lines done | batch lines/s | "
             "batch $/Mtok |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        i, w, b = r["interactive"], r["cost_window"], r.get("batch") or {}
        lines.append(
            f"| {r['phase']} | {r['offered_rate']:.3f} | {fmt(i['request_throughput'], '.3f')} | {i['completed']} "
            f"| {fmt(i['p99_ttft_ms'], '.0f')} | {fmt(i['median_tpot_ms'], '.1f')} | {w['utilization']:.1%} "
            f"| {fmt(w['usd_per_mtok'], '.4f')} | {fmt(w['all_in_usd_per_mtok'], '.4f')} "
            f"| {b.get('lines_in_phase', '-')} | {fmt(b.get('lines_per_s'), '.2f')} "
            f"| {fmt(b.get('usd_per_mtok'), '.4f')} |")
    return "\n".join(lines)


# ---- the run ----------------------------------------------------------------------------------------

def run(args: argparse.Namespace, tmp: Path) -> dict:
    out: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                 "commit": commit_line(), "cpu": cpu_line()}
    server = Server(args, tmp)
    try:
        print(f"server: {' '.join(server.cmd[2:])} (log {server.log_path})", flush=True)
        server.wait_ready()
        out["server_command"] = server.cmd[2:]

        # 1. the saturated interactive rate
        t = time.monotonic()
        sat = bench(server, args, tmp / "saturation.json", "saturation")
        sat_rate = sat["request_throughput"]
        out["saturation"] = {**interactive(sat), "concurrency": args.sat_concurrency, "num_prompts": args.sat_prompts}
        rate = args.rate_fraction * sat_rate
        print(f"saturation: {sat_rate:.3f} req/s at {args.sat_concurrency} clients "
              f"({sat['output_throughput']:.1f} output tok/s, {time.monotonic() - t:.0f} s); "
              f"phases at {rate:.3f} req/s for {args.duration:g} s", flush=True)

        rows = []
        # 2. phase A: the interactive load alone
        t = time.monotonic()
        with Sampler(server) as eng_a:
            res_a = bench(server, args, tmp / "phase-a.json", "phase A", rate=rate)
            cw_a = cost_window(server, phase_window(args, res_a))
        rows.append({"phase": "A: interactive alone", "offered_rate": rate, "interactive": interactive(res_a),
                     "cost_window": cw_a, "wall_s": time.monotonic() - t, "engine": eng_a.summary(),
                     "engine_samples": eng_a.samples})
        print(f"phase A done in {rows[-1]['wall_s']:.0f} s", flush=True)

        # 3. phase B: the same load beside a batch
        model = args.model
        upload = server.call("POST", "/v1/files", files={"file": ("batch_idle.jsonl", batch_file(args, model),
                                                                   "application/jsonl")},
                             data={"purpose": "batch"}, timeout=120)
        created = server.call("POST", "/v1/batches", json={"input_file_id": upload["id"],
                                                             "endpoint": "/v1/chat/completions",
                                                             "completion_window": "24h"})
        bid = created["id"]
        t_batch = time.monotonic()
        first = wait_batch(server, bid, lambda b: done_lines(b) >= 1, "finished line", 600)
        print(f"batch {bid}: {first['request_counts']['total']} lines, first line done after "
              f"{time.monotonic() - t_batch:.1f} s", flush=True)
        t = time.monotonic()
        start = server.call("GET", f"/v1/batches/{bid}")
        with Sampler(server) as eng_b:
            res_b = bench(server, args, tmp / "phase-b.json", "phase B", rate=rate)
            cw_b = cost_window(server, phase_window(args, res_b))
            end = server.call("GET", f"/v1/batches/{bid}")
        wall_b = time.monotonic() - t
        u_end, u_start = end["usage"], start["usage"]
        d_tokens = u_end["total_tokens"] - u_start["total_tokens"]
        batch = {"id": bid, "status_at_end": end["status"], "request_counts_start": start["request_counts"],
                 "request_counts_end": end["request_counts"], "usage_end": u_end, "usage_start": u_start,
                 "lines_in_phase": done_lines(end) - done_lines(start),
                 "failed_in_phase": end["request_counts"]["failed"] - start["request_counts"]["failed"],
                 "lines_per_s": (done_lines(end) - done_lines(start)) / wall_b,
                 "usd_per_mtok": u_end["usd"] / u_end["total_tokens"] * 1e6 if u_end["total_tokens"] else None,
                 "phase_usd_per_mtok": (u_end["usd"] - u_start["usd"]) / d_tokens * 1e6 if d_tokens else None,
                 "phase_tokens": d_tokens}
        rows.append({"phase": "B: with a batch", "offered_rate": rate, "interactive": interactive(res_b),
                     "cost_window": cw_b, "batch": batch, "wall_s": wall_b, "engine": eng_b.summary(),
                     "engine_samples": eng_b.samples})
        print(f"phase B done in {wall_b:.0f} s: {batch['lines_in_phase']} batch lines", flush=True)
        if end["status"] == "in_progress":
            server.call("POST", f"/v1/batches/{bid}/cancel")
            t = time.monotonic()
            final = wait_batch(server, bid, lambda b: b["status"] == "cancelled", "cancelled status", 600)
            batch["cancel_wait_s"] = time.monotonic() - t
            batch["final"] = {"status": final["status"], "request_counts": final["request_counts"],
                              "usage": final["usage"]}
            print(f"batch cancelled after {batch['cancel_wait_s']:.1f} s: {final['request_counts']}", flush=True)
        else:
            print(f"  note: the batch was {end['status']} at the end of phase B (raise --batch-lines)", flush=True)
        out.update(rows=rows, phase_a_bench=res_a, phase_b_bench=res_b, saturation_bench=sat)
        server.check_alive()
        return out
    finally:
        server.stop()


def report(out: dict) -> None:
    a, b = out["rows"]
    ttft = ratio(b["interactive"]["p99_ttft_ms"], a["interactive"]["p99_ttft_ms"])
    tpot = ratio(b["interactive"]["median_tpot_ms"], a["interactive"]["median_tpot_ms"])
    price = ratio(b["cost_window"]["usd_per_mtok"], a["cost_window"]["usd_per_mtok"])
    all_in = ratio(b["cost_window"]["all_in_usd_per_mtok"], a["cost_window"]["all_in_usd_per_mtok"])
    out["ratios_b_over_a"] = {"p99_ttft": ttft, "median_tpot": tpot, "blended_usd_per_mtok": price,
                              "all_in_usd_per_mtok": all_in}
    util_b = b["cost_window"]["utilization"]
    out["targets"] = {"p99_ttft_within_10pct": ttft is not None and ttft <= 1.10,
                      "median_tpot_within_10pct": tpot is not None and tpot <= 1.10,
                      "utilization_above_90pct": util_b > 0.90,
                      "blended_usd_per_mtok_falls": price is not None and price < 1.0}
    args = out["args"]
    bi = b["batch"]
    print(f"\n{args['model']}; chat workload (MT-Bench first turns), {args['output_len']} output tokens "
          f"(EOS ignored), greedy; saturation {out['saturation']['request_throughput']:.3f} req/s "
          f"({args['sat_concurrency']} clients, {args['sat_prompts']} prompts); Poisson at "
          f"{args['rate_fraction']:g} x that for {args['duration']:g} s per phase; batch of {args['batch_lines']} "
          f"lines, --batch-max-in-flight {args['batch_max_in_flight'] or 'default (8)'}; "
          f"/v1/cost window {a['cost_window']['window_s']} s / {b['cost_window']['window_s']} s at each phase's end\n"
          f"commit {out['commit']}; {out['cpu']}\n")
    print(table(out["rows"]))
    print(f"\nB/A: p99 TTFT x{fmt(ttft, '.3f')}, median TPOT x{fmt(tpot, '.3f')}, "
          f"blended $/Mtok x{fmt(price, '.3f')}, all-in $/Mtok x{fmt(all_in, '.3f')}")
    t = out["targets"]
    yes = {True: "met", False: "NOT met"}
    print(f"targets: p99 TTFT +<=10% {yes[t['p99_ttft_within_10pct']]}; median TPOT +<=10% "
          f"{yes[t['median_tpot_within_10pct']]}; utilization > 90% {yes[t['utilization_above_90pct']]} "
          f"({util_b:.1%}); blended $/Mtok falls {yes[t['blended_usd_per_mtok_falls']]}")
    print(f"batch: {bi['lines_in_phase']} lines in phase B ({bi['failed_in_phase']} failed), "
          f"{bi['lines_per_s']:.2f} lines/s; usage at phase end {json.dumps(bi['usage_end'])}; "
          f"$/Mtok over the phase's lines only {fmt(bi['phase_usd_per_mtok'], '.4f')}")
    for r in out["rows"]:
        w, e, i = r["cost_window"], r["engine"], r["interactive"]
        print(f"{r['phase']}: window busy {w['busy_seconds']:.1f} s of {w['wall_seconds']:.1f} s, {w['requests']} "
              f"requests billed, tokens {w['tokens']['input']} in / {w['tokens']['output']} out, $ {w['usd']:.6g}; "
              f"interactive median TTFT {fmt(i['median_ttft_ms'], '.0f')} ms, p99 TPOT {fmt(i['p99_tpot_ms'], '.0f')} ms, "
              f"p99 E2E {fmt(i['p99_e2el_ms'], '.0f')} ms; engine (every 2 s): running <= {fmt(e['max_running'], '.0f')}, "
              f"waiting <= {fmt(e['max_waiting'], '.0f')}, KV cache <= {fmt(e['max_kv_cache_usage'], '.0%')}, "
              f"mean step {fmt(e['median_step_ms'], '.1f')} ms median / {fmt(e['max_step_ms'], '.1f')} ms max")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default=None, help="passed to leanserve serve (default: its own)")
    p.add_argument("--batch-max-in-flight", type=int, default=None, help="passed to leanserve serve (default: its own, 8)")
    p.add_argument("--serve-args", default="", help="more `leanserve serve` options")
    p.add_argument("--duration", type=float, default=120.0, help="seconds of each phase's Poisson load (default 120)")
    p.add_argument("--rate-fraction", type=float, default=0.4, help="the phases' rate as a share of saturation (0.4)")
    p.add_argument("--batch-lines", type=int, default=2000)
    p.add_argument("--output-len", type=int, default=64, help="max_tokens of every request and line (EOS ignored)")
    p.add_argument("--sat-concurrency", type=int, default=32)
    p.add_argument("--sat-prompts", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (server log, bench results)")
    p.add_argument("--json", type=Path, default=None, help="write everything (bench results per request too) here")
    args = p.parse_args(argv)
    if args.duration < 2 or not 0 < args.rate_fraction <= 1 or args.batch_lines < 2 or args.output_len < 1:
        p.error("need --duration >= 2, 0 < --rate-fraction <= 1, --batch-lines >= 2, --output-len >= 1")
    if args.batch_max_in_flight is not None and args.batch_max_in_flight < 1:
        p.error("--batch-max-in-flight must be >= 1")

    def interrupted(signum: int, _frame) -> None:
        raise Interrupted(signum)

    # Ctrl-C or a kill stops the load and the server (the finally in run()); SIGINT is handled even
    # where the shell started this script with it ignored (a background job)
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    tmp = Path(tempfile.mkdtemp(prefix="batch-idle-bench-"))
    try:
        out = run(args, tmp)
    except Interrupted as e:
        print(f"batch_idle: interrupted by {signal.Signals(e.signum).name}; the server is stopped (files in {tmp})",
              file=sys.stderr)
        return 128 + e.signum
    report(out)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
        print(f"\nwrote {args.json}")
    if not args.keep:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
