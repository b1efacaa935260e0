"""batch/store.py: files, batches and per-line progress in SQLite, pinned exactly with an injected
clock: validation, counting each line once, cancel/finalize transitions, the output and error files
line by line, and a second store on the same root (a restart) resuming where the first left off."""

from __future__ import annotations

import json
import os
import re
import threading
import time

import pytest

from leanserve.batch import store as store_mod
from leanserve.batch.store import BatchStore, FileObject, Line, StoreError

CHAT = "/v1/chat/completions"


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make(tmp_path, clock: Clock | None = None) -> BatchStore:
    return BatchStore(tmp_path / "batches", clock or Clock())


def req(custom_id, url=CHAT, body=None, method="POST") -> str:
    return json.dumps({"custom_id": custom_id, "method": method, "url": url,
                       "body": {"messages": [{"role": "user", "content": custom_id}]} if body is None else body})


def jsonl(*lines: str) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def raises(status: int, param: str | None, match: str):
    class Ctx:
        def __enter__(self):
            self.cm = pytest.raises(StoreError, match=match)
            self.info = self.cm.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.cm.__exit__(*exc)
            assert (self.info.value.status, self.info.value.param) == (status, param)
            return handled
    return Ctx()


def make_batch(s: BatchStore, content: bytes, owner: str | None = "alice", window: str = "24h",
               metadata: dict | None = None) -> dict:
    f = s.add_file(content, "in.jsonl", "batch", owner)
    return s.create_batch(f.id, CHAT, window, metadata, owner)


def response(rid: str, prompt: int = 3, completion: int = 2) -> dict:
    return {"id": rid, "object": "chat.completion", "choices": [],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}


# the mixed input: 9 requests (file lines 1-10, line 2 empty), 2 of them valid (indexes 0 and 3)
MIXED = jsonl(
    req("a"),                                    # 0 (line 1)  ok
    "   ",                                       #   (line 2)  empty: skipped
    '{"custom_id": "x", "method": "POST",',      # 1 (line 3)  not JSON
    req("b", url="/v1/completions"),             # 2 (line 4)  wrong url
    req("c"),                                    # 3 (line 5)  ok
    req("a"),                                    # 4 (line 6)  duplicate of line 1
    req(7),                                      # 5 (line 7)  custom_id not a string
    req("d", method="GET"),                      # 6 (line 8)  method
    req("e", body=[1]),                          # 7 (line 9)  body not an object
    "[1, 2]",                                    # 8 (line 10) not an object
)
MIXED_ERRORS = [  # (custom_id, message) of the malformed lines, in order
    (None, "line 3: not valid JSON (Expecting property name enclosed in double quotes at column 37)"),
    ("b", "line 4: url '/v1/completions' is not the batch's endpoint '/v1/chat/completions'"),
    ("a", "line 6: duplicate custom_id 'a' (first on line 1)"),
    (None, "line 7: custom_id must be a string"),
    ("d", "line 8: method must be \"POST\", got 'GET'"),
    ("e", "line 9: body must be a JSON object"),
    (None, "line 10: expected a JSON object, got list"),
]


def parsed(s: BatchStore, file_id: str, owner="alice") -> list[dict]:
    """A result file's lines, each id checked and dropped."""
    out = []
    for text in s.file_content(file_id, owner).decode().splitlines():
        obj = json.loads(text)
        assert re.fullmatch(r"batch_req_[0-9a-f]{24}", obj.pop("id"))
        out.append(obj)
    return out


# ---- files ---------------------------------------------------------------------------------------

