"""The response cache on against off, through the HTTP server, on a repeat-heavy workload, side by side.

Starts ``leanserve serve MODEL --response-cache`` (a fresh cache and ledger in a temporary folder)
and the same server without ``--response-cache``, one after the other (never at once, so they do not
share the CPU), and sends each the same requests: R chat requests (default 200) from C concurrent
streaming clients (default 4), temperature 0, ``max_tokens`` 64, ``stream_options.include_usage``.

The prompts are the first turns of leanserve/data/bench/specbench_questions.jsonl in file order (the
first 80 are the MT-Bench questions of the ``chat`` workload, then Spec-Bench's translation and QA
items). A fraction of the requests (default 0.30, exactly ``round(R * fraction)``) repeat the prompt
of an earlier request of the run, drawn with a seeded RNG; a repeat is sent only after its original
has finished (its response body read to the end), so with the cache on it should hit. Both servers get
the same sequence. ``--close-at-done`` closes each stream at ``data: [DONE]`` instead, the body's end
unread, as some clients do.

For each server it prints: hit rate (from the ``x-leanserve-cache`` response headers and from
``GET /v1/cost``'s ``cache_hits``; the two must agree), the effective $ per million tokens (the
server's metered $ over all tokens served, hits' tokens included), $ per request, ``saved.usd``,
median and p90 time to the first content chunk of hits and of misses, median end-to-end latency, and
the ratio of the cached server's $/Mtok to the uncached one's. One warm-up request (a prompt outside
the workload) goes to each server first; every /v1/cost figure is the difference of ``since_start``
before and after the workload, so the warm-up is left out. The price is the server's default
(a labelled placeholder): ratios carry over to any price, dollar amounts do not.

    .venv/bin/python benchmarks/response_cache.py                    # 200 requests, both servers
    .venv/bin/python benchmarks/response_cache.py --requests 100     # about 14 minutes on a busy 2-core box
    .venv/bin/python benchmarks/response_cache.py --requests 12 --max-tokens 8   # a quick check, about 1 minute
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
PROMPTS_FILE = ROOT / "leanserve" / "data" / "bench" / "specbench_questions.jsonl"
WARMUP_PROMPT = "Name three colors."


# ---- the workload -----------------------------------------------------------------------------------

def load_prompts() -> list[str]:
    sys.path.insert(0, str(ROOT))
    from leanserve.bench.workloads import load_grounded

    return [text for _, text in load_grounded("spec-bench", None)]


def schedule(requests: int, repeat_fraction: float, seed: int, prompts: list[str]) -> list[tuple[int, int | None]]:
    """[(prompt index, index of the request it repeats or None)] for each request, in send order.
    Exactly round(requests * repeat_fraction) repeats, at seeded positions (never the first), each
    repeating a seeded choice among the earlier original requests."""
    rng = random.Random(seed)
    n_rep = round(requests * repeat_fraction)
    n_new = requests - n_rep
    if n_new > len(prompts):
        raise SystemExit(f"{n_new} distinct prompts needed, {len(prompts)} available: lower --requests "
                         f"or raise --repeat-fraction")
    if requests > 0 and n_new < 1:
        raise SystemExit("--repeat-fraction leaves no original request to repeat")
    rep_positions = set(rng.sample(range(1, requests), n_rep)) if n_rep else set()
    out: list[tuple[int, int | None]] = []
    originals: list[int] = []  # request indices of originals so far
    next_prompt = 0
    for i in range(requests):
        if i in rep_positions:
            orig = rng.choice(originals)
            out.append((out[orig][0], orig))
        else:
            out.append((next_prompt, None))
            originals.append(i)
            next_prompt += 1
    return out


# ---- the client -------------------------------------------------------------------------------------

async def one_request(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int,
                      close_at_done: bool = False) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft = None
    usage = None
    text = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:500]!r}")
        header = r.headers.get("x-leanserve-cache")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                if close_at_done:
                    break  # drop the connection with the body's end unread, as some clients do
                continue  # read the body to its end, as the openai client does on HTTP/1.1
            chunk = json.loads(data)
            for choice in chunk.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    text.append(content)
            if chunk.get("usage"):
                usage = chunk["usage"]
    e2e = time.perf_counter() - t0
    return {"header": header, "ttft_s": ttft, "e2e_s": e2e, "usage": usage, "text": "".join(text)}


async def drive(base: str, model: str, prompts: list[str], plan: list[tuple[int, int | None]],
                concurrency: int, max_tokens: int, close_at_done: bool = False) -> list[dict]:
    done = [asyncio.Event() for _ in plan]
    results: list[dict | None] = [None] * len(plan)
    queue = iter(range(len(plan)))

    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(600.0),
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        async def worker() -> None:
            for i in queue:  # one shared iterator: requests leave in plan order
                prompt_idx, orig = plan[i]
                if orig is not None:
                    await done[orig].wait()  # a repeat goes out only after its original has finished
                try:
                    res = await one_request(client, model, prompts[prompt_idx], max_tokens, close_at_done)
                finally:
                    done[i].set()
                res.update(index=i, prompt=prompt_idx, repeat_of=orig)
                results[i] = res

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return [r for r in results if r is not None]


# ---- the server -------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, cache: bool, tmp: Path, label: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [PY, "-m", "leanserve", "serve", model, "--port", str(port), "--log-level", "warning",
           "--ledger", str(tmp / f"{label}-ledger.sqlite"), *extra]
    if cache:
        cmd += ["--response-cache", "--cache-path", str(tmp / f"{label}-cache.sqlite")]
    log = open(tmp / f"{label}.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the {label} server exited with {proc.returncode}:\n"
                             f"{(tmp / f'{label}.log').read_text()[-3000:]}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"the {label} server did not start within 600 s")
        time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def get_cost(base: str) -> dict:
    return httpx.get(base + "/v1/cost", timeout=30).json()


def pct(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) by linear interpolation, or None for no values."""
    if not values:
        return None
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def run_one(args: argparse.Namespace, cache: bool, prompts: list[str], plan: list, tmp: Path) -> dict:
    label = "cache" if cache else "no-cache"
    proc, base = start_server(args.model, cache, tmp, label, args.serve_args.split())
    try:
        asyncio.run(drive(base, args.model, [WARMUP_PROMPT], [(0, None)], 1, args.max_tokens))  # warm-up
        before = get_cost(base)
        t0 = time.perf_counter()
        results = asyncio.run(drive(base, args.model, prompts, plan, args.concurrency, args.max_tokens,
                                    args.close_at_done))
        wall = time.perf_counter() - t0
        after = get_cost(base)
    finally:
        stop_server(proc)
    return summarize(label, results, before, after, wall)


