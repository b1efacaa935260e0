"""`leanserve bench` command line: wiring, one-line errors with exit code 2, compare, reports."""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys

import pytest

from leanserve.bench import cli
from leanserve.bench.metrics import RequestRecord, compute_metrics
from leanserve.bench.report import format_compare, format_summary, render_compare_html, render_html


def run(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        return int(e.code)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("leanserve bench")
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("argv, fragment", [
    ([], "--base-url is required"),
    (["--base-url", "ftp://x"], "--base-url must look like http"),
    (["--base-url", "http://127.0.0.1:9", "--concurrency", "0"], "--concurrency"),
    (["--base-url", "http://127.0.0.1:9", "--request-rate", "fast"], "--request-rate"),
    (["--base-url", "http://127.0.0.1:9", "--hardware", "tpu-v99", "--workload", "random"], "unknown hardware 'tpu-v99'; known:"),
    (["--base-url", "http://127.0.0.1:9", "--goodput", "ttft=5", "--workload", "random"], "bad --goodput item"),
    (["--base-url", "http://127.0.0.1:9", "--data-dir", "/nonexistent/dir"], "data directory /nonexistent/dir not found"),
    (["--base-url", "http://127.0.0.1:9", "--workload", "random", "--output-len-range", "9:3"], "--output-len-range"),
    (["--base-url", "http://127.0.0.1:9", "--workload", "chat", "--input-len", "5"], "--workload random only"),
    (["--base-url", "http://127.0.0.1:9", "--workload", "random", "--sweep", "--concurrency", "4"], "--sweep chooses"),
    (["--base-url", "http://127.0.0.1:9", "--workload", "random", "--duration", "5"], "set --concurrency or --request-rate"),
    (["--base-url", "http://127.0.0.1:9", "--workload", "sharegpt"], "--dataset-path"),
    (["--bogus-flag"], "unrecognized arguments"),
])
def test_bad_input_is_one_line_and_exit_code_2(argv, fragment, capsys):
    assert run(argv) == 2
    line = one_line_error(capsys)
    assert fragment in line, line


def test_unreachable_server_is_one_line_and_exit_code_1(capsys):
    rc = run(["--base-url", f"http://127.0.0.1:{free_port()}", "--workload", "random", "--num-prompts", "1",
              "--no-progress"])
    assert rc == 1
    assert "cannot reach" in one_line_error(capsys)


def test_module_entry_point_prints_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "leanserve.bench.cli", "--base-url", "nope"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


def test_add_parser_wires_bench_and_compare_into_a_top_level_cli():
    top = argparse.ArgumentParser(prog="leanserve")
    sub = top.add_subparsers(dest="command")
    cli.add_parser(sub)
    a = top.parse_args(["bench", "--base-url", "http://127.0.0.1:8000", "--concurrency", "8"])
    assert a.func is cli.run_bench_command and a.concurrency == 8
    b = top.parse_args(["bench", "compare", "x.json", "y.json", "--html", "c.html"])
    assert b.func is cli.run_compare_command and [p.name for p in b.results] == ["x.json", "y.json"]


def test_list_hardware(capsys):
    assert run(["--list-hardware"]) == 0
    out = capsys.readouterr().out
    assert "h100-sxm" in out and "cpu-local" in out and "list price" in out.lower()


def fake_result(name: str, ttft: float, price: float | None) -> dict:
    recs = [RequestRecord(request_id=str(i), success=True, ttft_s=ttft, e2el_s=ttft + 0.9, itl_s=[0.1] * 9,
                          input_tokens=50, output_tokens=10, output_tokens_source="usage") for i in range(4)]
    m = compute_metrics(recs, 2.0, price_per_hour=price)
    return {"kind": "run", "format": "leanserve-bench/1", "server": {"model": name, "base_url": "http://x",
            "endpoint": "chat"}, "config": {"workload": "chat", "load": {"num_prompts": 4}},
            "cost_assumption": {"price_per_hour": price, "hardware": "l4" if price else None},
            "load": {"concurrency": 2, "request_rate": None}, **m, "requests": [r.to_dict() for r in recs]}


def test_compare_prints_runs_side_by_side_and_writes_html(tmp_path, capsys):
    a, b = tmp_path / "alpha.json", tmp_path / "beta.json"
    a.write_text(json.dumps(fake_result("model-a", 0.1, 0.8)))
    b.write_text(json.dumps(fake_result("model-b", 0.3, None)))
    page = tmp_path / "cmp.html"
    assert run(["compare", str(a), str(b), "--html", str(page)]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert "alpha" in header and "beta" in header
    ttft_row = next(line for line in out.splitlines() if line.startswith("median TTFT"))
    assert "100.0" in ttft_row and "300.0" in ttft_row
    html = page.read_text()
    assert 'data-chart="compare-output-throughput"' in html and "<script" not in html


def test_compare_rejects_a_file_that_is_not_a_result(tmp_path, capsys):
    p = tmp_path / "junk.json"
    p.write_text('{"hello": 1}')
    assert run(["compare", str(p)]) == 2
    assert "not a leanserve bench" in one_line_error(capsys)
    assert run(["compare", str(tmp_path / "missing.json")]) == 2
    assert "no such file" in one_line_error(capsys)


def test_summary_and_single_run_html_render_from_a_result():
    r = fake_result("m", 0.2, 0.8)
    text = format_summary(r)
    assert "Median TTFT (ms):" in text and "200.00" in text and "$ per 1M output tokens:" in text
    html = render_html(r)
    for chart in ("ttft-distribution", "tpot-distribution", "itl-distribution", "e2el-distribution"):
        assert f'data-chart="{chart}"' in html
    assert "http://" not in html.replace("http://x", "")  # nothing fetched from anywhere
    assert "no data" not in html
    assert "m" in format_compare([("a", r), ("b", fake_result("n", 0.3, None))])
    assert "<svg" in render_compare_html([("a", r)])
