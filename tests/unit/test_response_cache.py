"""gateway/cache.py: which requests are cacheable, their keys, and the SQLite store (TTL, byte cap,
LRU eviction order, persistence), pinned exactly with an injected clock."""

from __future__ import annotations

import hashlib
import sqlite3
import threading

import pytest

from leanserve.gateway.cache import CacheConfig, CacheEntry, ResponseCache, cache_key, cacheable


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make(tmp_path, clock: Clock, **kw) -> ResponseCache:
    return ResponseCache(CacheConfig(tmp_path / "sub" / "response_cache.sqlite", **kw), clock)


def resp(k: int) -> dict:
    """A response whose stored JSON, {"t":"xx..."}, is k + 8 bytes."""
    return {"t": "x" * k}


# ---- config --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, msg", [({"ttl_s": 0}, "ttl_s must be > 0, got 0"),
                                     ({"ttl_s": float("nan")}, "ttl_s must be > 0, got nan"),
                                     ({"max_bytes": 0}, "max_bytes must be an integer > 0, got 0"),
                                     ({"max_bytes": 1.5}, "max_bytes must be an integer > 0, got 1.5")])
def test_config_is_validated(tmp_path, kw, msg):
    with pytest.raises(ValueError, match=msg):
        CacheConfig(tmp_path / "c.sqlite", **kw)


# ---- cacheable -----------------------------------------------------------------------------------

@pytest.mark.parametrize("body, expected", [
    ({}, False),  # OpenAI's default temperature is 1
    ({"temperature": 0}, True),
    ({"temperature": 0.0, "stream": True}, True),
    ({"temperature": 1e-6}, False),
    ({"temperature": 1}, False),
    ({"temperature": None}, False),
    ({"temperature": "0"}, False),
    ({"temperature": False}, False),
    ({"seed": 3}, True),
    ({"temperature": 0.7, "seed": -1}, True),
    ({"seed": None}, False),
    ({"seed": "3"}, False),
    ({"seed": True}, False),
    ({"seed": 3.0}, False),
    ({"temperature": 0, "n": 2}, True),
    ({"temperature": 0, "n": 0}, False),
    ({"temperature": 0, "n": 1.0}, False),
    ({"temperature": 0, "n": None}, False),
])
def test_cacheable(body, expected):
    assert cacheable(body) is expected


# ---- keys ----------------------------------------------------------------------------------------

BASE = {"model": "m", "messages": [{"role": "user", "content": "a\nb"}], "temperature": 0, "max_tokens": 5,
        "stop": "\n"}


def test_key_is_the_sha256_of_the_canonical_request():
    canonical = ('{"body":{"max_tokens":5,"messages":[{"content":"a\\nb","role":"user"}],"stop":["\\n"],'
                 '"temperature":0},"endpoint":"chat","model":"m","scope":"k1","v":1}')
    assert cache_key("k1", "m", "chat", BASE) == hashlib.sha256(canonical.encode()).hexdigest()
    body = {"prompt": "é", "temperature": 0}  # ensure_ascii=False: the UTF-8 of the character itself
    assert cache_key(None, "m", "completions", body) == hashlib.sha256(
        '{"body":{"prompt":"é","temperature":0},"endpoint":"completions","model":"m","scope":null,"v":1}'
        .encode()).hexdigest()


