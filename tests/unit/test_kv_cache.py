"""KVCacheManager: exact block ids, ref counts, prefix hits, LRU eviction, all-or-nothing allocation."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterator

import pytest

from leanserve.engine.kv_cache import KVCacheManager, hash_block
from leanserve.types import Request, SamplingParams

BS = 4


def req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, list(tokens), SamplingParams())


@pytest.fixture
def make_kv() -> Iterator[Callable[..., KVCacheManager]]:
    """Builds managers and checks every one of them again when the test ends."""
    made: list[KVCacheManager] = []

    def make(num_blocks: int, block_size: int = BS, enable_prefix_caching: bool = True) -> KVCacheManager:
        kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching)
        made.append(kv)
        return kv

    yield make
    for kv in made:
        kv.check_integrity()


def run(kv: KVCacheManager, r: Request, n: int, lookup: bool = False) -> list[int]:
    """One step for one request, as the scheduler does it: (lookup,) allocate, then compute."""
    computed, num_cached = kv.get_computed_blocks(r) if lookup else ([], 0)
    ids = kv.allocate_slots(r, n, computed if lookup else None)
    assert ids is not None
    r.num_computed_tokens += num_cached + n
    kv.check_integrity()
    return ids


def snapshot(kv: KVCacheManager) -> tuple:
    return (
        kv.free_queue(),
        [kv.ref_count(b) for b in range(kv.num_blocks)],
        {rid: kv.get_block_ids(rid) for rid in kv.request_ids()},
        dict(kv._cached),
        kv.prefix_cache_queries,
        kv.prefix_cache_hits,
    )


def test_hash_is_sha256_chain() -> None:
    first = hash_block(None, [1, 2, 3, 4])
    assert first == hashlib.sha256(struct.pack("<4q", 1, 2, 3, 4)).digest()
    second = hash_block(first, [5, 6, 7, 8])
    assert second == hashlib.sha256(first + struct.pack("<4q", 5, 6, 7, 8)).digest()
    assert hash_block(None, [5, 6, 7, 8]) != second  # same tokens, different prefix


def test_fresh_allocation_hands_out_blocks_in_order(make_kv) -> None:
    kv = make_kv(8)
    a, b = req("a", list(range(10))), req("b", list(range(100, 105)))
    assert kv.allocate_slots(a, 10) == [0, 1, 2]
    assert kv.allocate_slots(b, 5) == [3, 4]
    assert [kv.ref_count(i) for i in range(8)] == [1, 1, 1, 1, 1, 0, 0, 0]
    assert kv.free_queue() == [5, 6, 7]
    assert kv.num_free_blocks == 3
    assert kv.usage == pytest.approx(5 / 8)
    assert kv.get_block_ids("a") == [0, 1, 2]
    assert kv.get_block_ids("nobody") == []
    kv.check_integrity()


def test_table_grows_only_when_a_block_fills(make_kv) -> None:
    kv = make_kv(8)
    a = req("a", list(range(10)))
    run(kv, a, 10)
    for tok in (10, 11):
        a.output_token_ids.append(tok)
        assert run(kv, a, 1) == [0, 1, 2]  # 11th and 12th tokens fit block 2
    a.output_token_ids.append(12)
    assert run(kv, a, 1) == [0, 1, 2, 3]  # the 13th needs a new block


def test_shared_prefix_reuses_exactly_the_parents_blocks(make_kv) -> None:
    kv = make_kv(8)
    a = req("a", list(range(10)))
    assert run(kv, a, 10) == [0, 1, 2]
    b = req("b", list(range(8)) + [50, 51, 52])
    assert kv.get_computed_blocks(b) == ([0, 1], 8)
    assert run(kv, b, 3, lookup=True) == [0, 1, 3]
    assert b.num_computed_tokens == 11
    assert [kv.ref_count(i) for i in range(4)] == [2, 2, 1, 1]
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (11, 8)


def test_lookup_is_pure(make_kv) -> None:
    kv = make_kv(4)
    a = req("a", list(range(9)))
    run(kv, a, 9)
    kv.free("a")
    before = snapshot(kv)
    assert kv.get_computed_blocks(req("b", list(range(9)))) == ([0, 1], 8)
    assert snapshot(kv) == before  # free blocks not touched, counters not moved


def test_at_least_one_token_is_left_to_compute(make_kv) -> None:
    kv = make_kv(8)
    a = req("a", list(range(12)))
    run(kv, a, 12)
    # Exactly three full blocks cached: a request with the same 12 tokens gets two of them.
    assert kv.get_computed_blocks(req("same", list(range(12)))) == ([0, 1], 8)
    assert kv.get_computed_blocks(req("longer", list(range(13)))) == ([0, 1, 2], 12)
    assert kv.get_computed_blocks(req("one", [0])) == ([], 0)


def test_partial_blocks_are_not_cached_and_hashes_chain(make_kv) -> None:
    kv = make_kv(8)
    run(kv, req("a", list(range(6))), 6)  # block 0 full, block 1 half
    assert kv.get_computed_blocks(req("b", list(range(6)) + [9, 9, 9])) == ([0], 4)
    # Block 1's tokens alone are not enough: the chain includes block 0's content.
    run(kv, req("c", [0, 1, 2, 3, 4, 5, 6, 7, 8]), 9)
    assert kv.get_computed_blocks(req("d", [7, 7, 7, 7, 4, 5, 6, 7, 0])) == ([], 0)


def test_free_queues_tail_first_and_blocks_stay_findable_until_evicted(make_kv) -> None:
    kv = make_kv(4)
    a = req("a", list(range(12)))
    assert run(kv, a, 12) == [0, 1, 2]
    kv.free("a")
    assert kv.free_queue() == [3, 2, 1, 0]  # never-used block 3, then a's tail before its head
    assert kv.usage == 0.0
    probe = req("probe", list(range(13)))
    assert kv.get_computed_blocks(probe) == ([0, 1, 2], 12)

    assert run(kv, req("c", [90, 91, 92, 93]), 4) == [3]
    assert kv.get_computed_blocks(probe) == ([0, 1, 2], 12)
    assert run(kv, req("d", [80, 81, 82, 83]), 4) == [2]  # evicts a's last block first
    assert kv.get_computed_blocks(probe) == ([0, 1], 8)
    assert run(kv, req("e", [70, 71, 72, 73]), 4) == [1]
    assert kv.get_computed_blocks(probe) == ([0], 4)
    assert kv.free_queue() == [0]


def test_hit_on_a_free_block_touches_it(make_kv) -> None:
    kv = make_kv(5)
    run(kv, req("a", list(range(12))), 12)
    kv.free("a")
    assert kv.free_queue() == [3, 4, 2, 1, 0]
    b = req("b", list(range(8)) + [40])
    assert run(kv, b, 1, lookup=True) == [0, 1, 3]  # hits leave the queue, the new block is its head
    assert kv.free_queue() == [4, 2]
    assert [kv.ref_count(i) for i in range(5)] == [1, 1, 0, 1, 0]


def test_allocation_failure_changes_nothing(make_kv) -> None:
    kv = make_kv(4)
    a = req("a", list(range(12)))
    run(kv, a, 12)
    before = snapshot(kv)
    assert kv.allocate_slots(req("b", list(range(100, 108))), 8) is None
    a.output_token_ids += [12, 13, 14, 13, 14]
    assert kv.allocate_slots(a, 5) is None  # 17 tokens need 5 blocks, only 4 exist
    assert snapshot(kv) == before
    assert kv.request_ids() == ["a"]


def test_hits_sitting_in_the_free_queue_are_not_spare_capacity(make_kv) -> None:
    kv = make_kv(3)
    run(kv, req("a", list(range(9))), 9)  # blocks 0, 1 named; 2 holds one token
    kv.free("a")
    b = req("b", list(range(8)) + [60, 61, 62, 63, 64])  # 13 tokens: 2 hits + 2 new blocks
    computed, num_cached = kv.get_computed_blocks(b)
    assert (computed, num_cached) == ([0, 1], 8)
    before = snapshot(kv)
    # Three free blocks, but two of them are the hits: only one is left to pop.
    assert kv.allocate_slots(b, 5, computed) is None
    assert snapshot(kv) == before
    c = req("c", list(range(8)) + [60, 61, 62, 63])
    assert kv.allocate_slots(c, 4, kv.get_computed_blocks(c)[0]) == [0, 1, 2]
    kv.check_integrity()


def test_blocks_are_named_when_allocated_so_the_same_step_can_hit_them(make_kv) -> None:
    kv = make_kv(8)
    a, b = req("a", list(range(9))), req("b", list(range(9)))
    assert kv.allocate_slots(a, 9) == [0, 1, 2]  # not computed yet
    assert kv.get_computed_blocks(b) == ([0, 1], 8)
    assert run(kv, b, 1, lookup=True) == [0, 1, 3]
    a.num_computed_tokens = 9  # the step ran


def test_only_known_tokens_are_named(make_kv) -> None:
    kv = make_kv(8)
    a = req("a", list(range(6)))
    assert kv.allocate_slots(a, 12) == [0, 1, 2]  # room for 12, but only 6 ids are known
    assert kv.num_cached_blocks == 1
    a.num_computed_tokens = 6


def test_promised_blocks_lose_their_name_if_never_computed(make_kv) -> None:
    kv = make_kv(8)
    a = req("a", list(range(9)))
    kv.allocate_slots(a, 9)
    kv.free("a")  # aborted before the step ran: num_computed_tokens is still 0
    assert kv.get_computed_blocks(req("b", list(range(9)))) == ([], 0)
    assert kv.num_cached_blocks == 0
    # Computed blocks keep their names; the hits of a request count as computed from the start.
    c = req("c", list(range(9)))
    assert run(kv, c, 9) == [3, 4, 5]
    d = req("d", list(range(12)) + [99])
    computed, _ = kv.get_computed_blocks(d)
    assert kv.allocate_slots(d, 5, computed) == [3, 4, 6, 7]  # block 6 is named (promised) now
    assert kv.num_cached_blocks == 3
    kv.free("c")
    kv.free("d")  # d computed nothing itself, but its hits are c's real KV
    assert kv.get_computed_blocks(req("e", list(range(13)))) == ([3, 4], 8)
    assert kv.num_cached_blocks == 2


def test_promised_block_held_by_a_same_step_hit_keeps_its_name(make_kv) -> None:
    kv = make_kv(8)
    a, b = req("a", list(range(9))), req("b", list(range(9)))
    kv.allocate_slots(a, 9)
    run(kv, b, 1, lookup=True)
    kv.free("a")  # b still needs blocks 0 and 1 (the runner writes the whole scheduled step)
    assert kv.get_computed_blocks(req("c", list(range(9)))) == ([0, 1], 8)


def test_duplicate_content_stays_unnamed(make_kv) -> None:
    kv = make_kv(8)
    a, b = req("a", list(range(8)) + [1]), req("b", list(range(8)) + [2])
    assert run(kv, a, 9) == [0, 1, 2]
    assert run(kv, b, 9) == [3, 4, 5]  # computed without a lookup: same content, new blocks
    assert kv.num_cached_blocks == 2
    kv.free("a")
    kv.free("b")
    assert kv.get_computed_blocks(req("c", list(range(9)))) == ([0, 1], 8)
    assert kv.free_queue() == [6, 7, 2, 1, 0, 5, 4, 3]


def test_prefix_caching_disabled(make_kv) -> None:
    kv = make_kv(8, enable_prefix_caching=False)
    a = req("a", list(range(9)))
    run(kv, a, 9)
    b = req("b", list(range(9)))
    assert kv.get_computed_blocks(b) == ([], 0)
    assert run(kv, b, 9, lookup=True) == [3, 4, 5]
    assert kv.num_cached_blocks == 0
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (0, 0)


def test_free_is_idempotent(make_kv) -> None:
    kv = make_kv(4)
    run(kv, req("a", list(range(5))), 5)
    kv.free("a")
    kv.free("a")
    kv.free("never-seen")
    assert kv.num_free_blocks == 4
    assert kv.request_ids() == []


def test_reset_prefix_cache(make_kv) -> None:
    kv = make_kv(8)
    a = req("a", list(range(9)))
    run(kv, a, 9)
    kv.reset_prefix_cache()
    assert kv.get_computed_blocks(req("b", list(range(9)))) == ([], 0)
    assert kv.get_block_ids("a") == [0, 1, 2]  # running requests keep their blocks
    a.output_token_ids += [9, 10, 11]
    run(kv, a, 3)  # block 2 fills up and is named again
    assert kv.get_computed_blocks(req("c", list(range(13)))) == ([], 0)  # chain starts at unnamed block 0
    assert kv.num_cached_blocks == 1


def test_hit_counters_count_tokens_once_per_first_allocation(make_kv) -> None:
    kv = make_kv(8)
    run(kv, req("a", list(range(9))), 9, lookup=True)
    run(kv, req("b", list(range(10))), 2, lookup=True)
    b_cached = kv.prefix_cache_hits
    assert (kv.prefix_cache_queries, b_cached) == (9 + 10, 8)
    b = kv._tables["b"].request
    b.output_token_ids.append(1)
    run(kv, b, 1)  # a later step of the same request is not a lookup
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (19, 8)


def test_computed_blocks_only_on_first_allocation(make_kv) -> None:
    kv = make_kv(8)
    run(kv, req("a", list(range(9))), 9)
    b = req("b", list(range(9)))
    run(kv, b, 1, lookup=True)
    with pytest.raises(ValueError, match="first allocation"):
        kv.allocate_slots(b, 1, [0])
    with pytest.raises(ValueError, match="not a cached block"):
        kv.allocate_slots(req("c", list(range(9))), 1, [2])


def test_check_integrity_catches_corruption(make_kv) -> None:
    kv = KVCacheManager(4, BS)  # not from make_kv: it is left broken on purpose
    run(kv, req("a", list(range(5))), 5)
    kv._ref[0] += 1
    with pytest.raises(AssertionError, match="block 0: ref count 2 but held by 1"):
        kv.check_integrity()
    kv._ref[0] -= 1
    kv._free[0] = None
    with pytest.raises(AssertionError, match="free queue"):
        kv.check_integrity()
    del kv._free[0]
    kv._hash[3] = b"x"
    with pytest.raises(AssertionError, match="block 3 is named"):
        kv.check_integrity()


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        KVCacheManager(0)
    with pytest.raises(ValueError, match="block_size"):
        KVCacheManager(4, 0)
