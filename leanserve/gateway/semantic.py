"""The response cache's second stage: an entry found by the embedding of a request's text.

When the exact key misses, a request whose text is the same question asked a little differently
can still find an answer: its text (a completion's prompt, or a chat's last user message) is
normalized (case-folded, punctuation dropped, whitespace collapsed) and embedded by a served model
(/v1/embeddings' vectors: unit length), and the nearest stored text with the same everything-else
(the conversation before the last message, every sampling field, the model, the caller's key) is
taken when its cosine similarity reaches the threshold.

    group = semantic_group(scope, model, endpoint, body)   # None: no text to match (token ids...)
    text = semantic_text(endpoint, body)
    found = index.search(group, vector)                      # (exact key, similarity) | None
    index.add(group, key, vector)                            # after the exact entry is stored

The vectors live in the cache's SQLite file (table ``semantic``), so they survive restarts like the
entries; in memory, one matrix per group, searched by one matrix-vector product. A vector whose
entry has expired or been evicted is dropped when a search finds it.

The default threshold is measured, not guessed: docs/gateway.md gives the false-hit rate over
3,000 distinct TriviaQA questions and the hit rate on trivially varied repeats.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np

from leanserve.gateway.cache import KEY_VERSION, normalize

DEFAULT_THRESHOLD = 0.9995
PRUNE_MIN = 1024  # vectors before the first pruning pass; then whenever they double

_SCHEMA = """
CREATE TABLE IF NOT EXISTS semantic (
    key TEXT PRIMARY KEY,      -- the exact entry's key (entries.key)
    grp TEXT NOT NULL,         -- sha256 of everything but the text: who, which model, which parameters
    vector BLOB NOT NULL       -- float32, unit length
);
CREATE INDEX IF NOT EXISTS semantic_grp ON semantic (grp);
"""


def normalize_text(text: str) -> str:
    """What is embedded: case-folded, punctuation deleted (so "who's" and "whos", "Jean-Paul" and
    "JeanPaul" are one text), symbols and whitespace runs made one space."""
    out = []
    for c in text.casefold():
        cat = unicodedata.category(c)[0]
        if cat == "P":
            continue
        out.append(" " if cat in "SZ" or c.isspace() else c)
    return " ".join("".join(out).split())


def semantic_text(endpoint: str, body: dict[str, Any]) -> str | None:
    """The text a request is matched by: a completion's prompt (one string), or a chat's last message
    when it is the user's; None when there is none (token ids, several prompts, a last turn that is
    not the user's)."""
    if endpoint == "completions":
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
            p = p[0]
        return p if isinstance(p, str) and p.strip() else None
    norm = normalize(endpoint, body)
    msgs = norm.get("messages")
    if not isinstance(msgs, list) or not msgs or not isinstance(msgs[-1], dict):
        return None
    last = msgs[-1]
    if last.get("role") != "user" or not isinstance(last.get("content"), str) or not last["content"].strip():
        return None
    return last["content"]


def semantic_group(scope: str | None, model: str, endpoint: str, body: dict[str, Any]) -> str | None:
    """The key of everything but the text, or None when the request has no text to match."""
    if semantic_text(endpoint, body) is None:
        return None
    norm = normalize(endpoint, body)
    if endpoint == "completions":
        norm.pop("prompt", None)
    else:
        norm["messages"] = [*norm["messages"][:-1], {"role": "user"}]
    blob = json.dumps({"v": KEY_VERSION, "semantic": 1, "scope": scope, "model": model, "endpoint": endpoint,
                       "body": norm}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class SemanticIndex:
    """Vectors by group, in the cache's SQLite file and in memory. Thread-safe (one lock)."""

    def __init__(self, path: Path, threshold: float = DEFAULT_THRESHOLD) -> None:
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"the semantic threshold is a cosine similarity in [-1, 1], got {threshold}")
        self.threshold = threshold
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(path), timeout=10.0, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.executescript(_SCHEMA)
        self._groups: dict[str, tuple[list[str], np.ndarray]] = {}
        self._load()
        self._next_prune = max(2 * self._count(), PRUNE_MIN)
        self.searches = 0
        self.found = 0

    def _load(self) -> None:
        self._groups = {}
        for key, grp, blob in self._conn.execute("SELECT key, grp, vector FROM semantic"):
            self._append(grp, key, np.frombuffer(blob, dtype=np.float32))

    def _count(self) -> int:
        return sum(len(k) for k, _ in self._groups.values())

    def _prune(self) -> None:
        """Drop the vectors whose entries expired or were evicted (under the lock): without this, a
        cache that turns over would keep every vector it ever stored."""
        has_entries = self._conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'entries'")
        if has_entries.fetchone() is not None:
            with self._conn:
                self._conn.execute("DELETE FROM semantic WHERE key NOT IN (SELECT key FROM entries)")
            self._load()
        self._next_prune = max(2 * self._count(), PRUNE_MIN)

    def _append(self, grp: str, key: str, vec: np.ndarray) -> None:
        keys, mat = self._groups.get(grp, ([], np.zeros((0, vec.shape[0]), dtype=np.float32)))
        if mat.shape[1] != vec.shape[0]:  # another embedding model wrote this group before: start over
            keys, mat = [], np.zeros((0, vec.shape[0]), dtype=np.float32)
        self._groups[grp] = ([*keys, key], np.vstack([mat, vec[None]]))

    def search(self, grp: str, vector: list[float]) -> tuple[str, float] | None:
        """The stored key nearest to ``vector`` in ``grp`` when its similarity reaches the threshold."""
        v = np.asarray(vector, dtype=np.float32)
        with self._lock:
            self.searches += 1
            keys, mat = self._groups.get(grp, ([], None))
            if not keys or mat is None or mat.shape[1] != v.shape[0]:
                return None
            sims = mat @ v
            i = int(np.argmax(sims))
            if float(sims[i]) < self.threshold:
                return None
            self.found += 1
            return keys[i], float(sims[i])

    def add(self, grp: str, key: str, vector: list[float]) -> None:
        v = np.asarray(vector, dtype=np.float32)
        with self._lock:
            keys, _ = self._groups.get(grp, ([], None))
            if key in keys:
                return
            self._append(grp, key, v)
            with self._conn:
                self._conn.execute("INSERT OR REPLACE INTO semantic VALUES (?, ?, ?)", (key, grp, v.tobytes()))
            if self._count() >= self._next_prune:
                self._prune()

    def drop(self, grp: str, key: str) -> None:
        """Forget a vector whose entry is gone (expired or evicted)."""
        with self._lock:
            keys, mat = self._groups.get(grp, ([], None))
            if key in keys and mat is not None:
                i = keys.index(key)
                self._groups[grp] = (keys[:i] + keys[i + 1:], np.delete(mat, i, axis=0))
            with self._conn:
                self._conn.execute("DELETE FROM semantic WHERE key = ?", (key,))

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"vectors": sum(len(k) for k, _ in self._groups.values()), "threshold": self.threshold,
                    "searches": self.searches, "found": self.found}

    def close(self) -> None:
        with self._lock:
            self._conn.close()
