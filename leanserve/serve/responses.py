"""OpenAI response bodies and server-sent events, built from the engine's RequestOutputs.

Pure functions over plain data (no model, no HTTP), so they are unit-tested directly. Outputs from
the engine are cumulative (the full text and token ids so far); `ChoiceCursor` remembers what was
already sent for one choice and turns the next output into a delta.

SSE framing: each event is ``data: <one line of JSON>\\n\\n``; the stream ends with ``data: [DONE]``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from leanserve.types import CompletionOutput, RequestOutput, TokenLogprob

SSE_DONE = b"data: [DONE]\n\n"
FINISH_REASONS = ("stop", "length")  # what OpenAI clients know; the engine's "abort"/"error" become errors


def sse(obj: dict[str, Any]) -> bytes:
    """One server-sent event. JSON escapes newlines, so the payload is always a single line."""
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


def usage(out: RequestOutput, cost: dict[str, Any] | None = None) -> dict[str, Any]:
    """OpenAI's usage object; ``cost`` adds the bill's fields (``cost``, ``cost_details``: cost/billing.py)."""
    completion = out.num_generated_tokens
    u = {"prompt_tokens": out.num_prompt_tokens, "completion_tokens": completion,
         "total_tokens": out.num_prompt_tokens + completion,
         "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens}}
    if out.num_draft_tokens:  # speculative decoding: OpenAI's predicted-output counts
        u["completion_tokens_details"] = {"accepted_prediction_tokens": out.num_accepted_tokens,
                                          "rejected_prediction_tokens": out.num_draft_tokens - out.num_accepted_tokens}
    if cost:
        u.update(cost)
    return u


# ---- token text -------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable-character table, inverted (byte-level BPE token pieces)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenText:
    """Token id -> (text, UTF-8 bytes) for logprobs, cached. A token that is part of a multi-byte
    character decodes to U+FFFD on its own; its ``bytes`` are still exact for byte-level and
    byte-fallback vocabularies, so a client can rebuild the text, as OpenAI intends."""

    def __init__(self, decode: Callable[[list[int]], str], id_to_piece: Callable[[int], str | None],
                 byte_level: bool) -> None:
        self._decode = decode
        self._piece = id_to_piece
        self._byte_level = byte_level
        self._cache: dict[int, tuple[str, list[int]]] = {}

    @classmethod
    def for_tokenizer(cls, tokenizer: Any) -> "TokenText":
        decoder = getattr(getattr(tokenizer, "tok", None), "decoder", None)
        byte_level = type(decoder).__name__ == "ByteLevel"
        return cls(lambda ids: tokenizer.decode(ids, skip_special_tokens=False), tokenizer.id_to_token, byte_level)

    def get(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            text = self._decode([token_id])
            hit = self._cache[token_id] = (text, self._bytes(token_id, text))
        return hit

    def text(self, token_id: int) -> str:
        return self.get(token_id)[0]

    def _bytes(self, token_id: int, text: str) -> list[int]:
        piece = self._piece(token_id)
        if piece is not None:
            m = _BYTE_PIECE.fullmatch(piece)
            if m:
                return [int(m.group(1), 16)]
            if self._byte_level:
                table = _byte_level_decoder()
                if all(ch in table for ch in piece):
                    return [table[ch] for ch in piece]
        return list(text.encode("utf-8"))


def completion_logprobs(lps: Sequence[TokenLogprob], tt: TokenText, offset: int = 0) -> tuple[dict[str, Any], int]:
    """The legacy completions format for these tokens; text offsets start at ``offset``.
    Returns (logprobs object, offset after the last token)."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for lp in lps:
        text = tt.text(lp.token_id)
        tokens.append(text)
        token_lps.append(lp.logprob)
        top: dict[str, float] = {}
        for tid, v in lp.top:
            top.setdefault(tt.text(tid), v)  # two ids with the same text: keep the likelier (listed first)
        tops.append(top)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}, offset


def prompt_completion_logprobs(prompt_ids: Sequence[int], lps: Sequence[TokenLogprob | None] | None,
                               tt: TokenText) -> tuple[dict[str, Any], int]:
    """The legacy completions format for an echoed prompt: every prompt token, with null logprobs
    where none was computed (the first token; tokens before ``prompt_logprobs_start``)."""
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = 0
    for i, tid in enumerate(prompt_ids):
        text = tt.text(tid)
        lp = lps[i] if lps is not None and i < len(lps) else None
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if lp is None:
            token_lps.append(None)
            tops.append(None)
            continue
        token_lps.append(lp.logprob)
        top: dict[str, float] = {}
        for t, v in lp.top:
            top.setdefault(tt.text(t), v)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}, offset


