"""The ledger: schema, WAL mode, the writer thread, and `leanserve usage`."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sqlite3
from datetime import datetime, timezone

import pytest

from leanserve.cli import main
from leanserve.cost.cli import format_usage, parse_since, usage_rows
from leanserve.cost.ledger import COLUMNS, Ledger, LedgerRecord, connect, key_id

DAY1 = datetime(2026, 11, 1, 12, tzinfo=timezone.utc).timestamp()
DAY2 = datetime(2026, 11, 2, 12, tzinfo=timezone.utc).timestamp()


def rec(rid: str, ts: float, key: str | None = None, model: str = "m1", prompt: int = 100, output: int = 10,
        secs: float = 1.0, **kw) -> LedgerRecord:
    return LedgerRecord(rid, ts, key_id(key), model, prompt, kw.pop("cached", 0), output, secs, secs / 2,
                        secs * 3.6 / 3600, 3.6, "cpu-local", 0.5, kw.pop("finish", "stop"), **kw)


def write(path, records, store_text=False) -> None:
    led = Ledger(path, store_text=store_text)
    futs = [led.record(r) for r in records]
    for f in futs:
        assert f.result(5) is True
    assert led.num_written == len(records)  # every future's row is in the file
    led.close()


def test_schema_wal_mode_and_rows(tmp_path):
    path = tmp_path / "sub" / "ledger.sqlite"
    write(path, [rec("a", DAY1, "secret-key", finish="abort", cached=64)])
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    cols = [r[1] for r in conn.execute("PRAGMA table_info(requests)")]
    assert tuple(cols) == COLUMNS
    assert conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()[0] == "2"
    row = dict(zip(cols, conn.execute("SELECT * FROM requests").fetchone()))
    assert row["finish_reason"] == "abort" and row["cached_tokens"] == 64 and row["machine_seconds"] == 1.0
    # the key is never stored: only a short prefix of its sha256
    assert row["key_id"] == hashlib.sha256(b"secret-key").hexdigest()[:12]
    assert all(b"secret-key" not in f.read_bytes() for f in path.parent.iterdir())
    # text is off by default
    assert row["prompt_text"] is None and row["output_text"] is None


def test_key_id_is_never_the_key():
    assert key_id(None) is None and key_id("") is None
    k = key_id("sk-abc")
    assert len(k) == 12 and "sk-abc" not in k


def test_text_only_when_asked(tmp_path):
    write(tmp_path / "off.sqlite", [rec("a", DAY1, prompt_text="hello", output_text="world")])
    write(tmp_path / "on.sqlite", [rec("a", DAY1, prompt_text="hello", output_text="world")], store_text=True)
    off = sqlite3.connect(tmp_path / "off.sqlite").execute("SELECT prompt_text, output_text FROM requests").fetchone()
    on = sqlite3.connect(tmp_path / "on.sqlite").execute("SELECT prompt_text, output_text FROM requests").fetchone()
    assert off == (None, None) and on == ("hello", "world")


def test_many_records_from_threads_are_all_committed(tmp_path):
    import threading

    led = Ledger(tmp_path / "l.sqlite")
    threads = [threading.Thread(target=lambda i=i: [led.record(rec(f"r{i}-{j}", DAY1)) for j in range(50)])
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    led.close()
    assert sqlite3.connect(tmp_path / "l.sqlite").execute("SELECT COUNT(*) FROM requests").fetchone()[0] == 200
    assert led.num_written == 200 and led.num_failed == 0


@pytest.fixture
def ledger_file(tmp_path):
    path = tmp_path / "ledger.sqlite"
    write(path, [rec("a", DAY1, "k1", "m1", 100, 10, 1.0), rec("b", DAY1, "k2", "m2", 200, 20, 2.0),
                 rec("c", DAY2, "k1", "m1", 300, 30, 3.0), rec("d", DAY2, None, "m1", 400, 40, 4.0)])
    return path


def test_usage_groups(ledger_file):
    by_day = usage_rows(ledger_file, "day")
    assert [r["group"] for r in by_day] == ["2026-11-01", "2026-11-02", "TOTAL"]
    assert by_day[0]["requests"] == 2 and by_day[0]["prompt_tokens"] == 300 and by_day[0]["output_tokens"] == 30
    assert by_day[-1]["machine_seconds"] == pytest.approx(10.0) and by_day[-1]["cost_usd"] == pytest.approx(0.01)
    assert by_day[-1]["usd_per_mtok"] == pytest.approx(0.01 / 1100 * 1e6)
    by_model = {r["group"]: r for r in usage_rows(ledger_file, "model")}
    assert by_model["m1"]["requests"] == 3 and by_model["m2"]["requests"] == 1
    by_key = {r["group"]: r for r in usage_rows(ledger_file, "key")}
    assert by_key[key_id("k1")]["requests"] == 2 and by_key["-"]["requests"] == 1  # no key: "-"


def test_usage_since(ledger_file):
    assert parse_since("2026-11-02") == datetime(2026, 11, 2, tzinfo=timezone.utc).timestamp()
    assert parse_since("24h", now=1000.0 + 86400) == 1000.0
    assert parse_since("7d", now=7 * 86400.0) == 0.0
    with pytest.raises(ValueError, match="--since"):
        parse_since("yesterday")
    rows = usage_rows(ledger_file, "model", parse_since("2026-11-02"))
    assert rows[-1]["requests"] == 2 and rows[-1]["prompt_tokens"] == 700
    assert usage_rows(ledger_file, "day", DAY2 + 1) == []


def test_usage_formats(ledger_file):
    rows = usage_rows(ledger_file, "model")
    data = json.loads(format_usage(rows, "json", "model"))
    assert data["by"] == "model" and data["rows"][-1]["group"] == "TOTAL"
    parsed = list(csv.DictReader(io.StringIO(format_usage(rows, "csv", "model"))))
    assert parsed[0]["model"] == "m1" and int(parsed[0]["requests"]) == 3
    table = format_usage(rows, "table", "model")
    assert "TOTAL" in table and "$/Mtok" in table and "m2" in table
    assert "no requests" in format_usage([], "table")


def test_usage_command(ledger_file, capsys):
    assert main(["usage", "--ledger", str(ledger_file), "--by", "key", "--since", "2026-11-01",
                 "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rows"][-1]["requests"] == 4
    assert main(["usage", "--ledger", str(ledger_file.parent / "missing.sqlite")]) == 2
    assert "no ledger" in capsys.readouterr().err


def test_connect_refuses_a_missing_file_when_reading(tmp_path):
    with pytest.raises(FileNotFoundError):
        connect(tmp_path / "nope.sqlite", create=False)


def test_a_schema_1_ledger_gains_the_receipt_columns(tmp_path):
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)  # the schema as servers before receipts wrote it
    conn.executescript("""CREATE TABLE requests (id TEXT PRIMARY KEY, ts REAL NOT NULL, key_id TEXT, model TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL, cached_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
        machine_seconds REAL NOT NULL, prefill_seconds REAL NOT NULL, cost_usd REAL NOT NULL, price_per_hour REAL NOT NULL,
        hardware TEXT NOT NULL, latency_s REAL, finish_reason TEXT NOT NULL, prompt_text TEXT, output_text TEXT);
        CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1');
        INSERT INTO requests VALUES ('old', 1.0, NULL, 'm1', 10, 0, 5, 1.0, 0.5, 0.001, 3.6, 'cpu-local', 0.1, 'stop',
                                    NULL, NULL);""")
    conn.commit()
    conn.close()
    assert usage_rows(path, "model")[0]["saved_usd"] == 0.0  # read-only: the columns count as none
    write(path, [rec("new", DAY1, saved_cache_usd=0.25, cache="hit")])
    conn = sqlite3.connect(path)
    assert tuple(r[1] for r in conn.execute("PRAGMA table_info(requests)")) == COLUMNS
    assert conn.execute("SELECT id, saved_cache_usd, cache FROM requests ORDER BY id").fetchall() == [
        ("new", 0.25, "hit"), ("old", 0.0, None)]
    total = usage_rows(path, "model")[-1]
    assert (total["requests"], total["cache_hits"], total["saved_usd"]) == (2, 1, 0.25)


def test_amend_changes_a_queued_row_in_order(tmp_path):
    led = Ledger(tmp_path / "l.sqlite")
    led.record(rec("a", DAY1, saved_prefix_usd=0.5))
    fut = led.amend("a", route="auto", saved_routing_usd=-0.125)
    assert fut.result(5) is True
    with pytest.raises(ValueError, match="cannot be amended"):
        led.amend("a", cost_usd=0.0)
    led.close()
    row = sqlite3.connect(tmp_path / "l.sqlite").execute(
        "SELECT route, saved_prefix_usd, saved_routing_usd FROM requests").fetchone()
    assert row == ("auto", 0.5, -0.125)
    assert usage_rows(tmp_path / "l.sqlite", "model")[0]["saved_usd"] == 0.375
