"""The batch store: files, batches and per-line progress, durable across a restart or a kill -9.

    store = BatchStore(home / "batches")
    f = store.add_file(jsonl, "in.jsonl", "batch", owner)            # POST /v1/files
    b = store.create_batch(f.id, "/v1/chat/completions", "24h", None, owner)   # POST /v1/batches
    # the runner, also right after a restart:
    for batch_id in store.active_batches():
        for line in store.pending_lines(batch_id, 8):
            store.finish_line(batch_id, line.index, response, None, 200, usd=...)
        store.finalize(batch_id)      # once nothing is pending (or the batch is cancelling or past expiry)

Layout under ``root``: ``files/<file id>`` holds each file's bytes (written to a ``.tmp`` beside it,
fsynced and renamed before its row is committed, so a row always has its content);
``batches.sqlite`` (WAL, ``synchronous=NORMAL``: a committed transaction survives the process being
killed) holds the rows. A request line is ``pending``, ``done`` or ``failed``; there is no "running"
state: a line in flight when the server died is still pending and runs again, and ``finish_line``
moves a line out of pending at most once, so nothing is counted twice.

A batch's life: ``in_progress`` (parsing is done when it is created, so ``validating`` is never
stored) -> ``cancelling`` on cancel -> ``finalize`` sets ``finalizing_at`` (from then on no line is
accepted; a completing batch shows ``finalizing``), writes the output and error files, and ends it
``completed``, ``cancelled`` or ``expired``. A crash during finalization leaves the batch in
``active_batches`` and ``finalize`` runs again with the same outcome.

One store per root and process: two live servers on one root are not supported (finalization is
guarded against concurrent calls only within a process).
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_FILE_BYTES = 200 * 2**20  # OpenAI's limit for batch input files
MAX_LINES = 50_000  # OpenAI's per-batch request limit
BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
WINDOWS = {"24h": 86400.0, "1h": 3600.0}  # completion_window values; OpenAI accepts only "24h", "1h" is leanserve's
MAX_METADATA_KEYS, MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS = 16, 64, 512
STALE_TMP_S = 3600.0  # a leftover .tmp or row-less content file older than this is removed on open

SCHEMA_VERSION = 1
_ACCEPTING = ("in_progress", "cancelling")  # statuses whose lines still run (unless finalizing_at is set)
_FINISHED = ("completed", "failed", "expired", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,  -- creation order: newest first is seq DESC
    id         TEXT NOT NULL UNIQUE,                -- file-<24 hex>; the content is files/<id>
    owner      TEXT,                                -- the API key's id; NULL without auth
    filename   TEXT NOT NULL,
    purpose    TEXT NOT NULL,                       -- batch | batch_output
    bytes      INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS files_owner ON files (owner, seq);
CREATE TABLE IF NOT EXISTS batches (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    id                TEXT NOT NULL UNIQUE,         -- batch_<24 hex>
    owner             TEXT,
    endpoint          TEXT NOT NULL,
    input_file_id     TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    window_s          REAL NOT NULL,
    status            TEXT NOT NULL,
    output_file_id    TEXT,
    error_file_id     TEXT,
    created_at        INTEGER NOT NULL,
    in_progress_at    INTEGER,
    expires_at        INTEGER NOT NULL,
    finalizing_at     INTEGER,                      -- set: no line is accepted any more
    completed_at      INTEGER,
    failed_at         INTEGER,
    expired_at        INTEGER,
    cancelling_at     INTEGER,
    cancelled_at      INTEGER,
    total             INTEGER NOT NULL,             -- request lines, malformed ones included
    completed         INTEGER NOT NULL DEFAULT 0,   -- lines done
    failed            INTEGER NOT NULL DEFAULT 0,   -- lines failed (malformed ones from the start)
    usd               REAL NOT NULL DEFAULT 0,      -- summed over finish_line calls
    prompt_tokens     INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    total_tokens      INTEGER NOT NULL DEFAULT 0,
    metadata          TEXT                          -- JSON object, or NULL
);
CREATE INDEX IF NOT EXISTS batches_owner ON batches (owner, seq);
CREATE INDEX IF NOT EXISTS batches_status ON batches (status, seq);
CREATE TABLE IF NOT EXISTS lines (
    batch_id    TEXT NOT NULL,
    idx         INTEGER NOT NULL,                   -- 0-based among the file's non-empty lines
    custom_id   TEXT,
    body        TEXT,                               -- the request body as JSON; NULL: malformed line
    status      TEXT NOT NULL,                      -- pending | done | failed
    status_code INTEGER,                            -- NULL: never ran (malformed, expired)
    response    TEXT,                               -- JSON: the response body (a 200, or a failed status's body)
    error       TEXT,                               -- JSON {"code", "message"} of a failed line
    PRIMARY KEY (batch_id, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS lines_pending ON lines (batch_id, idx) WHERE status = 'pending';
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_BATCH_TIMES = ("created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at",
                "expired_at", "cancelling_at", "cancelled_at")


class StoreError(ValueError):
    """A user error the HTTP layer turns into an OpenAI error: ``status`` (400, 404, 409 or 413),
    ``message``, ``param`` (the request field at fault) and ``code``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