def test_files_round_trip(tmp_path):
    clock = Clock()
    s = make(tmp_path, clock)
    f1 = s.add_file(b"one\n", "a.jsonl", "batch", "alice")
    clock.t = 1001.7
    f2 = s.add_file(b"\x00two", "b.jsonl", "batch", "alice")
    assert re.fullmatch(r"file-[0-9a-f]{24}", f1.id) and f1.id != f2.id
    assert f1 == FileObject(f1.id, 4, 1000, "a.jsonl", "batch", "alice")
    assert f2.to_dict() == {"id": f2.id, "object": "file", "bytes": 4, "created_at": 1001, "filename": "b.jsonl",
                            "purpose": "batch", "status": "processed", "expires_at": None, "status_details": None}
    assert s.get_file(f1.id, "alice") == f1
    assert s.file_content(f2.id, "alice") == b"\x00two"
    assert s.list_files("alice") == [f2, f1]
    assert s.list_files("alice", purpose="batch_output") == []
    assert s.list_files("bob") == [] and s.list_files(None) == []
    for call in (s.get_file, s.file_content, s.delete_file):
        with raises(404, "file_id", f"^No such File object: {f1.id}$"):
            call(f1.id, "bob")
    with raises(404, "file_id", "No such File object"):
        s.get_file(f1.id, None)  # no auth is an owner of its own, not a wildcard

    s.delete_file(f1.id, "alice")
    assert not (tmp_path / "batches" / "files" / f1.id).exists()
    assert sorted(p.name for p in (tmp_path / "batches" / "files").iterdir()) == [f2.id]
    assert s.list_files("alice") == [f2]
    with raises(404, "file_id", "No such File object"):
        s.delete_file(f1.id, "alice")
    s.close()


def test_purpose_is_checked(tmp_path):
    s = make(tmp_path)
    with raises(400, "purpose", "purpose must be 'batch'.*got 'fine-tune'"):
        s.add_file(b"x", "a.jsonl", "fine-tune", None)
    with raises(400, "purpose", "got 'batch_output'"):
        s.add_file(b"x", "a.jsonl", "batch_output", None)  # only the server writes those
    out = s.add_output_file(jsonl(req("a")), "out.jsonl", None)
    assert (out.purpose, s.list_files(None, purpose="batch_output")) == ("batch_output", [out])
    with raises(400, "input_file_id", f"file {out.id} has purpose 'batch_output'"):
        s.create_batch(out.id, CHAT, "24h", None, None)
    assert s.list_batches(None) == ([], False)


def test_size_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "MAX_FILE_BYTES", 10)
    s = make(tmp_path)
    with raises(413, "file", "the file is 11 bytes; at most 10 are allowed"):
        s.add_file(b"x" * 11, "a.jsonl", "batch", None)
    ok = s.add_file(b"x" * 10, "a.jsonl", "batch", None)
    big = s.add_output_file(b"x" * 11, "out.jsonl", None)  # no limit on what the server writes
    assert sorted(p.name for p in s.files_dir.iterdir()) == sorted([ok.id, big.id])
    assert [f.bytes for f in s.list_files(None)] == [11, 10]


# ---- creating a batch ----------------------------------------------------------------------------

