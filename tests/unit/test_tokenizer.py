"""Incremental detokenization and chat templates on a small byte-level BPE tokenizer built here."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from leanserve.tokenizer import ChatTemplateError, IncrementalDetokenizer, LeanTokenizer, TokenizerInfo


def _byte_tokenizer(template: str | None = None) -> LeanTokenizer:
    # one token per byte (GPT-2's byte-to-unicode alphabet): multi-byte characters span tokens
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab, [], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<eos>"])
    eos = tok.token_to_id("<eos>")
    return LeanTokenizer(tok, TokenizerInfo(None, "<eos>", None, (eos,), False, template))


def test_round_trip_and_stream_of_multibyte_text():
    tok = _byte_tokenizer()
    text = "naïve café 🙂 — 東京"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    detok = IncrementalDetokenizer(tok, tok.encode("prompt: "))
    deltas = [detok.add(i) for i in ids]
    assert "".join(deltas) == text
    for d in deltas:
        assert "\ufffd" not in d  # never half a character
    # the emoji's four bytes yield nothing until the last one completes it
    start = len("naïve café ".encode())
    assert deltas[start:start + 4] == ["", "", "", "🙂"]


def test_special_tokens_are_skipped_in_streamed_text():
    tok = _byte_tokenizer()
    detok = IncrementalDetokenizer(tok, [])
    out = "".join(detok.add(i) for i in tok.encode("hi") + [tok.eos_token_ids[0]])
    assert out == "hi"


def test_chat_template_renders_with_generation_prompt():
    template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    tok = _byte_tokenizer(template)
    text = tok.apply_chat_template([{"role": "user", "content": "hey"}])
    assert text == "<user>hey<eos><assistant>"
    assert tok.decode(tok.encode_chat([{"role": "user", "content": "hey"}]), skip_special_tokens=False) == text


def test_template_errors_are_user_errors():
    tok = _byte_tokenizer("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="no chat template"):
        _byte_tokenizer().apply_chat_template([{"role": "user", "content": "x"}])
