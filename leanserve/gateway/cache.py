"""The exact-match response cache: a request whose answer is determined (temperature 0, or a seed)
and was answered before gets the stored answer again, for nothing.

    if cacheable(body):
        key = cache_key(api_key_id, model, "chat", body)
        hit = cache.get(key)            # CacheEntry | None
        ...
        cache.put(key, model, whole_response, cost_usd)

One SQLite file (``$LEANSERVE_HOME/response_cache.sqlite`` in the server), so answers survive a
restart. Entries expire ``ttl_s`` after they were stored (a hit does not extend that); the table's
JSON is capped at ``max_bytes``, the least recently used entries evicted first.

The key is a sha256 of the request with the fields that cannot change the answer dropped
(``stream``, ``user``, ...) and a few spellings of the same request made one. Normalization is
deliberately narrow: a missed hit costs one computation, a wrong hit returns someone the wrong answer.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KEY_VERSION = 1  # part of every key: bump it when normalization changes, and old entries stop matching
# request fields that change how an answer is delivered, billed or scheduled, never what it says
IGNORED_FIELDS = frozenset({"stream", "stream_options", "user", "metadata", "priority", "store", "model",
                            "service_tier"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    scope_model TEXT,          -- JSON [scope, model]: whose entry, for which model
    model TEXT NOT NULL,
    response TEXT NOT NULL,    -- the whole (non-streamed) response as JSON
    bytes INTEGER NOT NULL,    -- len(response) in UTF-8: what max_bytes counts
    cost_usd REAL NOT NULL,    -- what computing it cost
    created REAL NOT NULL,     -- unix time stored; the TTL runs from here
    last_used REAL NOT NULL,   -- unix time stored or last hit; eviction takes the oldest first
    hits INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS entries_last_used ON entries (last_used);
"""


@dataclass(frozen=True)
class CacheConfig:
    path: Path  # the SQLite file (the server puts it beside the ledger)
    ttl_s: float = 24 * 3600.0
    max_bytes: int = 256 * 2**20

    def __post_init__(self) -> None:
        if not self.ttl_s > 0:
            raise ValueError(f"response cache ttl_s must be > 0, got {self.ttl_s}")
        if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int) or self.max_bytes <= 0:
            raise ValueError(f"response cache max_bytes must be an integer > 0, got {self.max_bytes!r}")


@dataclass(frozen=True)
class CacheEntry:
    response: dict[str, Any]  # the whole response (non-streamed shape) as first computed
    cost_usd: float  # what computing it cost (usage.cost of the original, summed over attempts)
    model: str
    created: float  # unix time stored
    hits: int  # hits before this one


# ---- which requests, under which key -------------------------------------------------------------

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def cacheable(body: dict[str, Any]) -> bool:
    """True when the answer is determined by the request: ``temperature`` explicitly 0 (OpenAI's
    default is 1) or an integer ``seed``; and ``n`` (default 1) an integer >= 1."""
    temperature = body.get("temperature")
    greedy = isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature == 0
    n = body.get("n", 1)
    return (greedy or _is_int(body.get("seed"))) and _is_int(n) and n >= 1


def _text_parts(content: Any) -> str | None:
    """A list of plain text parts as the one string leanserve reads them as (joined with newlines,
    serve/protocol.py ChatMessage.to_template); None for anything else."""
    if not isinstance(content, list):
        return None
    if not all(isinstance(p, dict) and p.keys() == {"type", "text"} and p["type"] == "text"
               and isinstance(p["text"], str) for p in content):
        return None  # an image, or a part with more keys than type and text: keep it as it is
    return "\n".join(p["text"] for p in content)