def test_create_batch_with_malformed_lines(tmp_path):
    s = make(tmp_path)
    f = s.add_file(MIXED, "in.jsonl", "batch", "alice")
    b = s.create_batch(f.id, CHAT, "24h", {"team": "x"}, "alice")
    assert re.fullmatch(r"batch_[0-9a-f]{24}", b["id"])
    assert b == {
        "id": b["id"], "object": "batch", "endpoint": CHAT, "errors": None, "input_file_id": f.id,
        "completion_window": "24h", "status": "in_progress", "output_file_id": None, "error_file_id": None,
        "created_at": 1000, "in_progress_at": 1000, "expires_at": 1000 + 86400, "finalizing_at": None,
        "completed_at": None, "failed_at": None, "expired_at": None, "cancelling_at": None, "cancelled_at": None,
        "request_counts": {"total": 9, "completed": 0, "failed": 7}, "metadata": {"team": "x"},
        "usage": {"usd": 0.0, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}
    assert s.batch_dict(b["id"], "alice") == b
    assert s.pending_lines(b["id"], 10) == [
        Line(b["id"], 0, "a", {"messages": [{"role": "user", "content": "a"}]}, "pending"),
        Line(b["id"], 3, "c", {"messages": [{"role": "user", "content": "c"}]}, "pending")]
    assert [ln.index for ln in s.pending_lines(b["id"], 1)] == [0]
    assert [ln.index for ln in s.pending_lines(b["id"], 10, after=0)] == [3]
    assert s.active_batches() == [b["id"]]
    assert s.batch_row(b["id"]) == {"id": b["id"], "endpoint": CHAT, "status": "in_progress", "owner": "alice",
                                    "created_at": 1000, "expires_at": 87400, "window_s": 86400.0,
                                    "finalizing": False, "pending": 2}
    with raises(404, "batch_id", f"^No such Batch object: {b['id']}$"):
        s.batch_dict(b["id"], "bob")


def test_create_batch_validation(tmp_path):
    s = make(tmp_path)
    f = s.add_file(jsonl(req("a")), "in.jsonl", "batch", "alice")
    with raises(400, "endpoint", "endpoint must be one of /v1/chat/completions, /v1/completions, got '/v1/embeddings'"):
        s.create_batch(f.id, "/v1/embeddings", "24h", None, "alice")
    with raises(400, "completion_window", "completion_window must be one of '24h', '1h', got '2h'"):
        s.create_batch(f.id, CHAT, "2h", None, "alice")
    with raises(404, "input_file_id", "No such File object: file-nope"):
        s.create_batch("file-nope", CHAT, "24h", None, "alice")
    with raises(404, "input_file_id", f"No such File object: {f.id}"):
        s.create_batch(f.id, CHAT, "24h", None, "bob")
    for empty in (b"", b"\n  \n\r\n"):
        e = s.add_file(empty, "e.jsonl", "batch", "alice")
        with raises(400, "input_file_id", "^the input file has no requests$"):
            s.create_batch(e.id, CHAT, "24h", None, "alice")
    assert s.list_batches("alice") == ([], False)
    b = s.create_batch(f.id, "/v1/chat/completions", "1h", None, "alice")  # leanserve's extra window
    assert (b["completion_window"], b["expires_at"], b["metadata"]) == ("1h", 1000 + 3600, None)


@pytest.mark.parametrize("metadata, match", [
    ({f"k{i}": "v" for i in range(17)}, "metadata has 17 keys; at most 16 are allowed"),
    ({"k" * 65: "v"}, "is 65 characters; at most 64 are allowed"),
    ({"k": "v" * 513}, "metadata value of 'k' is 513 characters; at most 512 are allowed"),
    ({"k": 1}, r"metadata keys and values must be strings \(key 'k'\)"),
    (["k"], "metadata must be an object"),
])
def test_metadata_is_validated(tmp_path, metadata, match):
    s = make(tmp_path)
    f = s.add_file(jsonl(req("a")), "in.jsonl", "batch", None)
    with raises(400, "metadata", match):
        s.create_batch(f.id, CHAT, "24h", metadata, None)
    at_limit = {f"{i:02d}" + "k" * 62: "v" * 512 for i in range(16)}
    assert s.create_batch(f.id, CHAT, "24h", at_limit, None)["metadata"] == at_limit


def test_max_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "MAX_LINES", 3)
    s = make(tmp_path)
    f = s.add_file(jsonl(req("a"), req("b"), "", req("c"), "garbage"), "in.jsonl", "batch", None)
    with raises(400, "input_file_id", "the input file has 4 requests; a batch may have at most 3"):
        s.create_batch(f.id, CHAT, "24h", None, None)
    assert (s.list_batches(None), s.active_batches()) == (([], False), [])
    g = s.add_file(jsonl(req("a"), "", req("b"), "garbage"), "in.jsonl", "batch", None)
    assert s.create_batch(g.id, CHAT, "24h", None, None)["request_counts"] == {"total": 3, "completed": 0,
                                                                               "failed": 1}


# ---- running lines -------------------------------------------------------------------------------