def vllm_prompt_logprobs(prompt_ids: Sequence[int], lps: Sequence[TokenLogprob | None] | None,
                         tt: TokenText) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's ``prompt_logprobs``: per prompt token, null or {token id: {logprob, rank, decoded_token}}
    holding the token itself and its top-N alternatives."""
    out: list[dict[str, dict[str, Any]] | None] = []
    for i, tid in enumerate(prompt_ids):
        lp = lps[i] if lps is not None and i < len(lps) else None
        if lp is None:
            out.append(None)
            continue
        entry = {str(tid): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": tt.text(tid)}}
        for rank, (t, v) in enumerate(lp.top, 1):
            entry.setdefault(str(t), {"logprob": v, "rank": rank, "decoded_token": tt.text(t)})
        out.append(entry)
    return out


def chat_logprobs(lps: Sequence[TokenLogprob], tt: TokenText) -> dict[str, Any]:
    content = []
    for lp in lps:
        text, b = tt.get(lp.token_id)
        top = []
        for tid, v in lp.top:
            t, tb = tt.get(tid)
            top.append({"token": t, "logprob": v, "bytes": tb})
        content.append({"token": text, "logprob": lp.logprob, "bytes": b, "top_logprobs": top})
    return {"content": content}


# ---- streaming deltas -------------------------------------------------------------------------

@dataclass
class ChoiceCursor:
    """What has been sent for one choice of a streamed request."""

    num_chars: int = 0
    num_logprobs: int = 0
    text_offset: int = 0  # completions logprobs: offset of the next token's text
    finished: bool = False
    role_sent: bool = False

    def advance(self, c: CompletionOutput) -> tuple[str, list[TokenLogprob] | None, str | None]:
        """(new text, new logprobs or None, finish reason or None) since the last call."""
        text = c.text[self.num_chars:] if len(c.text) > self.num_chars else ""
        self.num_chars = max(self.num_chars, len(c.text))
        new_lps = None
        if c.logprobs is not None:
            new_lps = c.logprobs[self.num_logprobs:]
            self.num_logprobs = len(c.logprobs)
        finish = c.finish_reason if not self.finished else None
        if finish is not None:
            self.finished = True
        return text, new_lps, finish


def engine_failure(out: RequestOutput) -> str | None:
    """A message if the engine ended any choice with "abort" or "error" (not an OpenAI finish reason)."""
    if out.error:
        return out.error
    for c in out.outputs:
        if c.finish_reason is not None and c.finish_reason not in FINISH_REASONS:
            return f"the request ended with {c.finish_reason!r}"
    return None


def completion_chunk(rid: str, created: int, model: str, index: int, text: str, logprobs: dict[str, Any] | None,
                     finish: str | None, include_usage: bool, stop_reason: str | int | None = None) -> dict[str, Any]:
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
    return _stream_chunk("text_completion", rid, created, model, choice, include_usage, stop_reason)


def chat_chunk(rid: str, created: int, model: str, index: int, delta: dict[str, Any], logprobs: dict[str, Any] | None,
               finish: str | None, include_usage: bool, stop_reason: str | int | None = None) -> dict[str, Any]:
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    return _stream_chunk("chat.completion.chunk", rid, created, model, choice, include_usage, stop_reason)


def _stream_chunk(obj: str, rid: str, created: int, model: str, choice: dict[str, Any], include_usage: bool,
                  stop_reason: str | int | None) -> dict[str, Any]:
    if choice["finish_reason"] is not None:
        choice["stop_reason"] = stop_reason
    chunk: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
    if include_usage:
        chunk["usage"] = None  # OpenAI: null on every chunk but the final usage chunk
    return chunk


def usage_chunk(rid: str, created: int, model: str, obj: str, out: RequestOutput,
                cost: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage(out, cost)}


def error_event(message: str, type: str = "server_error", code: str | None = None, param: str | None = None) -> bytes:
    return sse({"error": {"message": message, "type": type, "param": param, "code": code}})


# ---- whole responses --------------------------------------------------------------------------

def completion_response(rid: str, created: int, model: str, out: RequestOutput, tt: TokenText | None,
                        cost: dict[str, Any] | None = None, echo: str | None = None,
                        prompt_logprobs: bool = False) -> dict[str, Any]:
    """``echo``: the prompt's text, put before each choice's text (with its tokens' logprobs first
    when the choice has logprobs); ``prompt_logprobs``: vLLM's per-choice prompt_logprobs list."""
    choices = []
    for c in out.outputs:
        lp = None
        if c.logprobs is not None and tt is not None:
            offset = 0
            if echo is not None:
                lp, offset = prompt_completion_logprobs(out.prompt_token_ids, out.prompt_logprobs, tt)
            gen, _ = completion_logprobs(c.logprobs, tt, offset)
            lp = gen if lp is None else {k: lp[k] + gen[k] for k in lp}
        choice = {"index": c.index, "text": c.text if echo is None else echo + c.text, "logprobs": lp,
                  "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
        if prompt_logprobs and tt is not None:
            choice["prompt_logprobs"] = vllm_prompt_logprobs(out.prompt_token_ids, out.prompt_logprobs, tt)
        choices.append(choice)
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": usage(out, cost)}


def chat_response(rid: str, created: int, model: str, out: RequestOutput, tt: TokenText | None,
                  cost: dict[str, Any] | None = None) -> dict[str, Any]:
    choices = []
    for c in out.outputs:
        lp = chat_logprobs(c.logprobs, tt) if c.logprobs is not None and tt is not None else None
        choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": lp,
                        "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": usage(out, cost)}
