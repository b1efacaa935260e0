"""Write a cost ledger holding a week of generated chat traffic, for `leanserve plan --ledger`'s worked
example (docs/plan.md) on a machine that has not served for a week.

The traffic has a week's shape: a daily cycle (quiet at night, busiest in the afternoon, weekends
at half the weekday level), Poisson arrivals within each minute, prompts of 150-1,500 tokens with
a shared system prompt (40% of prompt tokens found in the prefix cache) and 40-400 output tokens.
Rows are marked hardware='generated' with zero cost: only their times and lengths are real data
for the planner. A server's own ledger is read the same way.

    .venv/bin/python benchmarks/week_ledger.py /tmp/week.sqlite --peak-rate 2
    .venv/bin/python -m leanserve plan --model smollm2-135m --ledger /tmp/week.sqlite --window 7d
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rate_at(t: float, start: float, peak: float) -> float:
    """Requests/s at unix time t: a daily cycle peaking at 15:00, weekends (days 5 and 6) at half."""
    day = int((t - start) // 86400)
    hour = ((t - start) % 86400) / 3600
    level = 0.1 + 0.9 * math.sin(math.pi * max(0.0, min(1.0, (hour - 6) / 18))) ** 2
    return peak * level * (0.5 if day % 7 in (5, 6) else 1.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", type=Path)
    p.add_argument("--peak-rate", type=float, default=2.0, help="requests/s at the busiest time (default 2)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--days", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from leanserve.cost.ledger import connect

    if args.path.exists():
        raise SystemExit(f"{args.path} exists: give a new path")
    rng = random.Random(args.seed)
    end = time.time()
    start = end - args.days * 86400
    rows = []
    for minute in range(args.days * 1440):
        t0 = start + 60 * minute
        n = _poisson(rng, rate_at(t0 + 30, start, args.peak_rate) * 60)
        for _ in range(n):
            ts = t0 + rng.random() * 60
            prompt = int(min(1500, max(150, rng.lognormvariate(math.log(450), 0.6))))
            output = int(min(400, max(40, rng.lognormvariate(math.log(150), 0.5))))
            cached = int(prompt * 0.4) // 16 * 16
            rows.append((f"gen-{len(rows)}", ts, args.model, prompt, cached, output, "stop"))
    con = connect(args.path)
    con.executemany("INSERT INTO requests (id, ts, model, prompt_tokens, cached_tokens, output_tokens, machine_seconds, "
                    "prefill_seconds, cost_usd, price_per_hour, hardware, finish_reason) "
                    "VALUES (?, ?, ?, ?, ?, ?, 0, 0, 0, 0, 'generated', ?)", rows)
    con.commit()
    con.close()
    print(f"{len(rows):,} requests over {args.days} days written to {args.path}")
    return 0


def _poisson(rng: random.Random, mean: float) -> int:
    n, p, limit = 0, 1.0, math.exp(-mean)
    while True:
        p *= rng.random()
        if p < limit:
            return n
        n += 1


if __name__ == "__main__":
    sys.exit(main())
