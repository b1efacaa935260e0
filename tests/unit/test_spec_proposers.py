"""Speculative decoding's proposers (leanserve/spec): exact drafts on hand-made token sequences."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from leanserve.spec import NgramProposer, SuffixProposer, make_proposer
from leanserve.spec.proposer import SuffixIndex, longest_match


@dataclass
class Seq:
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    request_id: str = "r"
    tenant: str | None = None


def _words(tokens):
    from array import array
    return bytearray(array("I", tokens).tobytes())


def test_longest_match_prefers_longer_then_latest():
    # suffix [7, 8, 9]: [8, 9] occurs at 1 and 5, [7, 8, 9] only at 4 -> length 3, after index 7
    toks = [1, 8, 9, 2, 7, 8, 9, 5, 3, 7, 8, 9]
    assert longest_match(_words(toks), len(toks), 1, 4) == (3, 7)
    # max_n 2: the latest [8, 9] is the one at 5 -> after index 7
    assert longest_match(_words(toks), len(toks), 1, 2) == (2, 7)
    # no earlier occurrence of the last token at all
    assert longest_match(_words([1, 2, 3]), 3, 1, 3) == (0, -1)


def test_longest_match_ignores_matches_straddling_token_boundaries():
    # tokens whose bytes line up across a word boundary: 0x00000100 0x00000000 contains the byte
    # pattern of token 1 shifted; only whole-token matches count
    toks = [0x0100, 0, 1, 5, 1]
    assert longest_match(_words(toks), len(toks), 1, 1) == (1, 3)


def test_ngram_proposes_what_followed_and_follows_the_output():
    p = NgramProposer(min_n=2, max_n=4)
    seq = Seq([10, 11, 12, 13, 14, 15, 10, 11])
    assert p.propose(seq, 3) == [12, 13, 14]
    assert p.propose(seq, 0) == []
    seq.output_token_ids += [12, 13]  # now ends with [10 11 12 13]: the draft continues from 14
    assert p.propose(seq, 2) == [14, 15]
    assert p.propose(Seq([1, 2, 3, 4], request_id="other"), 4) == []  # nothing repeats
    # the draft stops at the end of the history
    assert p.propose(Seq([5, 6, 7, 5, 6], request_id="short"), 10) == [7, 5, 6]
    assert p.num_tracked == 3
    p.finished(seq)
    assert p.num_tracked == 2


def test_suffix_index_bounded_and_longest_backward_match():
    idx = SuffixIndex(max_tokens=12, seed=2)
    idx.add([1, 2, 3, 4, 5, 6])
    assert idx.lookup([9, 2, 3], 3) == (2, [4, 5, 6])
    assert idx.lookup([1, 2, 3], 2) == (3, [4, 5])  # extends back over the 1
    idx.add([7, 2, 3, 8, 9, 10])  # the latest occurrence of [2, 3] wins
    assert idx.lookup([2, 3], 2) == (2, [8, 9])
    assert idx.num_tokens == 12
    idx.add([20, 21, 22, 23])  # over 12 tokens: the first sequence goes
    assert idx.num_tokens == 10
    assert idx.lookup([4, 5], 1) == (0, [])
    assert idx.lookup([21, 22], 5) == (2, [23])
    assert idx.num_windows == 4 + 2  # windows with a token after them, of the two sequences left


def test_suffix_uses_other_requests_of_the_same_tenant_only():
    p = SuffixProposer(min_n=2, max_n=8)
    done = Seq([1, 2, 3], [40, 41, 42, 43, 44], request_id="a", tenant="t1")
    p.finished(done)
    live = Seq([9, 9, 40, 41], request_id="b", tenant="t1")
    assert p.propose(live, 3) == [42, 43, 44]
    assert p.propose(Seq([9, 9, 40, 41], request_id="c", tenant="t2"), 3) == []  # another tenant: nothing
    # its own history matches longer than the index: its own continuation wins
    own = Seq([40, 41, 42, 7, 7, 40, 41, 42], request_id="d", tenant="t1")
    assert p.propose(own, 2) == [7, 7]


def test_suffix_keeps_at_most_max_tenants_indexes():
    p = SuffixProposer(max_tenants=2)
    for t in ("a", "b", "c"):
        p.finished(Seq([1, 2, 3, 4, 5], request_id=t, tenant=t))
    assert list(p._indexes) == ["b", "c"]


def test_make_proposer():
    assert make_proposer("off") is None
    assert make_proposer("ngram").name == "ngram"
    assert make_proposer("suffix").name == "suffix"
    with pytest.raises(ValueError, match="unknown lookup proposer 'fast'"):
        make_proposer("fast")
