"""Speculative decoding's proposers: cheap guesses of a sequence's next tokens, which one forward of
the target model verifies (engine/runner.py; sampling/ decides what is accepted, so the output is
the target's own). Torch-free.

    Proposer.propose(seq, k)  -> up to k draft tokens for ``seq`` (may be none)
    Proposer.finished(seq)    -> the sequence is done (a cross-request index may learn it)

Built in: ``ngram`` (prompt lookup: the request's own prompt and output) and ``suffix`` (an index
over recent sequences across requests, one per tenant).
"""

from leanserve.spec.proposer import NgramProposer, Proposer, SpecSequence, SuffixProposer, make_proposer

__all__ = ["NgramProposer", "Proposer", "SpecSequence", "SuffixProposer", "make_proposer"]
