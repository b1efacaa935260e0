"""The Files and Batches API over fake engines (tests/fake_engine.py): lines run in the batch priority
class, their cost (with --batch-price-factor) lands in the Batch object and the ledger under the batch
id, usage --by kind splits interactive from batch, another key sees nothing."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest
from fastapi.testclient import TestClient

from leanserve.batch.store import BatchStore
from leanserve.cost.basis import resolve_price_basis
from leanserve.cost.cli import usage_rows
from leanserve.cost.ledger import Ledger
from leanserve.engine.async_engine import AsyncEngine
from leanserve.serve.api import ServerSettings, build_app
from leanserve.serve.auth import key_digest
from leanserve.types import Priority
from tests.fake_engine import FakeEngine


@pytest.fixture()
def served(tmp_path):
    fake = FakeEngine(step_s=0.001)
    priorities = []
    real = fake.add_request

    def add_request(rid, prompt, params, priority=Priority.INTERACTIVE, tenant=None):
        priorities.append(priority)
        return real(rid, prompt, params, priority, tenant)

    fake.add_request = add_request
    ledger = Ledger(tmp_path / "ledger.sqlite")
    settings = ServerSettings("fake", frozenset({key_digest("k1"), key_digest("k2")}), request_timeout=30,
                              price_basis=resolve_price_basis(price_per_hour=3.6), ledger=ledger,
                              batch_price_factor=0.5)
    app = build_app(AsyncEngine(fake, max_queue=8), settings, batch_store=BatchStore(tmp_path / "batches"),
                    batch_max_in_flight=2)
    with TestClient(app) as client:
        yield client, priorities, tmp_path


def h(key: str = "k1") -> dict:
    return {"Authorization": f"Bearer {key}"}


def completed(client, batch_id: str) -> dict:
    """The batch once completed (at most 10 s: the fake engine's lines take milliseconds)."""
    deadline = time.monotonic() + 10
    while (b := client.get(f"/v1/batches/{batch_id}", headers=h()).json())["status"] != "completed":
        assert time.monotonic() < deadline, b
        time.sleep(0.02)
    return b


def test_a_batch_runs_in_the_batch_class_at_its_price_and_is_its_owners(served):
    client, priorities, tmp = served
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
              "body": {"prompt": "hi", "max_tokens": 2}} for i in range(3)]
    data = "\n".join(json.dumps(x) for x in lines).encode()
    f = client.post("/v1/files", headers=h(), files={"file": ("in.jsonl", data)}, data={"purpose": "batch"}).json()
    assert f["object"] == "file" and f["bytes"] == len(data) and f["purpose"] == "batch"
    assert client.get(f"/v1/files/{f['id']}", headers=h("k2")).status_code == 404  # another key's
    b = client.post("/v1/batches", headers=h(), json={"input_file_id": f["id"], "endpoint": "/v1/completions",
                                                       "completion_window": "24h"}).json()
    b = completed(client, b["id"])
    assert b["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    assert priorities == [Priority.BATCH] * 3
    out = [json.loads(x) for x in client.get(f"/v1/files/{b['output_file_id']}/content", headers=h()).text.splitlines()]
    assert [r["custom_id"] for r in out] == ["c0", "c1", "c2"]
    # each line's machine-seconds at $3.6/h, at half price
    usages = [r["response"]["body"]["usage"] for r in out]
    costs = [u["cost"] for u in usages]
    assert costs == [pytest.approx(u["cost_details"]["machine_seconds"] * 3.6 / 3600 * 0.5) for u in usages]
    assert all(c > 0 for c in costs)
    assert b["usage"]["usd"] == pytest.approx(sum(costs))
    assert client.get(f"/v1/batches/{b['id']}", headers=h("k2")).status_code == 404
    assert client.get("/v1/batches", headers=h("k2")).json()["data"] == []
    # an interactive request beside it; the ledger splits the two kinds
    assert client.post("/v1/completions", headers=h(), json={"prompt": "hi", "max_tokens": 2}).status_code == 200
    client.app.state.server.settings.ledger.close()
    rows = {r["group"]: r for r in usage_rows(tmp / "ledger.sqlite", "kind")}
    assert (rows["batch"]["requests"], rows["interactive"]["requests"]) == (3, 1)
    assert rows["batch"]["cost_usd"] == pytest.approx(sum(costs))
    ids = sqlite3.connect(tmp / "ledger.sqlite").execute("SELECT DISTINCT batch_id FROM requests").fetchall()
    assert sorted(ids, key=str) == sorted([(None,), (b["id"],)], key=str)


def test_bad_batch_requests_are_clear_errors(served):
    client, _, _ = served
    r = client.post("/v1/files", headers=h(), files={"file": ("x.jsonl", b"{}")}, data={"purpose": "fine-tune"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"
    r = client.post("/v1/batches", headers=h(), json={"input_file_id": "file-nope", "endpoint": "/v1/completions"})
    assert r.status_code == 404 and "No such File object" in r.json()["error"]["message"]
    f = client.post("/v1/files", headers=h(), files={"file": ("x.jsonl", b"\n\n")}, data={"purpose": "batch"}).json()
    r = client.post("/v1/batches", headers=h(), json={"input_file_id": f["id"], "endpoint": "/v1/completions"})
    assert r.status_code == 400 and "no requests" in r.json()["error"]["message"]
    r = client.post("/v1/batches", headers=h(), json={"input_file_id": f["id"], "endpoint": "/v1/embeddings"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "endpoint"
    assert client.post("/v1/batches/batch_nope/cancel", headers=h()).status_code == 404


def test_a_batch_near_its_windows_end_runs_as_interactive(served):
    client, priorities, _ = served
    runner = client.app.state.batch_runner
    runner.clock = lambda: time.time() + 0.85 * 3600  # the last fifth of a 1h window
    line = {"custom_id": "late", "method": "POST", "url": "/v1/completions", "body": {"prompt": "hi", "max_tokens": 2}}
    f = client.post("/v1/files", headers=h(), files={"file": ("in.jsonl", json.dumps(line).encode())},
                    data={"purpose": "batch"}).json()
    b = client.post("/v1/batches", headers=h(), json={"input_file_id": f["id"], "endpoint": "/v1/completions",
                                                       "completion_window": "1h"}).json()
    b = completed(client, b["id"])
    assert priorities == [Priority.INTERACTIVE]