def test_finish_line_counts_once(tmp_path):
    s = make(tmp_path)
    b = make_batch(s, MIXED)["id"]
    assert s.finish_line(b, 0, response("chatcmpl-a", 3, 2), None, 200, usd=0.25) is True
    assert s.finish_line(b, 0, response("chatcmpl-a", 3, 2), None, 200, usd=0.25) is False  # already done
    assert s.finish_line(b, 1, response("chatcmpl-x"), None, 200) is False  # a malformed line, failed already
    assert s.finish_line(b, 99, response("chatcmpl-x"), None, 200) is False  # no such line
    bad = {"error": {"message": "max_tokens too large", "type": "invalid_request_error", "code": None}}
    assert s.finish_line(b, 3, bad, None, 400, usd=0.0, usage={"prompt_tokens": 7}) is True
    assert s.finish_line(b, 3, response("chatcmpl-c"), None, 200) is False  # failed lines stay failed
    d = s.batch_dict(b, "alice")
    assert d["request_counts"] == {"total": 9, "completed": 1, "failed": 8}
    assert d["usage"] == {"usd": 0.25, "prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 5}
    assert s.pending_lines(b, 10) == []
    with pytest.raises(ValueError, match="needs a response or an error"):
        s.finish_line(b, 0, None, None, 200)


def test_finish_line_from_threads(tmp_path):
    s = make(tmp_path)
    b = make_batch(s, jsonl(*(req(f"r{i}") for i in range(200))))["id"]
    won = []

    def work() -> None:
        for ln in s.pending_lines(b, 200):
            if s.finish_line(b, ln.index, response(f"id-{ln.index}", 1, 1), None, 200, usd=0.5):
                won.append(ln.index)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(won) == list(range(200))
    d = s.batch_dict(b, "alice")
    assert (d["request_counts"], d["usage"]["usd"], d["usage"]["total_tokens"]) == \
        ({"total": 200, "completed": 200, "failed": 0}, 100.0, 400)


# ---- cancel and finalize -------------------------------------------------------------------------

def test_finalize_writes_output_and_error_files(tmp_path):
    clock = Clock()
    s = make(tmp_path, clock)
    b = make_batch(s, MIXED)["id"]
    clock.t = 1010.0
    with pytest.raises(ValueError, match=f"{b} has 2 pending lines"):
        s.finalize(b)
    assert s.finish_line(b, 0, response("chatcmpl-a"), None, 200, usd=0.5)
    assert s.finish_line(b, 3, None, {"code": "server_error", "message": "the engine failed"}, 500)
    clock.t = 1020.0
    d = s.finalize(b)
    assert {k: d[k] for k in ("status", "finalizing_at", "completed_at", "cancelled_at", "expired_at")} == \
        {"status": "completed", "finalizing_at": 1020, "completed_at": 1020, "cancelled_at": None, "expired_at": None}
    assert d["request_counts"] == {"total": 9, "completed": 1, "failed": 8}
    assert s.active_batches() == []

    assert parsed(s, d["output_file_id"]) == [
        {"custom_id": "a", "response": {"status_code": 200, "request_id": "chatcmpl-a", "body": response("chatcmpl-a")},
         "error": None}]
    errors = parsed(s, d["error_file_id"])
    assert [(e["custom_id"], e["error"]["code"], e["response"] and e["response"]["status_code"]) for e in errors] == [
        (None, "invalid_request", None), ("b", "invalid_request", None), ("c", "server_error", 500),
        ("a", "invalid_request", None), (None, "invalid_request", None), ("d", "invalid_request", None),
        ("e", "invalid_request", None), (None, "invalid_request", None)]
    malformed = [e for e in errors if e["response"] is None]
    assert [(e["custom_id"], e["error"]["message"]) for e in malformed] == MIXED_ERRORS
    assert errors[2] == {"custom_id": "c", "response": {"status_code": 500, "request_id": None, "body": {
        "error": {"code": "server_error", "message": "the engine failed"}}},
        "error": {"code": "server_error", "message": "the engine failed"}}
    out = s.get_file(d["output_file_id"], "alice")
    assert (out.purpose, out.filename, out.created_at) == ("batch_output", f"{b}_output.jsonl", 1020)
    assert s.get_file(d["error_file_id"], "alice").filename == f"{b}_error.jsonl"

    clock.t = 2000.0
    assert s.finalize(b) == d  # idempotent
    assert len(s.list_files("alice", purpose="batch_output")) == 2
    assert s.finish_line(b, 0, response("chatcmpl-a"), None, 200) is False
    with raises(409, "batch_id", "^cannot cancel a batch that is completed$"):
        s.cancel(b, "alice")


def test_finalize_only_writes_nonempty_files(tmp_path):
    s = make(tmp_path)
    ok = make_batch(s, jsonl(req("a")))["id"]
    s.finish_line(ok, 0, response("r"), None, 200)
    d = s.finalize(ok)
    assert (d["status"], d["error_file_id"]) == ("completed", None)
    assert [ln["custom_id"] for ln in parsed(s, d["output_file_id"])] == ["a"]
    bad = make_batch(s, jsonl("nope"))["id"]
    d = s.finalize(bad)  # nothing to run: finalized at once
    assert (d["status"], d["output_file_id"], d["request_counts"]) == \
        ("completed", None, {"total": 1, "completed": 0, "failed": 1})
    assert [ln["error"]["message"] for ln in parsed(s, d["error_file_id"])] == \
        ["line 1: not valid JSON (Expecting value at column 1)"]


def test_cancel(tmp_path):
    clock = Clock()
    s = make(tmp_path, clock)
    b = make_batch(s, jsonl(req("a"), req("b"), req("c")))["id"]
    with raises(404, "batch_id", "No such Batch object"):
        s.cancel(b, "bob")
    clock.t = 1005.0
    d = s.cancel(b, "alice")
    assert (d["status"], d["cancelling_at"], d["cancelled_at"]) == ("cancelling", 1005, None)
    clock.t = 1006.0
    assert s.cancel(b, "alice") == d  # cancelling: as it is
    assert s.active_batches() == [b]
    assert s.finish_line(b, 1, response("chatcmpl-b"), None, 200)  # was in flight: still counts
    clock.t = 1007.0
    d = s.finalize(b)
    assert {k: d[k] for k in ("status", "cancelling_at", "cancelled_at", "completed_at", "error_file_id")} == \
        {"status": "cancelled", "cancelling_at": 1005, "cancelled_at": 1007, "completed_at": None,
         "error_file_id": None}
    assert d["request_counts"] == {"total": 3, "completed": 1, "failed": 0}
    assert [ln["custom_id"] for ln in parsed(s, d["output_file_id"])] == ["b"]
    assert s.finish_line(b, 0, response("chatcmpl-a"), None, 200) is False  # too late
    assert s.active_batches() == []
    with raises(409, "batch_id", "^cannot cancel a batch that is cancelled$"):
        s.cancel(b, "alice")


def test_expired(tmp_path):
    clock = Clock()
    s = make(tmp_path, clock)
    b = make_batch(s, jsonl(req("a"), req("b"), "oops"), window="1h")["id"]
    s.finish_line(b, 0, response("chatcmpl-a"), None, 200)
    clock.t = 1000.0 + 3599
    with pytest.raises(ValueError, match="1 pending lines"):
        s.finalize(b)
    clock.t = 1000.0 + 3600
    d = s.finalize(b)
    assert {k: d[k] for k in ("status", "expired_at", "completed_at", "finalizing_at")} == \
        {"status": "expired", "expired_at": 4600, "completed_at": None, "finalizing_at": 4600}
    assert d["request_counts"] == {"total": 3, "completed": 1, "failed": 2}
    assert [ln["custom_id"] for ln in parsed(s, d["output_file_id"])] == ["a"]
    assert [(e["custom_id"], e["response"], e["error"]["code"]) for e in parsed(s, d["error_file_id"])] == \
        [("b", None, "batch_expired"), (None, None, "invalid_request")]
    assert s.pending_lines(b, 10) == []


# ---- restart -------------------------------------------------------------------------------------

def test_restart_resumes(tmp_path):
    clock = Clock()
    s = make(tmp_path, clock)
    b1 = make_batch(s, jsonl(req("a"), req("b"), req("c"), "junk"))["id"]
    b2 = make_batch(s, jsonl(req("x")), owner=None)["id"]
    f = s.add_file(b"keep", "k.jsonl", "batch", None)
    s.finish_line(b1, 1, response("chatcmpl-b"), None, 200, usd=0.125)
    s.cancel(b2, None)
    before = s.batch_dict(b1, "alice")

    t = make(tmp_path, clock)  # the first still open: what a kill -9 leaves is committed already
    assert t.active_batches() == [b1, b2]
    assert [(ln.index, ln.custom_id) for ln in t.pending_lines(b1, 10)] == [(0, "a"), (2, "c")]
    assert t.batch_dict(b1, "alice") == before
    assert t.batch_dict(b2, None)["status"] == "cancelling"
    assert (t.get_file(f.id, None), t.file_content(f.id, None)) == (f, b"keep")
    assert t.finish_line(b1, 1, response("chatcmpl-b"), None, 200) is False  # done before the restart
    t.requeue_running()  # nothing to requeue: a line in flight is still pending
    assert [ln.index for ln in t.pending_lines(b1, 10)] == [0, 2]
    s.close()
    t.close()


def test_crash_during_finalize_is_finalized_again(tmp_path, monkeypatch):
    clock = Clock()
    s = make(tmp_path, clock)
    b = make_batch(s, jsonl(req("a"), "junk"))["id"]
    s.finish_line(b, 0, response("chatcmpl-a"), None, 200)
    real = BatchStore.add_output_file

    def dies_on_error_file(self, content, filename, owner):
        if filename.endswith("_error.jsonl"):
            raise OSError("disk full")
        return real(self, content, filename, owner)

    monkeypatch.setattr(BatchStore, "add_output_file", dies_on_error_file)
    with pytest.raises(OSError, match="disk full"):
        s.finalize(b)
    d = s.batch_dict(b, "alice")
    assert (d["status"], d["finalizing_at"], d["output_file_id"]) == ("finalizing", 1000, None)
    assert s.active_batches() == [b]
    assert s.finish_line(b, 0, response("chatcmpl-a"), None, 200) is False
    assert s.cancel(b, "alice") == d  # finalizing: as it is
    monkeypatch.undo()

    clock.t = 1050.0
    t = make(tmp_path, clock)
    d = t.finalize(b)
    assert (d["status"], d["finalizing_at"], d["completed_at"]) == ("completed", 1000, 1050)
    assert [ln["custom_id"] for ln in parsed(t, d["output_file_id"])] == ["a"]
    assert [ln["error"]["code"] for ln in parsed(t, d["error_file_id"])] == ["invalid_request"]


def test_open_sweeps_stale_leftovers(tmp_path):
    s = make(tmp_path)
    kept = s.add_file(b"x", "a.jsonl", "batch", None)
    old, fresh, orphan = (s.files_dir / n for n in ("file-old.tmp", "file-fresh.tmp", "file-orphan"))
    for p in (old, fresh, orphan):
        p.write_bytes(b"partial")
    stale = time.time() - store_mod.STALE_TMP_S - 10
    os.utime(old, (stale, stale))
    os.utime(orphan, (stale, stale))
    os.utime(s.files_dir / kept.id, (stale, stale))
    make(tmp_path)
    assert sorted(p.name for p in s.files_dir.iterdir()) == sorted([kept.id, "file-fresh.tmp"])


# ---- listing -------------------------------------------------------------------------------------

def test_list_batches_pagination(tmp_path):
    clock = Clock()
    s = make(tmp_path, clock)
    f = s.add_file(jsonl(req("a")), "in.jsonl", "batch", "alice")
    ids = []
    for _ in range(5):
        ids.append(s.create_batch(f.id, CHAT, "24h", None, "alice")["id"])  # same second: creation order decides
    make_batch(s, jsonl(req("a")), owner="bob")
    page, more = s.list_batches("alice", limit=2)
    assert ([b["id"] for b in page], more) == ([ids[4], ids[3]], True)
    page, more = s.list_batches("alice", after=ids[3], limit=2)
    assert ([b["id"] for b in page], more) == ([ids[2], ids[1]], True)
    page, more = s.list_batches("alice", after=ids[1], limit=2)
    assert ([b["id"] for b in page], more) == ([ids[0]], False)
    assert s.list_batches("alice", after=ids[0]) == ([], False)
    page, more = s.list_batches("alice")
    assert ([b["id"] for b in page], more) == (ids[::-1], False)
    assert page[0] == s.batch_dict(ids[4], "alice")
    assert s.list_batches(None) == ([], False)
    for limit in (0, 101, True, 2.0):
        with raises(400, "limit", "limit must be an integer from 1 to 100"):
            s.list_batches("alice", limit=limit)
    with raises(404, "after", f"No such Batch object: {ids[0]}"):
        s.list_batches("bob", after=ids[0])