def normalize(endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    """The request as far as its answer is concerned (a new dict; ``body`` is not changed)."""
    out = {k: v for k, v in body.items() if k not in IGNORED_FIELDS}
    if isinstance(out.get("stop"), str):
        out["stop"] = [out["stop"]]
    if endpoint == "chat":
        # one limit under two names; the newer one wins when both are set (serve/protocol.py)
        newer, older = out.pop("max_completion_tokens", None), out.pop("max_tokens", None)
        limit = newer if newer is not None else older
        if limit is not None:
            out["max_tokens"] = limit
        messages = out.get("messages")
        if isinstance(messages, list):
            out["messages"] = [
                {**m, "content": text} if isinstance(m, dict) and (text := _text_parts(m.get("content"))) is not None
                else m
                for m in messages]
    return out


def cache_key(scope: str | None, model: str, endpoint: str, body: dict[str, Any]) -> str:
    """sha256 hex of the canonical JSON of the normalized request. ``scope``: the API key's id
    (different keys never share entries; None without auth)."""
    doc = {"v": KEY_VERSION, "scope": scope, "model": model, "endpoint": endpoint, "body": normalize(endpoint, body)}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---- the store -----------------------------------------------------------------------------------

class ResponseCache:
    """The SQLite store, safe to call from several threads (one connection behind a lock)."""

    def __init__(self, config: CacheConfig, clock: Callable[[], float] = time.time) -> None:
        """Creates the directory, the file and the table. OSError or sqlite3.Error propagate; a file
        that is not an SQLite database raises sqlite3.DatabaseError and is left as it is."""
        self.config = config
        self._clock = clock
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(("hits", "misses", "stores", "evictions", "expired"), 0)
        path = Path(config.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), timeout=10.0, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode = WAL")  # the first read of the file: a non-database fails here
            self._db.execute("PRAGMA synchronous = NORMAL")  # in WAL mode: durable against a process crash
            self._db.executescript(_SCHEMA)
            self._db.commit()
        except BaseException:
            self._db.close()
            raise

    def get(self, key: str) -> CacheEntry | None:
        """The entry, or None if absent or expired (an expired row is deleted). A hit counts and
        makes the entry the most recently used."""
        with self._lock, self._db:
            row = self._db.execute("SELECT response, cost_usd, model, created, hits FROM entries WHERE key = ?",
                                   (key,)).fetchone()
            now = self._clock()
            if row is not None and now - row[3] >= self.config.ttl_s:
                self._db.execute("DELETE FROM entries WHERE key = ?", (key,))
                self._counts["expired"] += 1
                row = None
            if row is None:
                self._counts["misses"] += 1
                return None
            self._db.execute("UPDATE entries SET hits = hits + 1, last_used = ? WHERE key = ?", (now, key))
            self._counts["hits"] += 1
        response, cost_usd, model, created, hits = row
        return CacheEntry(json.loads(response), cost_usd, model, created, hits)

    def put(self, key: str, model: str, response: dict[str, Any], cost_usd: float, *,
            scope: str | None = None) -> bool:
        """Store (or replace) an entry. False, storing nothing, if it alone exceeds max_bytes. Expired
        entries are dropped first, then the least recently used ones until the total fits."""
        text = json.dumps(response, ensure_ascii=False, separators=(",", ":"))
        size = len(text.encode("utf-8"))
        if size > self.config.max_bytes:
            return False
        scope_model = json.dumps([scope, model], ensure_ascii=False)
        with self._lock, self._db:
            now = self._clock()
            gone = self._db.execute("DELETE FROM entries WHERE ? - created >= ?", (now, self.config.ttl_s))
            self._counts["expired"] += gone.rowcount
            self._db.execute("INSERT OR REPLACE INTO entries (key, scope_model, model, response, bytes, cost_usd, "
                             "created, last_used, hits) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0)",
                             (key, scope_model, model, text, size, float(cost_usd), now, now))
            total = self._db.execute("SELECT SUM(bytes) FROM entries").fetchone()[0]
            if total > self.config.max_bytes:
                oldest = self._db.execute("SELECT key, bytes FROM entries WHERE key != ? "
                                          "ORDER BY last_used, created, key", (key,)).fetchall()
                victims = []
                for victim, nbytes in oldest:
                    if total <= self.config.max_bytes:
                        break
                    victims.append((victim,))
                    total -= nbytes
                self._db.executemany("DELETE FROM entries WHERE key = ?", victims)
                self._counts["evictions"] += len(victims)
            self._counts["stores"] += 1
        return True

    def stats(self) -> dict[str, Any]:
        """entries and bytes in the table now; hits, misses, stores, evictions and expired counted
        by this object since it was made."""
        with self._lock:
            entries, nbytes = self._db.execute("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM entries").fetchone()
            return {"entries": entries, "bytes": nbytes, "max_bytes": self.config.max_bytes,
                    "ttl_s": self.config.ttl_s, **self._counts}

    def close(self) -> None:
        with self._lock:
            self._db.close()
