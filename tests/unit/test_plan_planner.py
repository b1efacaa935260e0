"""Break-even, memory fit, capacity and the planner's choices, by hand; the CLI's one-line errors."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import pytest

from leanserve.plan import workload as wl
from leanserve.plan.apis import ApiPrice
from leanserve.plan.planner import (Configuration, Target, api_usd_per_token, break_even, build_targets, kv_capacity,
                                    predict, self_host_usd_per_day)
from leanserve.plan.roofline import DEFAULT_EFFICIENCY, Machine, ModelShape, Precision

TINY = ModelShape("tiny", 2, 64, 128, 4, 2, 16, 100, max_context=2048)


def api(inp: float, out: float, cached: float | None = None) -> ApiPrice:
    return ApiPrice("x", "p", "m", "", inp, out, cached, "test", "2026-12-01", "")


# ---- break-even --------------------------------------------------------------------------------

def test_break_even_by_hand():
    # $1/h = $24/day; one instance serves 1M tokens/day; the API costs $30 per 1M tokens
    be = break_even(1.0, 1e6, 3e-5)
    assert be["first_wins_tokens_per_day"] == pytest.approx(800_000)  # 24 / 3e-5
    # just above 1M a second instance costs $48 against the API's $30: self-hosting wins at every traffic
    # only from k = ceil(24 / (30 - 24)) = 4 instances' worth on: 4M tokens/day
    assert be["always_wins_tokens_per_day"] == pytest.approx(4e6)
    assert self_host_usd_per_day(3e6 + 1, 1e6, 1.0) == 96.0 > (3e6 + 1) * 3e-5
    assert self_host_usd_per_day(4e6 + 1, 1e6, 1.0) == 120.0 < (4e6 + 1) * 3e-5


def test_break_even_when_one_instance_is_enough_and_never():
    be = break_even(1.0, 1e6, 1e-4)  # full instance worth $100/day at API prices: k = ceil(24/76) = 1
    assert be == {"first_wins_tokens_per_day": pytest.approx(240_000), "always_wins_tokens_per_day": pytest.approx(240_000)}
    assert break_even(1.0, 1e6, 2.4e-5) == {"first_wins_tokens_per_day": None, "always_wins_tokens_per_day": None}
    assert self_host_usd_per_day(1.0, 1e6, 2.0) == 48.0  # one instance at least


def test_api_price_of_a_workload_mix():
    w = wl.Workload((300,), (100,), 1.0, 1.0, prefix_hit_rate=0.5)
    # 150 uncached input at $1/M, 150 cached at $0.1/M, 100 output at $4/M, over 400 tokens
    assert api_usd_per_token(api(1.0, 4.0, 0.1), w) == pytest.approx((150 * 1.0 + 150 * 0.1 + 100 * 4.0) / 1e6 / 400)
    # no cached price: cached tokens pay the input price
    assert api_usd_per_token(api(1.0, 4.0), w) == pytest.approx((300 * 1.0 + 100 * 4.0) / 1e6 / 400)


# ---- memory -----------------------------------------------------------------------------------

def gpu(memory_gb: float, name: str = "l4") -> Target:
    return Target(name, Machine(name, 300.0, {"bf16": 1.2e14}, memory_gb, "gpu"), 1.0, DEFAULT_EFFICIENCY["gpu"], False)


def test_a_model_that_does_not_fit_says_how_much_it_needs():
    big = ModelShape("big", 80, 8192, 28672, 64, 8, 128, 128256, tie_word_embeddings=False, max_context=8192)
    tokens, needed, reason = kv_capacity(big, Precision("bf16", "bf16"), gpu(24), Configuration())
    assert tokens == 0
    assert reason == f"needs {needed / 1e9:.1f} GB ({big.weight_bytes('bf16') / 1e9:.1f} GB of weights + one " \
                     f"4096-token request's KV cache), l4 has 24 GB"
    assert needed == pytest.approx(big.weight_bytes("bf16") + 4096 * big.kv_bytes_per_token("bf16"))
    assert "needs 142.4 GB (141.1 GB of weights" in reason  # 80 layers x 2 x 8 heads x 128 x 2 B x 4096 = 1.34 GB


def test_kv_capacity_on_a_gpu_and_a_cpu():
    p = Precision("bf16", "bf16")
    per_token = TINY.kv_bytes_per_token("bf16")  # 2 layers x 2 x 2 heads x 16 x 2 bytes = 256
    assert per_token == 256
    tokens, _, reason = kv_capacity(TINY, p, gpu(24), Configuration())
    assert reason == ""
    # 80% of what is left of 90% of 24 GB after the weights
    assert tokens == int((24e9 * 0.9 - TINY.weight_bytes("bf16")) * 0.8 // per_token)
    cpu = Target("c", Machine("c", 20.0, {"fp32": 1e11}, 4, "cpu"), 0.1, DEFAULT_EFFICIENCY["cpu"], False)
    assert kv_capacity(TINY, p, cpu, Configuration())[0] == (1 << 30) // per_token  # the engine's 1 GiB
    assert kv_capacity(TINY, p, cpu, Configuration(kv_cache_bytes=1 << 20))[0] == (1 << 20) // per_token


# ---- predictions -------------------------------------------------------------------------------

def test_prediction_sizes_instances_and_prices_tokens():
    w = wl.Workload((200,), (50,), rate=2.0, mean_rate=1.0)
    targets = wl.Targets(ttft_ms=5000, tpot_ms=500)
    slow = Target("slow", Machine("slow", 0.5, {"bf16": 5e9}, 8, "cpu"), 0.5, DEFAULT_EFFICIENCY["cpu"], False)
    p = predict(TINY, slow, Configuration(), w, targets, num_requests=60)
    assert p.fits and p.max_rate > 0
    assert p.instances == math.ceil(2.0 / p.max_rate - 1e-9)
    assert p.monthly_usd == pytest.approx(p.instances * 0.5 * 730)
    # tokens come at the mean rate: 1 req/s x 250 tokens
    assert p.cost_per_mtok == pytest.approx(p.instances * 0.5 / (250 * 3600) * 1e6)
    assert p.cost_per_mtok_full == pytest.approx(0.5 / (p.max_rate * 250 * 3600) * 1e6)
    # a faster machine at the same price serves more within the targets
    fast = Target("fast", Machine("fast", 50.0, {"bf16": 5e11}, 8, "cpu"), 0.5, DEFAULT_EFFICIENCY["cpu"], False)
    assert predict(TINY, fast, Configuration(), w, targets, num_requests=60).max_rate > p.max_rate


def test_targets_nothing_can_meet():
    w = wl.Workload((200,), (50,), 1.0, 1.0)
    p = predict(TINY, gpu(24), Configuration(), w, wl.Targets(ttft_ms=0.001, tpot_ms=0.001), num_requests=20)
    assert p.max_rate == 0 and p.monthly_usd is None and "cannot meet" in p.reason


def test_build_targets_uses_a_calibration_only_where_it_was_measured():
    cal = {"version": 1, "machines": {"cpu-local": {"cpu": "Test CPU", "peaks": {"bandwidth_gbps": 30.0,
            "peak_flops": {"fp32": 2e11, "bf16": 4e11}}, "models": {"m|x": {
                "model": "tiny", "date": "2026-12-07T00:00:00+00:00",
                "precision": {"weights": "bf16", "kv_cache": "bf16", "small_batch": [[4, 1000], [8, 2000]]},
                "efficiency": {"mem": 0.8, "flops": 0.4, "kv_mem": 0.3, "attn_flops": 0.2,
                               "step_overhead_s": 0.001, "seq_overhead_s": 1e-5}}}}}}
    local, l4 = build_targets(["cpu-local", "l4"], cal, "tiny")
    assert local.calibrated and local.machine.bandwidth_gbps == 30.0 and local.efficiency.mem == 0.8
    assert local.precision == Precision("bf16", "bf16", ((4, 1000.0), (8, 2000.0)))
    assert "calibrated 2026-12-07 on Test CPU" in local.efficiency.source
    assert not l4.calibrated and l4.efficiency.source.startswith("default gpu") and l4.machine.bandwidth_gbps == 300
    other = build_targets(["cpu-local"], cal, "another-model")[0]
    assert other.calibrated and other.precision is None and "with tiny (not this model)" in other.efficiency.source
    with pytest.raises(ValueError, match="unknown hardware 'nope'; known: "):
        build_targets(["nope"], {}, "tiny")


# ---- workloads ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [("512", (512,)), ("1,2,3", (1, 2, 3)), ("10:13", (10, 11, 12, 13))])
def test_parse_lengths(text, expected):
    assert wl.parse_lengths(text, "input-tokens") == expected


@pytest.mark.parametrize("text", ["", "0", "5:2", "a", "1,-3", "1:x"])
def test_parse_lengths_errors(text):
    with pytest.raises(ValueError, match=r"--input-tokens must be N, LOW:HIGH or N1,N2,\.\.\."):
        wl.parse_lengths(text, "input-tokens")


def test_parse_window():
    assert wl.parse_window("7d") == 7 * 86400 and wl.parse_window("90m") == 5400 and wl.parse_window("60") == 60
    for bad in ("", "d", "-1h", "nanh", "inf"):
        with pytest.raises(ValueError, match="--window must look like"):
            wl.parse_window(bad)


def test_bench_file(tmp_path: Path):
    f = tmp_path / "b.json"
    f.write_text(json.dumps({"runs": [{"request_throughput": 2.5, "requests": [
        {"success": True, "input_tokens": 100, "output_tokens": 20, "cached_tokens": 50},
        {"success": False, "input_tokens": 999, "output_tokens": 0},
        {"success": True, "input_tokens": 300, "output_tokens": 40, "cached_tokens": 0}]}]}))
    w = wl.from_bench(f)
    assert (w.input_tokens, w.output_tokens, w.rate, w.prefix_hit_rate) == ((100, 300), (20, 40), 2.5, 50 / 400)
    assert wl.from_bench(f, rate=7.0).rate == 7.0
    one_run = tmp_path / "one.json"  # a single run's file is the run itself
    one_run.write_text(json.dumps({"request_throughput": 1.5, "requests": [
        {"success": True, "input_tokens": 10, "output_tokens": 5}]}))
    assert (wl.from_bench(one_run).input_tokens, wl.from_bench(one_run).rate) == ((10,), 1.5)


@pytest.mark.parametrize("content,message", [
    (None, "cannot read the workload file .*: not found"),
    ("{not json", "cannot read the workload file"),
    ('{"runs": []}', "is not a leanserve bench result"),
    ('{"runs": [{"requests": [{"success": false}]}]}', "holds no successful request"),
])
def test_unreadable_bench_files(tmp_path: Path, content, message):
    f = tmp_path / "b.json"
    if content is not None:
        f.write_text(content)
    with pytest.raises(ValueError, match=message):
        wl.from_bench(f)


def make_ledger(path: Path, rows: list[tuple]) -> None:
    from leanserve.cost.ledger import connect

    con = connect(path)
    con.executemany("INSERT INTO requests (id, ts, model, prompt_tokens, cached_tokens, output_tokens, machine_seconds, "
                    "prefill_seconds, cost_usd, price_per_hour, hardware, finish_reason, cache) "
                    "VALUES (?, ?, ?, ?, ?, ?, 0, 0, 0, 1, 'x', ?, ?)", rows)
    con.commit()
    con.close()


def test_ledger_window(tmp_path: Path):
    now = 1_000_000.0
    path = tmp_path / "ledger.sqlite"
    rows = [(f"r{i}", now - 3600 * 10 + i, "m", 100, 20, 10, "stop", None) for i in range(30)]  # 30 in one hour
    rows += [(f"s{i}", now - 3600 * 2 + i * 100, "m", 200, 0, 30, "length", None) for i in range(6)]
    rows += [("hit", now - 60, "m", 100, 0, 10, "stop", "hit"), ("err", now - 60, "m", 100, 0, 10, "error", None),
             ("old", now - 86400 * 30, "m", 100, 0, 10, "stop", None), ("other", now - 60, "n", 100, 0, 10, "stop", None)]
    make_ledger(path, rows)
    w = wl.from_ledger(path, 86400.0, model="m", now=now)
    assert len(w.input_tokens) == 36  # cache hits, errors, other models and old rows left out
    assert w.rate == pytest.approx(30 / 3600)  # the busiest hour
    assert w.mean_rate == pytest.approx(36 / 86400)
    assert w.prefix_hit_rate == pytest.approx(600 / (30 * 100 + 6 * 200))
    with pytest.raises(ValueError, match="has no completed requests in the last 1 h for model 'm'"):
        wl.from_ledger(path, 3600.0, model="m", now=now + 86400 * 5)
    with pytest.raises(ValueError, match="no ledger at"):
        wl.from_ledger(tmp_path / "none.sqlite", 3600.0)
    bad = tmp_path / "bad.sqlite"
    bad.write_text("not a database")
    with pytest.raises(ValueError, match="cannot read the ledger"):
        wl.from_ledger(bad, 3600.0)


# ---- the CLI's one-line errors ------------------------------------------------------------------

LLAMA_70B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 8192, "intermediate_size": 28672,
             "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
             "max_position_embeddings": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
TINY_CFG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "max_position_embeddings": 2048,
            "tie_word_embeddings": True}


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    from leanserve.cli import main

    rc = main(["plan", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_unknown_hardware(tmp_path: Path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(TINY_CFG))
    rc, _, err = run_cli(["--model", str(tmp_path), "--hardware", "l5"], capsys)
    assert rc == 2 and err.startswith("leanserve: error: unknown hardware 'l5'; known: ") and err.count("\n") == 1


def test_cli_model_that_does_not_fit(tmp_path: Path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_70B))
    rc, _, err = run_cli(["--model", str(tmp_path / "config.json"), "--hardware", "l4"], capsys)
    assert rc == 2 and err.count("\n") == 1
    assert "does not fit: needs 142.4 GB (141.1 GB of weights + one 4096-token request's KV cache), l4 has 24 GB" in err


@pytest.mark.parametrize("args,message", [
    (["--bench-json", "MISSING"], "cannot read the workload file"),
    (["--ledger", "MISSING"], "no ledger at"),
    (["--input-tokens", "x"], "--input-tokens must be"),
    (["--api", "nope/model"], "unknown API"),
    (["--api-price", "bad"], ""),
    (["--weights", "int3"], "unknown weight format 'int3'"),
    (["--price-per-hour", "1", "--hardware", "l4,h100-sxm"], "--price-per-hour needs exactly one --hardware"),
    (["--input-tokens", "2000", "--output-tokens", "100"], "the workload's longest request (2,100 tokens) exceeds"),
    (["--kv-cache-memory", "1KiB"], "its KV cache holds 4 tokens, fewer than the workload's longest request (640)"),
])
def test_cli_bad_inputs_are_one_line(tmp_path: Path, capsys, args, message):
    (tmp_path / "config.json").write_text(json.dumps(TINY_CFG))
    args = [a.replace("MISSING", str(tmp_path / "missing.json")) for a in args]
    rc, _, err = run_cli(["--model", str(tmp_path), "--hardware", "l4", "--requests", "20", *args], capsys)
    assert rc == 2 and err.startswith("leanserve: error: ") and err.count("\n") == 1 and message in err


def test_cli_unreadable_model_description(tmp_path: Path, capsys):
    (tmp_path / "config.json").write_text("{oops")
    rc, _, err = run_cli(["--model", str(tmp_path), "--hardware", "l4"], capsys)
    assert rc == 2 and "cannot read" in err and err.count("\n") == 1
    rc, _, err = run_cli(["--model", str(tmp_path / "nothing-here"), "--hardware", "l4"], capsys)
    assert rc == 2 and "unknown model" in err


def test_cli_plan_table_and_json(tmp_path: Path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(TINY_CFG))
    out_json = tmp_path / "plan.json"
    rc, out, err = run_cli(["--model", str(tmp_path), "--hardware", "l4,aws-c7i.large", "--rate", "2",
                            "--requests", "30", "--api", "none", "--api-price", "mine=0.1,0.4",
                            "--calibration", str(tmp_path / "none.json"), "--json", str(out_json)], capsys)
    assert rc == 0, err
    plan = json.loads(out_json.read_text())
    assert {p["hardware"] for p in plan["predictions"]} == {"l4", "aws-c7i.large"}
    assert plan["best"]["monthly_usd"] == min(p["monthly_usd"] for p in plan["predictions"] if p["monthly_usd"])
    assert [a["api"] for a in plan["apis"]] == ["mine"]
    assert "cheapest that meets the targets" in out and "mine" in out and "default" in out
