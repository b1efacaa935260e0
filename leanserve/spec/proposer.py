"""Proposers: where a sequence's draft tokens come from. Torch-free.

A draft is only a guess: the target model verifies every draft token in the same forward that
computes the sequence's next token, and sampling keeps what the target itself would have produced.
A proposer only changes how many tokens one forward yields, never which.

- ``NgramProposer`` (prompt lookup): the longest suffix of the sequence (``max_n`` down to ``min_n``
  tokens) that occurred earlier in its own prompt or output; the draft is what followed its latest
  occurrence. Pays on input-grounded work (summaries, RAG answers, code edits) that re-emits what it read.
- ``SuffixProposer``: the same lookup in the sequence itself, then in an index over the recent
  finished sequences of the same tenant (``SuffixIndex``): repeated structure across requests
  (agent loops, templated answers). The longer match wins.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol


class SpecSequence(Protocol):
    """What a proposer reads of a sequence (``types.Request`` is one)."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    tenant: str | None


class Proposer(Protocol):
    name: str

    def propose(self, seq: SpecSequence, k: int) -> list[int]: ...  # at most k draft tokens

    def finished(self, seq: SpecSequence) -> None: ...  # the sequence is done (or aborted)


@dataclass
class Draft:
    """A sequence's draft: its tokens and, from a draft model sampling, the (len(tokens), vocab)
    distributions they were drawn from (None: point guesses, as prompt lookup makes)."""

    tokens: list[int]
    probs: Any = None


def propose_all(proposer: Proposer, seqs: list[SpecSequence], ks: list[int]) -> list[Draft]:
    """Drafts of at most ``ks[i]`` tokens for each sequence: one batched call where the proposer has
    ``propose_batch`` (a draft model runs all sequences in one forward), else one call each."""
    batch = getattr(proposer, "propose_batch", None)
    if batch is not None:
        return batch(seqs, ks)
    return [Draft(proposer.propose(s, k)[:k] if k > 0 else []) for s, k in zip(seqs, ks)]


class FallbackProposer:
    """``first``'s draft where it has one, else ``then``'s (e.g. a lookup that costs nothing, then a
    draft model for the sequences it finds nothing for)."""

    def __init__(self, first: Proposer, then: Proposer) -> None:
        self.first, self.then = first, then
        self.name = f"{first.name}+{then.name}"

    def propose(self, seq: SpecSequence, k: int) -> list[int]:
        return self.propose_batch([seq], [k])[0].tokens

    def propose_batch(self, seqs: list[SpecSequence], ks: list[int]) -> list[Draft]:
        drafts = propose_all(self.first, seqs, ks)
        empty = [i for i, (d, k) in enumerate(zip(drafts, ks)) if k > 0 and not d.tokens]
        if empty:
            for i, d in zip(empty, propose_all(self.then, [seqs[i] for i in empty], [ks[i] for i in empty])):
                drafts[i] = d
        return drafts

    def token_cost(self, num_seqs: int) -> float:
        """What a draft may cost: the dearer proposer's (``then``'s where it measures one)."""
        cost = getattr(self.then, "token_cost", None)
        return cost(num_seqs) if cost is not None else 0.0

    def finished(self, seq: SpecSequence) -> None:
        self.first.finished(seq)
        self.then.finished(seq)


def _bytes(tokens: list[int]) -> bytes:
    return array("I", tokens).tobytes()


@dataclass
class _History:
    """A sequence's tokens as 4-byte words, so a lookup is ``bytes.rfind`` (C speed) instead of a loop."""

    words: bytearray = field(default_factory=bytearray)
    num_prompt: int = 0
    num_output: int = 0

    def sync(self, seq: SpecSequence) -> None:
        if self.num_prompt == 0 and not self.words:
            self.words += _bytes(seq.prompt_token_ids)
            self.num_prompt = len(seq.prompt_token_ids)
        out = seq.output_token_ids
        if len(out) < self.num_output:  # a preempted or rewritten output: start over
            del self.words[4 * self.num_prompt:]
            self.num_output = 0
        self.words += _bytes(out[self.num_output:])
        self.num_output = len(out)


def longest_match(words: bytes | bytearray, n_tokens: int, min_n: int, max_n: int) -> tuple[int, int]:
    """The longest suffix of the token sequence ``words`` (``n_tokens`` 4-byte words), ``max_n`` down
    to ``min_n`` tokens, that occurs earlier in it -> (its length, the token index just after its
    latest earlier occurrence); (0, -1) if none does."""
    for n in range(min(max_n, n_tokens - 1), min_n - 1, -1):
        pattern = bytes(words[4 * (n_tokens - n):4 * n_tokens])
        end = 4 * (n_tokens - 1)  # the occurrence must end before the last token: not the suffix itself
        while (i := words.rfind(pattern, 0, end)) != -1:
            if i % 4 == 0:
                return n, i // 4 + n
            end = i + len(pattern) - 1  # straddles words: look further left
    return 0, -1


