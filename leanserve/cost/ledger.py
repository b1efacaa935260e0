"""The ledger: one SQLite row per finished request, written off the engine's path.

Every request that reached the engine is recorded when it leaves it -- finished, aborted (client
gone, timeout) or failed -- with what its work cost. The file is SQLite in WAL mode
(``synchronous=NORMAL``: a committed row survives the server being killed); a dedicated writer
thread takes records from a queue and commits them in small batches (whatever is queued at
once), so neither the engine thread nor the event loop ever waits on the disk. A handler that
wants its row on disk before answering awaits ``committed(request_id)``.

Prompt and output text are stored only with ``store_text=True`` (``--ledger-store-text``).
API keys are recorded as ``key_id``: the first 12 hex digits of the key's sha256, never the key.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
import queue
import sqlite3
import threading
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from leanserve import env

log = logging.getLogger("leanserve.ledger")

SCHEMA_VERSION = 2
KEY_ID_LENGTH = 12

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id              TEXT PRIMARY KEY,   -- the response id (cmpl-..., chatcmpl-...)
    ts              REAL NOT NULL,      -- unix time the request left the engine
    key_id          TEXT,               -- sha256(API key)[:12]; NULL without auth
    model           TEXT NOT NULL,
    prompt_tokens   INTEGER NOT NULL,
    cached_tokens   INTEGER NOT NULL,   -- of prompt_tokens, found in the prefix cache (not computed)
    output_tokens   INTEGER NOT NULL,
    machine_seconds REAL NOT NULL,      -- engine time charged to the request
    prefill_seconds REAL NOT NULL,      -- of machine_seconds, the prompt tokens' share
    cost_usd        REAL NOT NULL,      -- machine_seconds * price_per_hour / 3600
    price_per_hour  REAL NOT NULL,
    hardware        TEXT NOT NULL,
    latency_s       REAL,               -- arrival to leaving the engine
    finish_reason   TEXT NOT NULL,      -- stop | length | abort | error
    prompt_text     TEXT,               -- only with --ledger-store-text
    output_text     TEXT,               -- only with --ledger-store-text
    input_usd       REAL,               -- of cost_usd, the prompt's share (NULL in rows of schema 1)
    cache           TEXT,               -- response cache: hit | miss | bypass; NULL: not looked up
    route           TEXT,               -- the route that sent the request here (a cascade's name)
    saved_prefix_usd  REAL NOT NULL DEFAULT 0,  -- what the cached prompt tokens would have cost
    saved_cache_usd   REAL NOT NULL DEFAULT 0,  -- a response-cache hit: what computing the answer cost
    saved_routing_usd REAL NOT NULL DEFAULT 0,  -- a cascade: the largest model's cost minus what was paid
    batch_id        TEXT                -- a line of this batch (/v1/batches); NULL: an interactive request
);
CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def key_id(api_key: str | None) -> str | None:
    """What the ledger stores for an API key: a short sha256 prefix (never the key itself)."""
    if not api_key:
        return None
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()[:KEY_ID_LENGTH]


def default_ledger_path() -> Path:
    return env.home() / "ledger.sqlite"


@dataclass
class LedgerRecord:
    id: str
    ts: float
    key_id: str | None
    model: str
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    machine_seconds: float
    prefill_seconds: float
    cost_usd: float
    price_per_hour: float
    hardware: str
    latency_s: float | None
    finish_reason: str
    prompt_text: str | None = None
    output_text: str | None = None
    input_usd: float | None = None
    cache: str | None = None
    route: str | None = None
    saved_prefix_usd: float = 0.0
    saved_cache_usd: float = 0.0
    saved_routing_usd: float = 0.0
    batch_id: str | None = None

    @property
    def saved_usd(self) -> float:
        return self.saved_prefix_usd + self.saved_cache_usd + self.saved_routing_usd


# columns added after schema 1, with their types: a ledger written by an older server gains them on open
_ADDED = (("input_usd", "REAL"), ("cache", "TEXT"), ("route", "TEXT"),
          ("saved_prefix_usd", "REAL NOT NULL DEFAULT 0"), ("saved_cache_usd", "REAL NOT NULL DEFAULT 0"),
          ("saved_routing_usd", "REAL NOT NULL DEFAULT 0"), ("batch_id", "TEXT"))
AMENDABLE = frozenset({"route", "saved_routing_usd"})  # what Ledger.amend may change after the row is queued

COLUMNS = tuple(f.name for f in fields(LedgerRecord))
_INSERT = f"INSERT OR REPLACE INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


def connect(path: str | os.PathLike[str], create: bool = True) -> sqlite3.Connection:
    """A connection in WAL mode with the schema in place. OSError/sqlite3.Error if it cannot be opened."""
    path = Path(path)
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.is_file():
        raise FileNotFoundError(f"no ledger at {path} (a server writes one unless started with --no-ledger)")
    conn = sqlite3.connect(str(path), timeout=10.0, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 10000")
    if create:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"cannot put the ledger {path} in WAL mode (got {mode})")
        conn.execute("PRAGMA synchronous = NORMAL")  # in WAL mode: durable against a process crash
        conn.executescript(SCHEMA)
        have = {r[1] for r in conn.execute("PRAGMA table_info(requests)")}
        for name, decl in _ADDED:
            if name not in have:
                conn.execute(f"ALTER TABLE requests ADD COLUMN {name} {decl}")
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        conn.commit()
    return conn


class Ledger:
    """The writer: ``record()`` from any thread (never blocks), rows committed by one thread."""

    def __init__(self, path: str | os.PathLike[str], store_text: bool = False) -> None:
        self.path = Path(path)
        self.store_text = store_text
        self._conn = connect(self.path)  # errors surface here, at startup
        # a record to insert, or (request id, {column: value}) to amend, each with its future; None: stop
        self._queue: queue.SimpleQueue[tuple[LedgerRecord | tuple[str, dict], concurrent.futures.Future] | None] = \
            queue.SimpleQueue()
        self.num_written = 0
        self.num_failed = 0
        self._thread = threading.Thread(target=self._run, name="leanserve-ledger", daemon=True)
        self._thread.start()

    def record(self, rec: LedgerRecord) -> concurrent.futures.Future:
        """Queue one row. The future is done once it is committed (or failed: the error is logged)."""
        if not self.store_text:
            rec.prompt_text = rec.output_text = None
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((rec, fut))
        return fut

    def amend(self, request_id: str, **values: object) -> concurrent.futures.Future:
        """Queue a change to a row queued before (the one writer keeps the order): what the gateway learns
        after the request left its engine (the cascade it was part of, what routing saved)."""
        bad = set(values) - AMENDABLE
        if bad:
            raise ValueError(f"ledger rows cannot be amended in {sorted(bad)}")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(((request_id, values), fut))
        return fut

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the writer."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)

    def _run(self) -> None:
        stop = False
        while not stop:
            item = self._queue.get()
            batch = []
            while True:
                if item is None:
                    stop = True
                else:
                    batch.append(item)
                if len(batch) >= 256:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._write(batch)
        self._conn.close()

    def _write(self, batch: list[tuple[LedgerRecord | tuple[str, dict], concurrent.futures.Future]]) -> None:
        error: BaseException | None = None
        try:
            with self._conn:  # one transaction, committed on exit, in queue order
                for r, _ in batch:
                    if isinstance(r, LedgerRecord):
                        self._conn.execute(_INSERT, tuple(asdict(r).values()))
                    else:
                        rid, values = r
                        sets = ", ".join(f"{k} = ?" for k in values)
                        self._conn.execute(f"UPDATE requests SET {sets} WHERE id = ?", (*values.values(), rid))
            self.num_written += len(batch)
        except Exception as e:  # noqa: BLE001 - a full disk must not stop serving
            error = e
            self.num_failed += len(batch)
            log.error("could not write %d ledger row(s) to %s: %s", len(batch), self.path, e)
        for _, fut in batch:
            if fut.set_running_or_notify_cancel():  # False: the waiter gave up (cancelled it)
                if error is None:
                    fut.set_result(True)
                else:
                    fut.set_exception(error)
