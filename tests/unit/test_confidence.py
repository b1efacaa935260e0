"""A cascade's confidence scores (gateway/confidence.py), shared by the server and `leanserve eval cascade`."""

from __future__ import annotations

import math

import pytest

from leanserve.gateway.confidence import (SCORES, answer_score, choice_text, get_score, mean_logprob, min_logprob,
                                          token_logprobs)


def test_scores_over_the_answers_tokens():
    assert mean_logprob([-0.5, -1.5, -1.0]) == -1.0 and min_logprob([-0.5, -1.5, -1.0]) == -1.5
    assert mean_logprob([]) == -math.inf == min_logprob([])
    assert set(SCORES) == {"mean_logprob", "min_logprob"} and get_score("min_logprob") is min_logprob
    with pytest.raises(ValueError, match="unknown confidence score 'max'"):
        get_score("max")


def test_an_empty_answer_is_never_confident():
    # a model that stops at once emits one end-of-sequence token, often with a high probability
    assert answer_score("mean_logprob", "", [-0.01]) == -math.inf
    assert answer_score("min_logprob", " \n", [-0.01, -0.02]) == -math.inf
    assert answer_score("mean_logprob", " Paris", [-0.25, -0.75]) == -0.5


def test_logprobs_and_text_from_either_response_shape():
    chat = {"choices": [{"index": 0, "message": {"content": "Hi"},
                         "logprobs": {"content": [{"logprob": -0.1}, {"logprob": None}, {"logprob": -0.3}]}},
                        {"index": 1, "message": {"content": None}, "logprobs": None}]}
    assert token_logprobs("chat", chat) == [-0.1, -0.3] and choice_text("chat", chat) == "Hi"
    assert token_logprobs("chat", chat, 1) == [] and choice_text("chat", chat, 1) == ""
    comp = {"choices": [{"index": 0, "text": " 7, 8", "logprobs": {"token_logprobs": [-0.05, -0.02, float("nan")]}}]}
    assert token_logprobs("completions", comp) == [-0.05, -0.02] and choice_text("completions", comp) == " 7, 8"
    assert token_logprobs("completions", {"choices": []}) == [] and choice_text("completions", {}) == ""
