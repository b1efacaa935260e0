"""The response cache's semantic stage: what text a request is matched by, its group, the index."""

from __future__ import annotations

import numpy as np
import pytest

from leanserve.gateway.semantic import SemanticIndex, normalize_text, semantic_group, semantic_text


def unit(*xs: float) -> list[float]:
    v = np.asarray(xs, dtype=np.float64)
    return list(v / np.linalg.norm(v))


def test_normalize_text_folds_case_punctuation_and_whitespace():
    assert normalize_text("  Who WROTE   Hamlet?\nAnswer: ") == "who wrote hamlet answer"
    assert normalize_text("Who's Jean-Paul?") == normalize_text("whos JeanPaul") == "whos jeanpaul"
    assert normalize_text("Straße, naïve — café! 3+4") == "strasse naïve café 3 4"
    assert normalize_text("?!...") == ""


def test_the_matched_text_is_the_prompt_or_the_last_user_message():
    assert semantic_text("completions", {"prompt": "Hi there"}) == "Hi there"
    assert semantic_text("completions", {"prompt": ["Hi there"]}) == "Hi there"
    assert semantic_text("completions", {"prompt": [1, 2, 3]}) is None  # token ids: exact matches only
    assert semantic_text("completions", {"prompt": ["a", "b"]}) is None
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Peru?"}]}
    assert semantic_text("chat", chat) == "Capital of Peru?"
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Capital of Peru?"}]}]}
    assert semantic_text("chat", parts) == "Capital of Peru?"
    assert semantic_text("chat", {"messages": [{"role": "assistant", "content": "x"}]}) is None


def test_the_group_is_everything_but_the_text():
    a = {"prompt": "Who wrote Hamlet?", "temperature": 0, "max_tokens": 8}
    g = semantic_group("k1", "m", "completions", a)
    assert g == semantic_group("k1", "m", "completions", {**a, "prompt": "who wrote hamlet", "stream": True})
    assert g != semantic_group("k2", "m", "completions", a)  # another API key
    assert g != semantic_group("k1", "m2", "completions", a)
    assert g != semantic_group("k1", "m", "completions", {**a, "max_tokens": 9})
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"}], "seed": 1}
    g1 = semantic_group(None, "m", "chat", chat)
    assert g1 == semantic_group(None, "m", "chat", {**chat, "messages": [chat["messages"][0],
                                                                        {"role": "user", "content": "q"}]})
    other_system = [{"role": "system", "content": "Be long."}, chat["messages"][1]]
    assert g1 != semantic_group(None, "m", "chat", {**chat, "messages": other_system})
    assert semantic_group(None, "m", "completions", {"prompt": [1, 2]}) is None


def test_index_finds_the_nearest_vector_above_the_threshold_and_persists(tmp_path):
    path = tmp_path / "cache.sqlite"
    idx = SemanticIndex(path, threshold=0.9)
    idx.add("g", "k1", unit(1, 0, 0))
    idx.add("g", "k2", unit(0, 1, 0))
    idx.add("h", "k3", unit(1, 0, 0))
    key, sim = idx.search("g", unit(1, 0.1, 0))
    assert key == "k1" and sim == pytest.approx(1 / np.sqrt(1.01), abs=1e-6)
    assert idx.search("g", unit(1, 1, 0)) is None  # cos 0.707 < 0.9
    assert idx.search("nope", unit(1, 0, 0)) is None
    idx.drop("g", "k1")
    assert idx.search("g", unit(1, 0.1, 0)) is None
    assert idx.stats() == {"vectors": 2, "threshold": 0.9, "searches": 4, "found": 1}
    idx.close()
    again = SemanticIndex(path, threshold=0.9)  # a restart: the vectors are in the file
    assert again.search("h", unit(1, 0, 0))[0] == "k3" and again.search("g", unit(0, 1, 0))[0] == "k2"
    assert again.stats()["vectors"] == 2
    with pytest.raises(ValueError, match="cosine similarity"):
        SemanticIndex(path, threshold=1.5)


def test_vectors_of_entries_gone_from_the_cache_are_pruned(tmp_path, monkeypatch):
    from leanserve.gateway import semantic
    from leanserve.gateway.cache import CacheConfig, ResponseCache

    monkeypatch.setattr(semantic, "PRUNE_MIN", 4)
    path = tmp_path / "cache.sqlite"
    cache = ResponseCache(CacheConfig(path))
    idx = SemanticIndex(path, threshold=0.9)
    cache.put("k0", "m", {"id": "a"}, 0.1)
    cache.put("k1", "m", {"id": "b"}, 0.1)
    for i in range(3):
        idx.add("g", f"k{i}", unit(1, i, 0))
    assert idx.stats()["vectors"] == 3  # below the first pass
    idx.add("g", "k3", unit(0, 0, 1))  # the 4th: a pass keeps only k0 and k1, whose entries exist
    assert idx.stats()["vectors"] == 2
    assert idx.search("g", unit(0, 0, 1)) is None and idx.search("g", unit(1, 0, 0))[0] == "k0"
