"""The Files and Batches API through the official openai client on the real server: upload, create,
poll to completion, download every custom_id once; a malformed line in the error file while the rest
succeed; cancel mid-way; kill -9 during a batch, restart, and every line exactly once."""

from __future__ import annotations

import json
import sqlite3
import time

import openai
import pytest

from tests.e2e.conftest import start_server

pytestmark = pytest.mark.e2e

FINAL = ("completed", "failed", "cancelled", "expired")


@pytest.fixture(scope="module")
def server_args() -> list[str]:
    return ["--dtype", "float32"]  # greedy answers that do not depend on what shares the batch


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60)


def line(i: int, max_tokens: int = 8, **body) -> str:
    return json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions",
                       "body": {"model": "smollm2-135m", "prompt": f"Count from {i}:", "max_tokens": max_tokens,
                                "temperature": 0, **body}})


def submit(c: openai.OpenAI, lines: list[str], **kw):
    f = c.files.create(file=("in.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch")
    return c.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h", **kw)


def wait(c: openai.OpenAI, batch_id: str, until=lambda b: b.status in FINAL, timeout: float = 180.0):
    deadline = time.monotonic() + timeout
    while True:
        b = c.batches.retrieve(batch_id)
        if until(b):
            return b
        assert time.monotonic() < deadline, f"batch still {b.status}: {b.request_counts}"
        time.sleep(0.2)


def records(c: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(x) for x in c.files.content(file_id).text.splitlines() if x.strip()]


def test_a_batch_runs_to_completion_with_a_malformed_line_in_the_error_file(server):
    c = client(server)
    lines = [line(i) for i in range(6)] + ["{not json", line(7, max_tokens=-3)]
    b = submit(c, lines, metadata={"job": "nightly"})
    assert b.status in ("validating", "in_progress") and b.metadata == {"job": "nightly"}
    assert b.request_counts.total == 8
    b = wait(c, b.id)
    assert b.status == "completed" and (b.request_counts.completed, b.request_counts.failed) == (6, 2)
    out = records(c, b.output_file_id)
    assert sorted(r["custom_id"] for r in out) == [f"req-{i}" for i in range(6)]
    for r in out:
        assert r["error"] is None and r["response"]["status_code"] == 200
        body = r["response"]["body"]
        assert body["object"] == "text_completion" and body["usage"]["cost"] > 0
        assert r["response"]["request_id"] == body["id"]
    errors = records(c, b.error_file_id)
    assert [e["custom_id"] for e in errors] == [None, "req-7"]
    assert errors[0]["response"] is None and errors[0]["error"]["code"] == "invalid_request"
    assert errors[1]["response"]["status_code"] == 400 and "max_tokens" in errors[1]["error"]["message"]
    # the same answer as an interactive request (greedy, float32)
    r = c.completions.create(model="smollm2-135m", prompt="Count from 0:", max_tokens=8, temperature=0)
    assert next(x for x in out if x["custom_id"] == "req-0")["response"]["body"]["choices"][0]["text"] == r.choices[0].text
    assert b.id in [x.id for x in c.batches.list()]


def test_cancel_mid_way(server):
    c = client(server)
    b = submit(c, [line(i, max_tokens=32) for i in range(24)])
    b = wait(c, b.id, lambda b: b.request_counts.completed >= 1 or b.status in FINAL)
    c.batches.cancel(b.id)
    b = wait(c, b.id)
    assert b.status == "cancelled" and b.cancelled_at is not None and b.request_counts.total == 24
    done = records(c, b.output_file_id)
    assert 1 <= len(done) < 24 and len({r["custom_id"] for r in done}) == len(done)
    with pytest.raises(openai.ConflictError):
        c.batches.cancel(b.id)


def test_kill_9_during_a_batch_then_restart_completes_every_line_once(tmp_path):
    args = ("--batch-dir", str(tmp_path / "batches"), "--ledger", str(tmp_path / "ledger.sqlite"))
    first = start_server(tmp_path, *args)
    try:
        c = client(first)
        b = submit(c, [line(i, max_tokens=16) for i in range(16)])
        wait(c, b.id, lambda b: b.request_counts.completed >= 3)
        first.proc.kill()  # SIGKILL: no shutdown, lines in flight lost mid-way
        first.proc.wait(10)
    finally:
        first.stop()
    again = start_server(tmp_path, *args)
    try:
        c = client(again)
        done = wait(c, b.id)
        assert done.status == "completed" and done.request_counts.completed == 16
        out = records(c, done.output_file_id)
        assert sorted(r["custom_id"] for r in out) == sorted(f"req-{i}" for i in range(16))
    finally:
        again.stop()
    # the ledger: each line's answer billed under its batch (a line in flight at the kill may be billed twice
    # when its first run finished after its row was written; never fewer than one row per line)
    conn = sqlite3.connect(tmp_path / "ledger.sqlite")
    rows = conn.execute("SELECT COUNT(*), SUM(cost_usd) FROM requests WHERE batch_id = ? AND finish_reason != 'abort'",
                        (b.id,)).fetchone()
    assert rows[0] >= 16 and rows[1] > 0


def test_leanserve_batch_runs_the_same_file_in_process(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    src = tmp_path / "in.jsonl"
    src.write_text("\n".join([line(0), line(1), "{broken"]) + "\n")
    out = tmp_path / "out.jsonl"
    run = subprocess.run([sys.executable, "-m", "leanserve", "batch", str(src), "-o", str(out), "--dtype", "float32",
                          "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr  # a line failed
    assert "2 of 3 requests done, 1 failed" in run.stderr
    done = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["custom_id"] for r in done] == ["req-0", "req-1"]
    assert all(r["response"]["body"]["usage"]["cost"] > 0 for r in done)
    (err,) = [json.loads(x) for x in (tmp_path / "out.errors.jsonl").read_text().splitlines()]
    assert err["error"]["code"] == "invalid_request" and "line 3" in err["error"]["message"]
    bad = subprocess.run([sys.executable, "-m", "leanserve", "batch", str(tmp_path / "none.jsonl"), "-o", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("leanserve: error: no input file")