@pytest.mark.parametrize("same", [
    {**BASE, "stream": True},
    {**BASE, "stream": True, "stream_options": {"include_usage": True}},
    {**BASE, "user": "u", "metadata": {"a": "b"}, "priority": 3, "store": True, "service_tier": "auto"},
    {**BASE, "model": "another-name"},  # the model is given separately
    dict(reversed(list(BASE.items()))),
    {**BASE, "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"text": "b", "type": "text"}]}]},
    {**BASE, "stop": ["\n"]},
    {k: v for k, v in BASE.items() if k != "max_tokens"} | {"max_completion_tokens": 5},
    {**BASE, "max_tokens": 7, "max_completion_tokens": 5},  # the newer name wins, as in serve/protocol.py
])
def test_key_ignores_what_does_not_change_the_answer(same):
    assert cache_key("k1", "m", "chat", same) == cache_key("k1", "m", "chat", BASE)


@pytest.mark.parametrize("other", [
    {**BASE, "temperature": 0.0},  # not normalized: a miss is cheap
    {**BASE, "seed": 1},
    {**BASE, "max_tokens": 6},
    {**BASE, "max_completion_tokens": 6},
    {**BASE, "messages": [{"role": "user", "content": "a b"}]},
    {**BASE, "messages": [{"role": "system", "content": "a\nb"}]},
    {**BASE, "messages": [{"role": "user", "content": "a\nb", "name": "x"}]},
    {**BASE, "messages": [{"role": "user", "content": [{"type": "text", "text": "a\nb", "cache_control": {}}]}]},
    {**BASE, "logprobs": False},
    {**BASE, "stop": ["\n", "."]},
])
def test_key_changes_with_what_may_change_the_answer(other):
    assert cache_key("k1", "m", "chat", other) != cache_key("k1", "m", "chat", BASE)


def test_key_changes_with_scope_model_and_endpoint():
    keys = {cache_key("k1", "m", "chat", BASE), cache_key("k2", "m", "chat", BASE),
            cache_key(None, "m", "chat", BASE), cache_key("k1", "m2", "chat", BASE),
            cache_key("k1", "m", "completions", BASE)}
    assert len(keys) == 5


def test_completions_max_completion_tokens_is_not_max_tokens():
    # the completions API has no max_completion_tokens: it must not pass for max_tokens there
    body = {"prompt": "p", "temperature": 0}
    assert (cache_key(None, "m", "completions", {**body, "max_tokens": 5})
            != cache_key(None, "m", "completions", {**body, "max_completion_tokens": 5}))


def test_key_does_not_change_the_body():
    body = {**BASE, "stream": True, "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]}
    before = repr(body)
    cache_key(None, "m", "chat", body)
    assert repr(body) == before


# ---- the store -----------------------------------------------------------------------------------

def test_put_get_round_trip(tmp_path):
    clock = Clock(1000.0)
    cache = make(tmp_path, clock)
    response = {"id": "r", "choices": [{"index": 0, "text": "é"}], "usage": {"cost": 0.5}}
    assert cache.get("k") is None
    assert cache.put("k", "m", response, 0.25) is True
    clock.t = 1001.0
    assert cache.get("k") == CacheEntry(response, 0.25, "m", 1000.0, 0)
    assert cache.get("k") == CacheEntry(response, 0.25, "m", 1000.0, 1)
    assert cache.stats() == {"entries": 1, "bytes": len('{"id":"r","choices":[{"index":0,"text":"é"}],'
                                                          '"usage":{"cost":0.5}}'.encode()),
                             "max_bytes": 256 * 2**20, "ttl_s": 86400.0, "hits": 2, "misses": 1, "stores": 1,
                             "evictions": 0, "expired": 0}


def test_replacing_a_key_starts_the_entry_over(tmp_path):
    clock = Clock(1000.0)
    cache = make(tmp_path, clock)
    cache.put("k", "m", resp(10), 1.0)
    cache.get("k")
    clock.t = 1005.0
    cache.put("k", "m2", resp(20), 2.0)
    assert cache.get("k") == CacheEntry(resp(20), 2.0, "m2", 1005.0, 0)
    assert cache.stats()["entries"] == 1 and cache.stats()["bytes"] == 28


def test_ttl_runs_from_created_and_a_hit_does_not_extend_it(tmp_path):
    clock = Clock(1000.0)
    cache = make(tmp_path, clock, ttl_s=10.0)
    cache.put("k", "m", resp(1), 0.0)
    clock.t = 1009.5
    assert cache.get("k") is not None
    clock.t = 1010.0  # exactly ttl_s after it was stored: expired
    assert cache.get("k") is None
    assert cache.stats() == {"entries": 0, "bytes": 0, "max_bytes": 256 * 2**20, "ttl_s": 10.0, "hits": 1,
                                  "misses": 1, "stores": 1, "evictions": 0, "expired": 1}


def test_put_drops_expired_entries_first(tmp_path):
    clock = Clock(1000.0)
    cache = make(tmp_path, clock, ttl_s=10.0, max_bytes=100)
    cache.put("old", "m", resp(22), 0.0)  # 30 bytes
    clock.t = 1005.0
    cache.put("mid", "m", resp(22), 0.0)
    clock.t = 1012.0
    cache.put("new", "m", resp(52), 0.0)  # 60 bytes: "old" has expired, so nothing live is evicted
    s = cache.stats()
    assert (s["entries"], s["bytes"], s["expired"], s["evictions"]) == (2, 90, 1, 0)
    assert cache.get("mid") is not None and cache.get("old") is None


def test_byte_cap_evicts_least_recently_used_first(tmp_path):
    clock = Clock(1.0)
    cache = make(tmp_path, clock, max_bytes=100)
    for t, key in ((1.0, "a"), (2.0, "b"), (3.0, "c")):
        clock.t = t
        assert cache.put(key, "m", resp(22), 0.0)  # 30 bytes each
    clock.t = 4.0
    assert cache.get("a") is not None  # a is now the most recently used
    clock.t = 5.0
    assert cache.put("d", "m", resp(22), 0.0)  # 120 > 100: b goes
    assert [k for k in "abcd" if cache.get(k) is not None] == ["a", "c", "d"]  # gets at t=5: all used now
    clock.t = 6.0
    cache.get("d")
    clock.t = 7.0
    assert cache.put("e", "m", resp(52), 0.0)  # 60 bytes: 150 > 100; a, c (both used at t=5: older created first) go
    assert cache.get("a") is None and cache.get("c") is None
    assert cache.get("d") is not None and cache.get("e") is not None
    s = cache.stats()
    assert (s["entries"], s["bytes"], s["evictions"], s["stores"]) == (2, 90, 3, 5)


def test_an_entry_larger_than_the_cap_is_refused(tmp_path):
    clock = Clock()
    cache = make(tmp_path, clock, max_bytes=100)
    cache.put("small", "m", resp(10), 0.0)
    assert cache.put("big", "m", resp(93), 1.0) is False  # 101 bytes
    assert cache.get("big") is None and cache.get("small") is not None
    assert cache.put("exact", "m", resp(92), 1.0) is True  # 100 bytes: fits alone, evicts the rest
    s = cache.stats()
    assert (s["entries"], s["bytes"], s["stores"], s["evictions"]) == (1, 100, 2, 1)


def test_entries_persist_across_instances(tmp_path):
    clock = Clock(1000.0)
    cache = make(tmp_path, clock)
    cache.put("k", "m", {"a": [1, 2]}, 0.125, scope="key-1")
    cache.get("k")
    cache.close()
    again = make(tmp_path, clock)
    assert again.get("k") == CacheEntry({"a": [1, 2]}, 0.125, "m", 1000.0, 1)
    assert again.stats() == {"entries": 1, "bytes": len(b'{"a":[1,2]}'), "max_bytes": 256 * 2**20,
                             "ttl_s": 86400.0, "hits": 1, "misses": 0, "stores": 0, "evictions": 0, "expired": 0}
    again.close()
    db = sqlite3.connect(tmp_path / "sub" / "response_cache.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    rows = db.execute("SELECT scope_model, model, bytes, hits FROM entries").fetchall()
    assert rows == [('["key-1", "m"]', "m", 11, 2)]
    db.close()


def test_a_file_that_is_not_a_database_is_left_alone(tmp_path):
    path = tmp_path / "response_cache.sqlite"
    data = b"my notes, not a database\n" * 100
    path.write_bytes(data)
    with pytest.raises(sqlite3.DatabaseError):
        ResponseCache(CacheConfig(path))
    assert path.read_bytes() == data


def test_threads_share_one_cache(tmp_path):
    cache = make(tmp_path, Clock())
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for j in range(50):
                cache.put(f"{i}-{j}", "m", resp(j), 0.0)
                assert cache.get(f"{i}-{j}") is not None
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    s = cache.stats()
    assert (s["entries"], s["stores"], s["hits"]) == (400, 400, 400)
