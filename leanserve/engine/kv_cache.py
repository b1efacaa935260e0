"""Paged KV cache bookkeeping with automatic prefix caching. No torch here: only block ids.

The pool holds ``num_blocks`` blocks of ``block_size`` token slots. A request owns a block
table (its blocks in sequence order). A block that is full of *known* tokens gets a name,
the chain hash of its content and of everything before it, so a later request with the same
prefix can reuse its KV instead of recomputing it.

Free blocks wait in an LRU queue. A freed block that has a name stays findable until it is
popped for reuse (evicted); a hit on it takes it back out of the queue ("touch").

Hash: ``sha256(parent_digest || little-endian int64 token ids)``; the first block has no
parent digest (its input is shorter, so it cannot collide with a later block's input). We use
sha256 rather than Python's ``hash`` because a crafted 64-bit collision would let one prompt
read another's KV; sha256 is deterministic across processes and machines.
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from leanserve.types import Request

BlockHash = bytes


def hash_block(parent: BlockHash | None, token_ids: list[int]) -> BlockHash:
    """The name of a full block: its tokens chained onto the name of the block before it."""
    h = hashlib.sha256(parent or b"")
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


@dataclass
class _Table:
    """What the manager knows about one request holding blocks."""

    request: Request
    block_ids: list[int] = field(default_factory=list)
    # Chain hashes of the request's first len(block_hashes) blocks, kept even for blocks that
    # stayed unnamed (duplicate content), because the next block's hash chains on them.
    block_hashes: list[BlockHash] = field(default_factory=list)
    # Leading blocks taken from the cache: their KV exists regardless of this request's progress.
    num_hit_blocks: int = 0


class KVCacheManager:
    """Which request holds which blocks, which blocks are free, and which are findable by prefix.

    Call order per step (the scheduler's): ``get_computed_blocks`` (pure lookup) ->
    ``allocate_slots`` (all or nothing) -> the model writes the KV -> the caller advances
    ``request.num_computed_tokens`` -> ... -> ``free``.
    """

    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._hash: list[BlockHash | None] = [None] * num_blocks
        self._cached: dict[BlockHash, int] = {}
        # Insertion order is eviction order: the head was freed longest ago.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._tables: dict[str, _Table] = {}
        self.prefix_cache_queries = 0  # tokens looked up, counted when a lookup is consumed
        self.prefix_cache_hits = 0  # of those, tokens found in the cache

    # ---- queries -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref count 0, including cached ones that can still be hit."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by at least one request."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def request_ids(self) -> list[str]:
        """Requests currently holding a block table."""
        return list(self._tables)

    def get_block_ids(self, request_id: str) -> list[int]:
        table = self._tables.get(request_id)
        return list(table.block_ids) if table else []

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def free_queue(self) -> list[int]:
        """Free block ids, next to be evicted first."""
        return list(self._free)

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The longest run of cached blocks matching the start of ``request.all_token_ids``.

        Returns (block ids, number of tokens they hold). Pure lookup: nothing is touched or
        counted until ``allocate_slots`` consumes the result. At most ``request.max_cached_tokens``:
        at least one token is always left to compute, since the step that samples the next token
        has to run the model on something, and positions whose prompt logprobs were asked for too.
        """
        if not self.enable_prefix_caching:
            return [], 0
        tokens = request.all_token_ids
        bs = self.block_size
        parent: BlockHash | None = None
        hits: list[int] = []
        for i in range(request.max_cached_tokens // bs):
            parent = hash_block(parent, tokens[i * bs : (i + 1) * bs])
            block_id = self._cached.get(parent)
            if block_id is None:
                break
            hits.append(block_id)
        return hits, len(hits) * bs

    # ---- mutations -----------------------------------------------------------------------

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed_blocks: list[int] | None = None
    ) -> list[int] | None:
        """Grow the request's table to cover ``num_computed_tokens + hits + num_new_tokens`` tokens.

        ``computed_blocks`` (a ``get_computed_blocks`` result) is only allowed on the request's
        first allocation, while ``request.num_computed_tokens`` is still 0; the caller then
        advances ``num_computed_tokens`` past the hits. Returns the whole block table, or None
        when the free pool is too small, in which case nothing changed.

        Blocks that will be full once this step's tokens are computed are named right away, so
        a request scheduled later in the same step can hit them: the whole step's KV is written
        before any attention reads it.
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        rid = request.request_id
        table = self._tables.get(rid)
        hits = computed_blocks or []
        if hits:
            if table is not None or request.num_computed_tokens != 0:
                raise ValueError(f"request {rid}: computed_blocks are only allowed on its first allocation")
            for b in hits:
                if self._hash[b] is None:
                    raise ValueError(f"request {rid}: block {b} is not a cached block")
        held = len(table.block_ids) if table else 0
        num_tokens = request.num_computed_tokens + len(hits) * self.block_size + num_new_tokens
        num_new_blocks = max(0, self.num_blocks_for(num_tokens) - held - len(hits))
        # Hits sitting in the free queue get touched, not popped, so they are not spare capacity.
        num_free_hits = sum(1 for b in hits if self._ref[b] == 0)
        if num_new_blocks > len(self._free) - num_free_hits:
            return None

        if table is None:
            table = self._tables[rid] = _Table(request, num_hit_blocks=len(hits))
            if computed_blocks is not None and self.enable_prefix_caching:
                self.prefix_cache_queries += request.num_tokens
                self.prefix_cache_hits += len(hits) * self.block_size
        # Touch the hits before popping new blocks, so eviction cannot take one of them.
        for b in hits:
            if self._ref[b] == 0:
                del self._free[b]
            self._ref[b] += 1
            table.block_ids.append(b)
            table.block_hashes.append(self._hash[b])  # type: ignore[arg-type]
        for _ in range(num_new_blocks):
            b, _ = self._free.popitem(last=False)
            self._evict(b)
            self._ref[b] = 1
            table.block_ids.append(b)

        if self.enable_prefix_caching:
            self._name_full_blocks(table, min(num_tokens, request.num_tokens) // self.block_size)
        return list(table.block_ids)

    def free(self, request_id: str) -> None:
        """Release the request's blocks. Unknown ids are ignored.

        Blocks are queued tail first, so a sequence's tail is evicted before its head (the head
        is the part other prompts are likeliest to share).

        A named block past ``request.num_computed_tokens`` was promised by ``allocate_slots``
        but maybe never written (say, the request was aborted before its step ran), so if nobody
        else holds it, it loses its name. So set ``num_computed_tokens`` before calling this, and
        after a failed model step, where blocks named in that step may be shared and unwritten,
        call ``reset_prefix_cache``.
        """
        table = self._tables.pop(request_id, None)
        if table is None:
            return
        num_written = max(table.num_hit_blocks, table.request.num_computed_tokens // self.block_size)
        for i in reversed(range(len(table.block_ids))):
            b = table.block_ids[i]
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if i >= num_written:
                    self._evict(b)
                self._free[b] = None

    def reset_prefix_cache(self) -> None:
        """Forget every block name. Safe while requests run: their blocks just stop being shareable."""
        for b in self._cached.values():
            self._hash[b] = None
        self._cached.clear()

    # ---- internals -----------------------------------------------------------------------

    def _evict(self, block_id: int) -> None:
        h = self._hash[block_id]
        if h is not None:
            del self._cached[h]
            self._hash[block_id] = None

    def _name_full_blocks(self, table: _Table, num_full: int) -> None:
        if num_full <= len(table.block_hashes):
            return
        bs = self.block_size
        tokens = table.request.all_token_ids
        parent = table.block_hashes[-1] if table.block_hashes else None
        for i in range(len(table.block_hashes), num_full):
            parent = hash_block(parent, tokens[i * bs : (i + 1) * bs])
            table.block_hashes.append(parent)
            b = table.block_ids[i]
            # First copy wins: a second block with the same content (two requests computed the
            # same tokens independently) stays unnamed and is simply recycled when freed.
            if self._hash[b] is None and parent not in self._cached:
                self._hash[b] = parent
                self._cached[parent] = b

    # ---- debugging -----------------------------------------------------------------------

    def check_integrity(self) -> None:
        """Assert every invariant of the pool; AssertionError says which one broke."""
        holders: Counter[int] = Counter()
        for rid, table in self._tables.items():
            ids = table.block_ids
            assert len(set(ids)) == len(ids), f"request {rid} holds a block twice: {ids}"
            assert all(0 <= b < self.num_blocks for b in ids), f"request {rid} holds an invalid block id: {ids}"
            assert len(table.block_hashes) <= len(ids), (
                f"request {rid} has {len(table.block_hashes)} block hashes for {len(ids)} blocks"
            )
            assert table.num_hit_blocks <= len(ids), f"request {rid} has more hit blocks than blocks"
            for i, h in enumerate(table.block_hashes):
                named = self._hash[ids[i]]
                assert named is None or named == h, f"request {rid}: block {ids[i]} (position {i}) is named for other content"
            holders.update(ids)
        for b in range(self.num_blocks):
            assert self._ref[b] == holders[b], f"block {b}: ref count {self._ref[b]} but held by {holders[b]} requests"
            assert (b in self._free) == (self._ref[b] == 0), (
                f"block {b}: ref count {self._ref[b]} but {'in' if b in self._free else 'not in'} the free queue"
            )
            h = self._hash[b]
            if h is not None:
                assert self._cached.get(h) == b, f"block {b} is named but the cache maps its name to {self._cached.get(h)}"
        assert len(self._free) == sum(1 for r in self._ref if r == 0), "free queue size does not match ref counts"
        for h, b in self._cached.items():
            assert 0 <= b < self.num_blocks and self._hash[b] == h, f"cache entry points to block {b}, which has another name"
        if not self.enable_prefix_caching:
            assert not self._cached, "prefix caching is off but blocks are named"