def summarize(label: str, results: list[dict], before: dict, after: dict, wall: float) -> dict:
    b, a = before["since_start"], after["since_start"]
    n = len(results)
    hits = [r for r in results if r["header"] == "hit"]
    misses = [r for r in results if r["header"] != "hit"]
    d_requests = a["requests"] - b["requests"]
    d_hits = a.get("cache_hits", 0) - b.get("cache_hits", 0)
    d_usd = a["usd"] - b["usd"]
    d_tokens = {k: a["tokens"][k] - b["tokens"][k] for k in a["tokens"]}
    d_saved = {k: a["saved"][k] - b["saved"][k] for k in a["saved"]}
    usage_cost = sum(r["usage"]["cost"] for r in results if r["usage"])
    usage_saved = sum(r["usage"]["cost_details"].get("saved_usd", 0.0) for r in results if r["usage"])
    usage_tokens = sum(r["usage"]["total_tokens"] for r in results if r["usage"])
    usage_hits = sum(1 for r in results if r["usage"] and r["usage"].get("cost_details", {}).get("cache") == "hit")
    # the server's own $/Mtok since start against usd / tokens since start (a consistency check)
    server_rate = a["usd_per_million_tokens"]["total"]
    own_rate = a["usd"] / a["tokens"]["total"] * 1e6 if a["tokens"]["total"] else None
    checks = []
    if d_requests != n:
        checks.append(f"/v1/cost counted {d_requests} requests, the client sent {n}")
    if d_hits != len(hits):
        checks.append(f"/v1/cost cache_hits {d_hits} != {len(hits)} hit headers")
    if usage_hits != len(hits):
        checks.append(f"usage.cost_details.cache == 'hit' in {usage_hits} responses, hit header in {len(hits)}")
    if any(r["usage"] is None for r in results):
        checks.append(f"{sum(r['usage'] is None for r in results)} responses carried no usage chunk")
    if abs(usage_cost - d_usd) > 1e-9 + 1e-6 * abs(d_usd):
        checks.append(f"sum of usage.cost {usage_cost:.9f} != /v1/cost usd {d_usd:.9f}")
    if abs(usage_saved - d_saved["usd"]) > 1e-9 + 1e-6 * abs(d_saved["usd"]):
        checks.append(f"sum of usage saved_usd {usage_saved:.9f} != /v1/cost saved.usd {d_saved['usd']:.9f}")
    if usage_tokens != d_tokens["total"]:
        checks.append(f"sum of usage total_tokens {usage_tokens} != /v1/cost tokens.total {d_tokens['total']}")
    if own_rate is not None and abs(server_rate - own_rate) > 1e-6 * own_rate:
        checks.append(f"since_start usd_per_million_tokens.total {server_rate} != usd / tokens.total {own_rate}")
    hit_costs = [r["usage"]["cost"] for r in hits if r["usage"]]
    if any(c != 0 for c in hit_costs):
        checks.append(f"{sum(c != 0 for c in hit_costs)} hits with usage.cost != 0")
    # a hit must return what its original computed
    by_index = {r["index"]: r for r in results}
    wrong = [r["index"] for r in hits if r["repeat_of"] is not None and r["text"] != by_index[r["repeat_of"]]["text"]]
    if wrong:
        checks.append(f"{len(wrong)} hits whose text differs from their original's (requests {wrong[:5]})")
    if label == "cache":
        missed = [r["index"] for r in misses if r["repeat_of"] is not None]
        if missed:
            checks.append(f"{len(missed)} repeats answered as misses though their original had finished "
                          f"(requests {missed[:5]})")
    odd_hits = [r["index"] for r in hits if r["repeat_of"] is None]
    if odd_hits:
        checks.append(f"{len(odd_hits)} first-time prompts answered as hits (requests {odd_hits[:5]})")
    return {
        "server": label,
        "requests": n,
        "hits_header": len(hits),
        "hits_cost": d_hits,
        "hit_rate": len(hits) / n if n else 0.0,
        "usd": d_usd,
        "tokens": d_tokens,
        "usd_per_mtok": d_usd / d_tokens["total"] * 1e6 if d_tokens["total"] else None,
        "usd_per_request": d_usd / n if n else None,
        "saved": d_saved,
        "ttft_hit_ms": [pct([r["ttft_s"] * 1e3 for r in hits if r["ttft_s"] is not None], q) for q in (0.5, 0.9)],
        "ttft_miss_ms": [pct([r["ttft_s"] * 1e3 for r in misses if r["ttft_s"] is not None], q) for q in (0.5, 0.9)],
        "e2e_median_ms": pct([r["e2e_s"] * 1e3 for r in results], 0.5),
        "e2e_hit_median_ms": pct([r["e2e_s"] * 1e3 for r in hits], 0.5),
        "e2e_miss_median_ms": pct([r["e2e_s"] * 1e3 for r in misses], 0.5),
        "wall_s": wall,
        "response_cache_stats": after.get("response_cache"),
        "checks": checks,
        "per_request": [{k: r[k] for k in ("index", "prompt", "repeat_of", "header", "ttft_s", "e2e_s")}
                        | {"cost": (r["usage"] or {}).get("cost"), "tokens": (r["usage"] or {}).get("total_tokens")}
                        for r in results],
    }