class NgramProposer:
    """Prompt lookup over the sequence's own prompt and output."""

    name = "ngram"

    def __init__(self, min_n: int = 2, max_n: int = 8) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.min_n, self.max_n = min_n, max_n
        self._histories: dict[str, _History] = {}

    def propose(self, seq: SpecSequence, k: int) -> list[int]:
        return self.own_match(seq, k)[1]

    def own_match(self, seq: SpecSequence, k: int) -> tuple[int, list[int]]:
        """(match length, draft) from the sequence's own history."""
        if k <= 0:
            return 0, []
        h = self._histories.get(seq.request_id)
        if h is None:
            h = self._histories[seq.request_id] = _History()
        h.sync(seq)
        n_tokens = h.num_prompt + h.num_output
        n, at = longest_match(h.words, n_tokens, self.min_n, self.max_n)
        if n == 0:
            return 0, []
        stop = min(at + k, n_tokens)
        return n, list(array("I", bytes(h.words[4 * at:4 * stop])))

    def finished(self, seq: SpecSequence) -> None:
        self._histories.pop(seq.request_id, None)

    @property
    def num_tracked(self) -> int:
        return len(self._histories)


class SuffixIndex:
    """The latest occurrence of every ``seed``-token window in recent sequences, at most
    ``max_tokens`` tokens of them (the oldest sequence goes first). A lookup seeds on the context's
    last ``seed`` tokens, then extends the match backwards (up to ``max_match``) to report its length."""

    def __init__(self, max_tokens: int = 100_000, seed: int = 3, max_match: int = 32) -> None:
        if seed < 1 or max_tokens < 1:
            raise ValueError("seed and max_tokens must be >= 1")
        self.max_tokens, self.seed, self.max_match = max_tokens, seed, max_match
        self._docs: OrderedDict[int, list[int]] = OrderedDict()
        self._where: dict[tuple[int, ...], tuple[int, int]] = {}  # window -> (doc, index just after it)
        self._next_doc = 0
        self.num_tokens = 0

    def add(self, tokens: list[int]) -> None:
        tokens = tokens[-self.max_tokens:]
        if len(tokens) <= self.seed:
            return
        doc = self._next_doc
        self._next_doc += 1
        self._docs[doc] = tokens
        self.num_tokens += len(tokens)
        s = self.seed
        for i in range(s, len(tokens)):  # a window at the very end has nothing after it
            self._where[tuple(tokens[i - s:i])] = (doc, i)
        while self.num_tokens > self.max_tokens:
            old, gone = self._docs.popitem(last=False)
            self.num_tokens -= len(gone)
            for i in range(s, len(gone)):
                key = tuple(gone[i - s:i])
                if self._where.get(key, (None,))[0] == old:
                    del self._where[key]

    def lookup(self, context: list[int], k: int) -> tuple[int, list[int]]:
        """(match length, up to k tokens that followed the match)."""
        s = self.seed
        if k <= 0 or len(context) < s:
            return 0, []
        hit = self._where.get(tuple(context[-s:]))
        if hit is None:
            return 0, []
        doc, at = hit
        tokens = self._docs[doc]
        n = s
        while n < self.max_match and n < len(context) and n < at and tokens[at - n - 1] == context[-n - 1]:
            n += 1
        return n, tokens[at:at + k]

    @property
    def num_windows(self) -> int:
        return len(self._where)


class SuffixProposer:
    """Own history first (as ``NgramProposer``), then the tenant's index of recent sequences; the
    longer match wins. At most ``max_tenants`` indexes, the least recently used dropped first."""

    name = "suffix"

    def __init__(self, min_n: int = 2, max_n: int = 8, max_tokens: int = 100_000, max_tenants: int = 64) -> None:
        self.own = NgramProposer(min_n, max_n)
        self.max_tokens, self.max_tenants = max_tokens, max_tenants
        self._indexes: OrderedDict[str | None, SuffixIndex] = OrderedDict()

    def index(self, tenant: str | None) -> SuffixIndex:
        idx = self._indexes.get(tenant)
        if idx is None:
            idx = self._indexes[tenant] = SuffixIndex(self.max_tokens, seed=self.own.min_n)
            while len(self._indexes) > self.max_tenants:
                self._indexes.popitem(last=False)
        self._indexes.move_to_end(tenant)
        return idx

    def propose(self, seq: SpecSequence, k: int) -> list[int]:
        n_own, own = self.own.own_match(seq, k)
        idx = self._indexes.get(seq.tenant)
        if idx is None:
            return own
        m, out = idx.max_match, seq.output_token_ids
        context = out[-m:] if len(out) >= m else seq.prompt_token_ids[len(out) - m:] + out
        n_idx, other = idx.lookup(context, k)
        return other if n_idx > n_own and other else own

    def finished(self, seq: SpecSequence) -> None:
        self.own.finished(seq)
        self.index(seq.tenant).add(seq.prompt_token_ids + seq.output_token_ids)


def make_proposer(name: str) -> Proposer | None:
    """The lookup proposers: ``off`` -> None; ``ngram``, ``suffix``. (Draft models need the model
    layer: engine/draft.py.)"""
    if name == "off":
        return None
    if name == "ngram":
        return NgramProposer()
    if name == "suffix":
        return SuffixProposer()
    raise ValueError(f"unknown lookup proposer {name!r}: expected off, ngram or suffix")