@dataclass(frozen=True)
class FileObject:
    """OpenAI's File object. ``owner`` (the API key's id, None without auth) is never shown."""
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    owner: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "expires_at": None, "status_details": None}


@dataclass(frozen=True)
class Line:
    """One request of a batch. ``body`` None: the line was malformed (its error already recorded)."""
    batch_id: str
    index: int
    custom_id: str | None
    body: dict[str, Any] | None
    status: str  # pending | done | failed


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _no_file(file_id: str) -> StoreError:
    return StoreError(404, f"No such File object: {file_id}", "file_id")


def _no_batch(batch_id: str) -> StoreError:
    return StoreError(404, f"No such Batch object: {batch_id}", "batch_id")


def _check_metadata(metadata: Any) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise StoreError(400, "metadata must be an object of string keys and string values", "metadata")
    if len(metadata) > MAX_METADATA_KEYS:
        raise StoreError(400, f"metadata has {len(metadata)} keys; at most {MAX_METADATA_KEYS} are allowed",
                         "metadata")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise StoreError(400, f"metadata keys and values must be strings (key {key!r})", "metadata")
        if len(key) > MAX_METADATA_KEY_CHARS:
            raise StoreError(400, f"metadata key {key[:20]!r}... is {len(key)} characters; at most "
                             f"{MAX_METADATA_KEY_CHARS} are allowed", "metadata")
        if len(value) > MAX_METADATA_VALUE_CHARS:
            raise StoreError(400, f"metadata value of {key!r} is {len(value)} characters; at most "
                             f"{MAX_METADATA_VALUE_CHARS} are allowed", "metadata")