# ---- the machine and the commit ---------------------------------------------------------------------

def cpu_line() -> str:
    name = "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        m = re.search(r"^Model name:\s*(.+)$", out, re.M)
        if m:
            name = m.group(1).strip()
    except OSError:
        pass
    flags: set[str] = set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    avx512 = "avx512: yes" if any(f.startswith("avx512") for f in flags) else "avx512: no"
    if "avx512_bf16" in flags:
        avx512 += " (bf16)"
    amx = "amx: yes" if any(f.startswith("amx") for f in flags) else "amx: no"
    return f"{name}, {os.cpu_count()} logical CPUs; {avx512}, {amx}"


def commit_line() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "leanserve/"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        return head + (" dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---- the report -------------------------------------------------------------------------------------

def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["server"] == "no-cache"), None)
    lines = ["| server | hit rate (headers / /v1/cost) | $/Mtok | x no-cache | $/request | saved $ | "
             "TTFT hit p50 / p90 ms | TTFT miss p50 / p90 ms | E2E p50 ms | wall s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        n = r["requests"]
        ratio = (r["usd_per_mtok"] / base["usd_per_mtok"]) if base and base["usd_per_mtok"] and r["usd_per_mtok"] else None
        lines.append(
            f"| {r['server']} | {r['hits_header'] / n:.1%} / {r['hits_cost'] / n:.1%} "
            f"| {fmt(r['usd_per_mtok'], '.4f')} | {fmt(ratio, '.3f')} | {fmt(r['usd_per_request'], '.3g')} "
            f"| {r['saved']['usd']:.3g} "
            f"| {fmt(r['ttft_hit_ms'][0], '.1f')} / {fmt(r['ttft_hit_ms'][1], '.1f')} "
            f"| {fmt(r['ttft_miss_ms'][0], '.0f')} / {fmt(r['ttft_miss_ms'][1], '.0f')} "
            f"| {fmt(r['e2e_median_ms'], '.0f')} | {r['wall_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--repeat-fraction", type=float, default=0.30)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--servers", default="cache,no-cache", help="which servers to run, in order (default both)")
    p.add_argument("--serve-args", default="", help="more `leanserve serve` options for both servers")
    p.add_argument("--close-at-done", action="store_true",
                   help="close each stream as soon as 'data: [DONE]' arrives, the rest of the body unread "
                        "(default: read it to its end)")
    p.add_argument("--json", type=Path, default=None, help="write the results (per request too) here")
    args = p.parse_args(argv)
    if args.requests < 2 or args.concurrency < 1 or args.max_tokens < 1 or not 0 <= args.repeat_fraction < 1:
        p.error("need --requests >= 2, --concurrency >= 1, --max-tokens >= 1, 0 <= --repeat-fraction < 1")
    servers = args.servers.split(",")
    if not set(servers) <= {"cache", "no-cache"}:
        p.error("--servers takes cache and/or no-cache")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed run still stops its server
    prompts = load_prompts()
    plan = schedule(args.requests, args.repeat_fraction, args.seed, prompts)
    n_rep = sum(o is not None for _, o in plan)
    commit, cpu = commit_line(), cpu_line()
    print(f"workload: {args.requests} chat requests, {n_rep} of them repeats of an earlier prompt "
          f"({len(plan) - n_rep} distinct prompts), {args.concurrency} streaming clients, temperature 0, "
          f"max_tokens {args.max_tokens}; model {args.model}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="response-cache-bench-"))
    rows = []
    for s in servers:
        r = run_one(args, s == "cache", prompts, plan, tmp)
        rows.append(r)
        print(f"{s:8s} done in {r['wall_s']:.1f} s: {r['hits_header']} hits; "
              f"{'checks ok' if not r['checks'] else 'CHECKS FAILED: ' + '; '.join(r['checks'])}", flush=True)

    print(f"\n{args.model}; {args.requests} requests ({n_rep} repeats), {args.concurrency} clients, greedy, "
          f"max_tokens {args.max_tokens}, streamed; commit {commit}; {cpu}\n")
    print(table(rows))
    for r in rows:
        print(f"\n{r['server']}: $ {r['usd']:.6g} for {r['tokens']['total']} tokens ({r['tokens']['input']} in, "
              f"{r['tokens']['output']} out); saved {json.dumps({k: round(v, 9) for k, v in r['saved'].items()})}; "
              f"E2E p50 hits {fmt(r['e2e_hit_median_ms'], '.1f')} ms, misses {fmt(r['e2e_miss_median_ms'], '.0f')} ms")
        if r["server"] == "cache" and r["response_cache_stats"]:
            print(f"  /v1/cost response_cache: {json.dumps(r['response_cache_stats'])}")
        for c in r["checks"]:
            print(f"  CHECK FAILED: {c}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                         "commit": commit, "cpu": cpu, "results": rows}, indent=1))
    return 1 if any(r["checks"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
