"""Fast tokenizer (HF `tokenizers`), chat templates, and incremental detokenization for streaming.

A tokenizer comes from an HF folder (tokenizer.json + tokenizer_config.json) or is rebuilt from a
GGUF file's metadata (byte-level BPE for "gpt2"-type vocabularies, SentencePiece-style BPE with
byte fallback for "llama"-type ones). The rebuilt tokenizer is cached beside the GGUF file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

# GGUF token types
_CONTROL, _USER_DEFINED = 3, 4

# llama.cpp pre-tokenizer names -> regex splits (before byte-level mapping)
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_PRE_SPLITS = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


class ChatTemplateError(ValueError):
    pass


@dataclass
class TokenizerInfo:
    bos_token: str | None
    eos_token: str | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    add_bos: bool
    chat_template: str | None


class LeanTokenizer:
    """Encode, decode, apply the chat template. Wraps a `tokenizers.Tokenizer`."""

    def __init__(self, tok: Tokenizer, info: TokenizerInfo) -> None:
        self.tok = tok
        self.info = info
        self.eos_token_ids = info.eos_token_ids
        self._template = _compile_template(info.chat_template) if info.chat_template else None
        self._special_ids = frozenset(i for i, t in tok.get_added_tokens_decoder().items() if t.special)
        self._literal: Tokenizer | None = None  # a copy that reads control-token text as plain text

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.info.add_bos and self.info.bos_token_id is not None:
            ids = [self.info.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tok.id_to_token(token_id)

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        if self._template is None:
            raise ChatTemplateError("this model has no chat template; use the completions endpoint")
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.info.bos_token or "", eos_token=self.info.eos_token or "", **kwargs,
            )
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from None

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        """The conversation through the chat template, as token ids. Control tokens come from the
        template only: a message whose text spells one (``<|im_end|>\n<|im_start|>system``) gets
        that text as plain text, so a user cannot open a turn of another role."""
        # the template writes any BOS itself, as HF's apply_chat_template does
        text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        contents = [m["content"] for m in messages if isinstance(m.get("content"), str) and m["content"]]
        if not any(self.spells_control_token(c) for c in contents):
            return self.encode(text, add_special_tokens=False)
        return self._encode_with_literal_spans(text, contents)

    def spells_control_token(self, text: str) -> bool:
        return bool(self._special_ids.intersection(self.tok.encode(text, add_special_tokens=False).ids))

    def encode_literal(self, text: str) -> list[int]:
        """``text`` as token ids with every control token's text read as plain text."""
        if self._literal is None:
            literal = Tokenizer.from_str(self.tok.to_str())
            literal.encode_special_tokens = True
            self._literal = literal
        return self._literal.encode(text, add_special_tokens=False).ids

    def _encode_with_literal_spans(self, text: str, contents: list[str]) -> list[int]:
        """The template's own text with its control tokens, each message's text (found in order) literally."""
        ids: list[int] = []
        cursor = 0
        for content in contents:
            at = text.find(content, cursor)
            if at < 0:  # the template rewrote the text (e.g. trimmed it): look for what it kept
                content = content.strip()
                at = text.find(content, cursor) if content else -1
            if at < 0:
                raise ChatTemplateError("a message's text spells a control token of this model, and its chat template "
                                        "changes message text, so it cannot be kept as plain text; remove it")
            ids += self.encode(text[cursor:at], add_special_tokens=False) if at > cursor else []
            ids += self.encode_literal(content)
            cursor = at + len(content)
        ids += self.encode(text[cursor:], add_special_tokens=False) if cursor < len(text) else []
        return ids

    # ---- loading ---------------------------------------------------------------------------

    @classmethod
    def from_hf_folder(cls, folder: Path) -> "LeanTokenizer":
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{folder} has no tokenizer.json")
        tok = Tokenizer.from_file(str(path))
        cfg: dict[str, Any] = {}
        if (folder / "tokenizer_config.json").is_file():
            cfg = json.loads((folder / "tokenizer_config.json").read_text())
        template = cfg.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        bos, eos = _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token"))
        eos_ids: list[int] = []
        gen = folder / "generation_config.json"
        if gen.is_file():
            e = json.loads(gen.read_text()).get("eos_token_id")
            eos_ids = e if isinstance(e, list) else ([e] if e is not None else [])
        if eos is not None and tok.token_to_id(eos) is not None and tok.token_to_id(eos) not in eos_ids:
            eos_ids.insert(0, tok.token_to_id(eos))
        bos_id = tok.token_to_id(bos) if bos else None
        info = TokenizerInfo(bos, eos, bos_id, tuple(eos_ids), bool(cfg.get("add_bos_token", False)) and bos_id is not None,
                             template)
        return cls(tok, info)

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], cache_path: Path | None = None) -> "LeanTokenizer":
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        bos_id = meta.get("tokenizer.ggml.bos_token_id")
        eos_id = meta.get("tokenizer.ggml.eos_token_id")
        eos_ids = [eos_id] if eos_id is not None else []
        eot = meta.get("tokenizer.ggml.eot_token_id")
        if eot is not None and eot not in eos_ids:
            eos_ids.append(eot)
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos_id is not None
        info = TokenizerInfo(tokens[bos_id] if bos_id is not None else None, tokens[eos_id] if eos_id is not None else None,
                             bos_id, tuple(eos_ids), add_bos, meta.get("tokenizer.chat_template"))
        if cache_path is not None and cache_path.is_file():
            return cls(Tokenizer.from_file(str(cache_path)), info)
        tok = _tokenizer_from_gguf(meta)
        if cache_path is not None:
            try:
                tok.save(str(cache_path))
            except OSError:
                pass  # read-only model store: rebuild next time
        return cls(tok, info)