def _parse_lines(content: bytes, endpoint: str) -> list[tuple[str | None, str | None, str | None]]:
    """The input file's requests in order: (custom_id, body JSON or None, error message or None) for
    each non-empty line. StoreError 400 for more than MAX_LINES lines or none at all."""
    raw = [(n, text) for n, text in enumerate(content.split(b"\n"), 1) if text.strip()]
    if len(raw) > MAX_LINES:
        raise StoreError(400, f"the input file has {len(raw)} requests; a batch may have at most {MAX_LINES}",
                         "input_file_id")
    if not raw:
        raise StoreError(400, "the input file has no requests", "input_file_id")
    first_seen: dict[str, int] = {}  # custom_id -> the line number that claimed it
    out: list[tuple[str | None, str | None, str | None]] = []
    for n, text in raw:
        custom_id: str | None = None
        try:
            obj = json.loads(text.decode("utf-8"))
        except UnicodeDecodeError:
            out.append((None, None, f"line {n}: not UTF-8 text"))
            continue
        except json.JSONDecodeError as e:
            out.append((None, None, f"line {n}: not valid JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(obj, dict):
            out.append((None, None, f"line {n}: expected a JSON object, got {type(obj).__name__}"))
            continue
        if isinstance(obj.get("custom_id"), str):
            custom_id = obj["custom_id"]
        problem = None
        if custom_id is None:
            problem = "custom_id must be a string"
        elif custom_id in first_seen:
            problem = f"duplicate custom_id {custom_id!r} (first on line {first_seen[custom_id]})"
        elif obj.get("method") != "POST":
            problem = f"method must be \"POST\", got {obj.get('method')!r}"
        elif obj.get("url") != endpoint:
            problem = f"url {obj.get('url')!r} is not the batch's endpoint {endpoint!r}"
        elif not isinstance(obj.get("body"), dict):
            problem = "body must be a JSON object"
        if custom_id is not None and custom_id not in first_seen:
            first_seen[custom_id] = n
        if problem is None:
            out.append((custom_id, _dumps(obj["body"]), None))
        else:
            out.append((custom_id, None, f"line {n}: {problem}"))
    return out


class BatchStore:
    """Files, batches and their lines; safe to call from several threads (one connection behind a lock)."""

    def __init__(self, root: Path, clock: Callable[[], float] = time.time) -> None:
        """Creates ``root/files/`` and ``root/batches.sqlite`` (schema IF NOT EXISTS: a second store on
        the same root sees everything). OSError or sqlite3.Error propagate."""
        self.root = Path(root)
        self.files_dir = self.root / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._lock = threading.Lock()
        self._finalizing: set[str] = set()  # batches being finalized by this object (files written unlocked)
        self._db = sqlite3.connect(str(self.root / "batches.sqlite"), timeout=10.0, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")  # in WAL mode: durable against a process crash
            self._db.executescript(_SCHEMA)
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            self._db.commit()
            self._sweep()
        except BaseException:
            self._db.close()
            raise

    def _now(self) -> int:
        return int(self._clock())

    def _sweep(self) -> None:
        """Remove what a crash left: ``.tmp`` files and contents whose row was never committed (a kill
        between the rename and the commit), once older than STALE_TMP_S (by the real clock: file times)."""
        known = {r[0] for r in self._db.execute("SELECT id FROM files")}
        cutoff = time.time() - STALE_TMP_S
        for path in self.files_dir.iterdir():
            if path.name in known:
                continue
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
            except FileNotFoundError:
                pass

    # ---- files -----------------------------------------------------------------------------------

    def _write_content(self, file_id: str, content: bytes) -> None:
        """The bytes on disk under their final name, complete or not at all."""
        tmp = self.files_dir / f"{file_id}.tmp"
        with open(tmp, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.files_dir / file_id)

    def _add_file(self, content: bytes, filename: str, purpose: str, owner: str | None) -> FileObject:
        file_id = "file-" + secrets.token_hex(12)
        self._write_content(file_id, content)
        with self._lock, self._db:
            obj = FileObject(file_id, len(content), self._now(), filename, purpose, owner)
            self._db.execute("INSERT INTO files (id, owner, filename, purpose, bytes, created_at) "
                             "VALUES (?, ?, ?, ?, ?, ?)", (obj.id, owner, filename, purpose, obj.bytes, obj.created_at))
        return obj

    def add_file(self, content: bytes, filename: str, purpose: str, owner: str | None) -> FileObject:
        """An uploaded file. StoreError 400 (param purpose) unless purpose is "batch"; 413 (param file)
        over MAX_FILE_BYTES."""
        if purpose != "batch":
            raise StoreError(400, f"purpose must be 'batch' (the only purpose this server accepts), got {purpose!r}",
                             "purpose")
        if len(content) > MAX_FILE_BYTES:
            raise StoreError(413, f"the file is {len(content)} bytes; at most {MAX_FILE_BYTES} are allowed", "file")
        return self._add_file(content, filename, purpose, owner)

    def add_output_file(self, content: bytes, filename: str, owner: str | None) -> FileObject:
        """A file the server writes (purpose "batch_output"), without the size limit."""
        return self._add_file(content, filename, "batch_output", owner)

    def get_file(self, file_id: str, owner: str | None) -> FileObject:
        """StoreError 404 if absent or another owner's."""
        with self._lock:
            row = self._db.execute("SELECT id, bytes, created_at, filename, purpose, owner FROM files "
                                   "WHERE id = ? AND owner IS ?", (file_id, owner)).fetchone()
        if row is None:
            raise _no_file(file_id)
        return FileObject(*row)

    def file_path(self, file_id: str, owner: str | None) -> Path:
        """Where the content lies (to stream a large file); 404 as get_file."""
        return self.files_dir / self.get_file(file_id, owner).id

    def file_content(self, file_id: str, owner: str | None) -> bytes:
        path = self.file_path(file_id, owner)
        try:
            return path.read_bytes()
        except FileNotFoundError:  # deleted meanwhile
            raise _no_file(file_id) from None

    def list_files(self, owner: str | None, purpose: str | None = None) -> list[FileObject]:
        """Newest first."""
        with self._lock:
            rows = self._db.execute("SELECT id, bytes, created_at, filename, purpose, owner FROM files "
                                    "WHERE owner IS ? AND (? IS NULL OR purpose = ?) ORDER BY seq DESC",
                                    (owner, purpose, purpose)).fetchall()
        return [FileObject(*r) for r in rows]

    def delete_file(self, file_id: str, owner: str | None) -> None:
        """The row, then the content (a crash between leaves content that the next open sweeps).
        404 as get_file. Batches made from the file are not affected: their lines are in the database."""
        with self._lock, self._db:
            gone = self._db.execute("DELETE FROM files WHERE id = ? AND owner IS ?", (file_id, owner)).rowcount
        if not gone:
            raise _no_file(file_id)
        (self.files_dir / file_id).unlink(missing_ok=True)

    # ---- batches ---------------------------------------------------------------------------------

    def create_batch(self, input_file_id: str, endpoint: str, completion_window: str,
                     metadata: dict[str, str] | None, owner: str | None) -> dict[str, Any]:
        """Validate, parse the input file into lines and store the batch, in_progress. Malformed lines
        and later duplicates of a custom_id become failed lines; the rest run. StoreError: 400 for a bad
        endpoint, completion_window, metadata, a file of another purpose, more than MAX_LINES requests
        or none; 404 for a missing input file. Returns the Batch object."""
        if endpoint not in BATCH_ENDPOINTS:
            raise StoreError(400, f"endpoint must be one of {', '.join(BATCH_ENDPOINTS)}, got {endpoint!r}",
                             "endpoint")
        if completion_window not in WINDOWS:
            raise StoreError(400, f"completion_window must be one of {', '.join(map(repr, WINDOWS))}, "
                             f"got {completion_window!r}", "completion_window")
        _check_metadata(metadata)
        try:
            f = self.get_file(input_file_id, owner)
        except StoreError as e:
            e.param = "input_file_id"
            raise
        if f.purpose != "batch":
            raise StoreError(400, f"file {input_file_id} has purpose {f.purpose!r}; a batch's input file must be "
                             "uploaded with purpose 'batch'", "input_file_id")
        try:
            content = self.file_content(input_file_id, owner)
        except StoreError as e:
            e.param = "input_file_id"
            raise
        parsed = _parse_lines(content, endpoint)  # outside the lock: up to MAX_LINES JSON parses
        batch_id = "batch_" + secrets.token_hex(12)
        num_failed = sum(1 for _, body, _ in parsed if body is None)
        rows = [(batch_id, i, custom_id, body, "pending" if body is not None else "failed",
                 None if error is None else _dumps({"code": "invalid_request", "message": error}))
                for i, (custom_id, body, error) in enumerate(parsed)]
        with self._lock, self._db:
            now = self._now()
            self._db.execute(
                "INSERT INTO batches (id, owner, endpoint, input_file_id, completion_window, window_s, status, "
                "created_at, in_progress_at, expires_at, total, failed, metadata) "
                "VALUES (?, ?, ?, ?, ?, ?, 'in_progress', ?, ?, ?, ?, ?, ?)",
                (batch_id, owner, endpoint, input_file_id, completion_window, WINDOWS[completion_window], now, now,
                 int(now + WINDOWS[completion_window]), len(parsed), num_failed,
                 None if metadata is None else _dumps(metadata)))
            self._db.executemany("INSERT INTO lines (batch_id, idx, custom_id, body, status, error) "
                                 "VALUES (?, ?, ?, ?, ?, ?)", rows)
            return self._dict(batch_id)

    def _dict(self, batch_id: str, owner: str | None = None, check_owner: bool = False) -> dict[str, Any]:
        """OpenAI's Batch object (call with the lock held)."""
        cur = self._db.execute("SELECT * FROM batches WHERE id = ?", (batch_id,))
        row = cur.fetchone()
        if row is None:
            raise _no_batch(batch_id)
        r = dict(zip([d[0] for d in cur.description], row))
        if check_owner and r["owner"] != owner:
            raise _no_batch(batch_id)
        return {
            "id": r["id"], "object": "batch", "endpoint": r["endpoint"], "errors": None,
            "input_file_id": r["input_file_id"], "completion_window": r["completion_window"], "status": r["status"],
            "output_file_id": r["output_file_id"], "error_file_id": r["error_file_id"],
            **{k: None if r[k] is None else int(r[k]) for k in _BATCH_TIMES},
            "request_counts": {"total": r["total"], "completed": r["completed"], "failed": r["failed"]},
            "metadata": None if r["metadata"] is None else json.loads(r["metadata"]),
            "usage": {"usd": r["usd"], "prompt_tokens": r["prompt_tokens"],
                      "completion_tokens": r["completion_tokens"], "total_tokens": r["total_tokens"]},
        }

    def batch_dict(self, batch_id: str, owner: str | None) -> dict[str, Any]:
        """The Batch object; StoreError 404 if absent or another owner's."""
        with self._lock:
            return self._dict(batch_id, owner, check_owner=True)

    def list_batches(self, owner: str | None, after: str | None = None,
                     limit: int = 20) -> tuple[list[dict[str, Any]], bool]:
        """(page, has_more), newest first; ``after``: a batch id, the page starts with the batches created
        before it. StoreError 400 (param limit) outside 1..100, 404 (param after) for an unknown id."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 100:
            raise StoreError(400, f"limit must be an integer from 1 to 100, got {limit!r}", "limit")
        with self._lock:
            below = None
            if after is not None:
                row = self._db.execute("SELECT seq FROM batches WHERE id = ? AND owner IS ?", (after, owner)).fetchone()
                if row is None:
                    raise StoreError(404, f"No such Batch object: {after}", "after")
                below = row[0]
            ids = [r[0] for r in self._db.execute(
                "SELECT id FROM batches WHERE owner IS ? AND (? IS NULL OR seq < ?) ORDER BY seq DESC LIMIT ?",
                (owner, below, below, limit + 1))]
            return [self._dict(i) for i in ids[:limit]], len(ids) > limit

    def cancel(self, batch_id: str, owner: str | None) -> dict[str, Any]:
        """in_progress (or validating) -> cancelling; cancelling or finalizing: returned as it is; a
        finished batch: StoreError 409. The runner finalizes a cancelling batch once its lines in flight
        are back."""
        with self._lock, self._db:
            b = self._dict(batch_id, owner, check_owner=True)
            if b["status"] in _FINISHED:
                raise StoreError(409, f"cannot cancel a batch that is {b['status']}", "batch_id")
            if b["status"] in ("in_progress", "validating") and b["finalizing_at"] is None:  # not expiring now
                self._db.execute("UPDATE batches SET status = 'cancelling', cancelling_at = ? WHERE id = ?",
                                 (self._now(), batch_id))
                b = self._dict(batch_id)
            return b

    def active_batches(self) -> list[str]:
        """Ids of the batches the runner works on (in_progress, cancelling, finalizing), oldest first."""
        with self._lock:
            return [r[0] for r in self._db.execute(
                "SELECT id FROM batches WHERE status IN ('in_progress', 'cancelling', 'finalizing') ORDER BY seq")]

    def batch_row(self, batch_id: str) -> dict[str, Any]:
        """What the runner needs, without an owner check: id, endpoint, status, owner, created_at,
        expires_at, window_s, finalizing (bool), pending (lines). StoreError 404 if absent."""
        with self._lock:
            row = self._db.execute("SELECT id, endpoint, status, owner, created_at, expires_at, window_s, "
                                   "finalizing_at IS NOT NULL FROM batches WHERE id = ?", (batch_id,)).fetchone()
            if row is None:
                raise _no_batch(batch_id)
            pending = self._db.execute("SELECT COUNT(*) FROM lines WHERE batch_id = ? AND status = 'pending'",
                                       (batch_id,)).fetchone()[0]
        keys = ("id", "endpoint", "status", "owner", "created_at", "expires_at", "window_s")
        return {**dict(zip(keys, row)), "finalizing": bool(row[7]), "pending": pending}

    def pending_lines(self, batch_id: str, limit: int, after: int | None = None) -> list[Line]:
        """Up to ``limit`` pending lines by index (``after``: only indexes above it, to skip the lines the
        runner already has in flight)."""
        with self._lock:
            rows = self._db.execute("SELECT idx, custom_id, body FROM lines WHERE batch_id = ? AND status = 'pending' "
                                    "AND idx > ? ORDER BY idx LIMIT ?",
                                    (batch_id, -1 if after is None else after, limit)).fetchall()
        return [Line(batch_id, idx, custom_id, json.loads(body), "pending") for idx, custom_id, body in rows]

    def finish_line(self, batch_id: str, index: int, response: dict[str, Any] | None, error: dict[str, Any] | None,
                    status_code: int, usd: float = 0.0, usage: dict[str, Any] | None = None) -> bool:
        """Record a line's result in one transaction: "done" for a response with status_code 200 and no
        error; otherwise "failed" (``error`` {"code", "message"}, or else taken from the response body's
        "error"). ``usd`` and ``usage`` (default: the response's "usage") add to the batch's usage.
        False, changing nothing, if the line is not pending or the batch no longer takes lines
        (finalizing or finished): a line is never counted twice."""
        if response is None and error is None:
            raise ValueError("finish_line needs a response or an error")
        done = error is None and status_code == 200
        if not done and error is None:
            e = response.get("error") if isinstance(response, dict) else None
            e = e if isinstance(e, dict) else {}
            error = {"code": e.get("code") or e.get("type") or "request_failed",
                     "message": e.get("message") or f"the request failed with status {status_code}"}
        if usage is None and isinstance(response, dict) and isinstance(response.get("usage"), dict):
            usage = response["usage"]
        tokens = [int((usage or {}).get(k) or 0) for k in ("prompt_tokens", "completion_tokens", "total_tokens")]
        with self._lock, self._db:
            row = self._db.execute("SELECT status, finalizing_at FROM batches WHERE id = ?", (batch_id,)).fetchone()
            if row is None:
                raise _no_batch(batch_id)
            if row[0] not in _ACCEPTING or row[1] is not None:
                return False
            changed = self._db.execute(
                "UPDATE lines SET status = ?, status_code = ?, response = ?, error = ? "
                "WHERE batch_id = ? AND idx = ? AND status = 'pending'",
                ("done" if done else "failed", status_code, None if response is None else _dumps(response),
                 None if done else _dumps(error), batch_id, index)).rowcount
            if not changed:
                return False
            self._db.execute("UPDATE batches SET completed = completed + ?, failed = failed + ?, usd = usd + ?, "
                             "prompt_tokens = prompt_tokens + ?, completion_tokens = completion_tokens + ?, "
                             "total_tokens = total_tokens + ? WHERE id = ?",
                             (int(done), int(not done), float(usd), *tokens, batch_id))
            return True

    def requeue_running(self) -> None:
        """Nothing to do, kept as the runner's start-up hook: a line is only pending, done or failed, and
        one in flight when the server died is still pending, so ``pending_lines`` hands it out again."""

    def finalize(self, batch_id: str) -> dict[str, Any]:
        """Write the output file (done lines) and the error file (failed lines), each only if non-empty,
        in line order and OpenAI's format, and end the batch: "cancelled" if it was cancelling (its
        pending lines are in neither file), else "completed" when nothing is pending, else "expired" once
        past expires_at (its pending lines go to the error file as failed, code "batch_expired").
        ValueError for an in_progress batch with pending lines before its expiry. A finished batch is
        returned unchanged; so is one this object is finalizing in another thread."""
        with self._lock, self._db:
            b = self._dict(batch_id)
            if b["status"] in _FINISHED or batch_id in self._finalizing:
                return b
            pending = self._db.execute("SELECT COUNT(*) FROM lines WHERE batch_id = ? AND status = 'pending'",
                                       (batch_id,)).fetchone()[0]
            now = self._now()
            if b["cancelling_at"] is not None:
                outcome = "cancelled"
            elif pending == 0:
                outcome = "completed"
            elif now >= b["expires_at"]:
                outcome = "expired"
            else:
                raise ValueError(f"{batch_id} has {pending} pending lines and is neither cancelling nor expired")
            # committed before the files are written: no line is taken from here on, and a crash
            # leaves the batch active, to be finalized again with the same outcome
            self._db.execute("UPDATE batches SET finalizing_at = COALESCE(finalizing_at, ?), status = ? WHERE id = ?",
                             (now, "finalizing" if outcome == "completed" else b["status"], batch_id))
            rows = self._db.execute("SELECT idx, custom_id, status, status_code, response, error FROM lines "
                                    "WHERE batch_id = ? ORDER BY idx", (batch_id,)).fetchall()
            owner = self._db.execute("SELECT owner FROM batches WHERE id = ?", (batch_id,)).fetchone()[0]
            self._finalizing.add(batch_id)
        try:
            expired = {"code": "batch_expired",
                       "message": "This request could not be executed before the completion window expired."}
            output, errors, newly_failed = [], [], []
            for idx, custom_id, status, status_code, response, error in rows:
                out: dict[str, Any] = {"id": "batch_req_" + secrets.token_hex(12), "custom_id": custom_id}
                if status == "done":
                    body = json.loads(response)
                    out["response"] = {"status_code": status_code, "request_id": body.get("id"), "body": body}
                    out["error"] = None
                    output.append(out)
                    continue
                if status == "pending":
                    if outcome != "expired":
                        continue  # cancelled: not run, in neither file
                    newly_failed.append((_dumps(expired), batch_id, idx))
                    err = expired
                else:
                    err = json.loads(error)
                if status_code is None:
                    out["response"] = None
                else:
                    out["response"] = {"status_code": status_code, "request_id": None,
                                       "body": json.loads(response) if response is not None else {"error": err}}
                out["error"] = {"code": err.get("code"), "message": err.get("message")}
                errors.append(out)
            files = {}
            for kind, items in (("output", output), ("error", errors)):
                if items:
                    content = "".join(_dumps(o) + "\n" for o in items).encode("utf-8")
                    files[kind] = self.add_output_file(content, f"{batch_id}_{kind}.jsonl", owner).id
            with self._lock, self._db:
                self._db.executemany("UPDATE lines SET status = 'failed', error = ? "
                                     "WHERE batch_id = ? AND idx = ? AND status = 'pending'", newly_failed)
                ended_at = {"completed": "completed_at", "cancelled": "cancelled_at", "expired": "expired_at"}[outcome]
                self._db.execute(f"UPDATE batches SET status = ?, output_file_id = ?, error_file_id = ?, "
                                 f"failed = failed + ?, {ended_at} = ? WHERE id = ?",
                                 (outcome, files.get("output"), files.get("error"), len(newly_failed), self._now(),
                                  batch_id))
                return self._dict(batch_id)
        finally:
            with self._lock:
                self._finalizing.discard(batch_id)

    def close(self) -> None:
        with self._lock:
            self._db.close()
