"""`leanserve bench` against a real leanserve server on the real model, through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT

NUM_PROMPTS, OUTPUT_LEN = 6, 8


def test_bench_measures_a_real_leanserve_server(server, tmp_path):
    # the chat workload's questions come from the package's own copy (no --data-dir)
    out = tmp_path / "run.json"
    cmd = [sys.executable, "-m", "leanserve", "bench", "--base-url", server.base_url, "--workload", "chat",
           "--num-prompts", str(NUM_PROMPTS), "--output-len", str(OUTPUT_LEN),
           "--ignore-eos", "--concurrency", "3", "--price-per-hour", "0.36", "--json", str(out), "--no-progress"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    m = result.get("metrics", result)
    assert m["completed"] == NUM_PROMPTS and m["failed"] == 0
    # tokens are counted from the server's usage: exactly the fixed output length each
    assert m["total_output_tokens"] == NUM_PROMPTS * OUTPUT_LEN
    assert m["total_input_tokens"] > NUM_PROMPTS * 20
    assert 0 < m["median_ttft_ms"] <= m["median_e2el_ms"]
    assert m["output_throughput"] > 0
    # $/Mtok = $/h / (tok/s * 3600) * 1e6
    expected = 0.36 / (m["output_throughput"] * 3600) * 1e6
    assert abs(m["cost_per_million_output_tokens"] - expected) / expected < 1e-6