def _token_text(t: Any) -> str | None:
    if isinstance(t, dict):
        return t.get("content")
    return t


def _tokenizer_from_gguf(meta: dict[str, Any]) -> Tokenizer:
    kind = meta["tokenizer.ggml.model"]
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
        tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre == "smollm":  # digits one by one, then GPT-2's split
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ])
        elif pre in _PRE_SPLITS:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(_PRE_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ])
        else:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
    elif kind == "llama":
        scores = meta.get("tokenizer.ggml.scores")
        unk_id = meta.get("tokenizer.ggml.unknown_token_id")
        tok = Tokenizer(models.BPE(vocab, _merges_from_scores(tokens, scores, types), byte_fallback=True,
                                   unk_token=tokens[unk_id] if unk_id is not None else None, fuse_unk=True))
        norms = [normalizers.Replace(" ", "\u2581")]
        if meta.get("tokenizer.ggml.add_space_prefix", True):
            norms.insert(0, normalizers.Prepend("\u2581"))
        tok.normalizer = normalizers.Sequence(norms)
        decs = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        if meta.get("tokenizer.ggml.add_space_prefix", True):
            decs.append(decoders.Strip(" ", 1, 0))
        tok.decoder = decoders.Sequence(decs)
    else:
        raise ValueError(f"unsupported GGUF tokenizer model {kind!r} (supported: gpt2, llama)")
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    return tok


def _merges_from_scores(tokens: list[str], scores: list[float] | None, types: list[int]) -> list[tuple[str, str]]:
    """SentencePiece BPE keeps no merge list; a piece's score ranks it. Every split of a normal
    piece into two pieces of the vocabulary is a merge, ranked by the merged piece's score."""
    vocab = {t: i for i, t in enumerate(tokens)}
    rank = scores if scores is not None else [-float(i) for i in range(len(tokens))]
    found: list[tuple[float, int, int, str, str]] = []
    for piece, pid in vocab.items():
        if types[pid] != 1 or len(piece) < 2:
            continue
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            lid, rid = vocab.get(left), vocab.get(right)
            if lid is not None and rid is not None:
                found.append((-rank[pid], lid, rid, left, right))
    found.sort()
    return [(left, right) for _, _, _, left, right in found]


def _compile_template(source: str) -> jinja2.Template:
    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that are always whole UTF-8 characters.

    Decodes a small window (prefix_offset..end) and emits what it adds beyond the window's
    already-emitted part (prefix_offset..read_offset). A delta that ends in U+FFFD is an incomplete
    multi-byte character and is held back until the next token completes it. A few prompt tokens
    seed the window so that tokenizers that strip a leading space decode the first token right.
    """

    def __init__(self, tokenizer: LeanTokenizer, prompt_ids: list[int], context: int = 5) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-context:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = decode(self.ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        delta = new_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta
