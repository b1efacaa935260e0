"""OpenAI server-sent-event chunks <-> whole responses.

The gateway handles every answer as plain dicts in OpenAI's shapes: a whole response
(``chat.completion`` / ``text_completion``) or a stream of chunks (``chat.completion.chunk`` /
``text_completion``). ``endpoint`` is ``"chat"`` or ``"completions"``.

    async for chunk in parse_events(upstream_body): ...    # bytes -> chunk dicts, up to [DONE]
    whole = assemble("chat", chunks)                        # what a non-streamed request returns
    chunks = replay("chat", whole, include_usage=True)      # what a streamed request gets (a cache hit)

``assemble(e, replay(e, r, True)) == r`` for every streamable response leanserve produces; the
chunks ``replay`` makes have the exact shapes of leanserve's own streaming (serve/api.py ``_stream``),
with each choice's whole text in one content chunk (a cached answer needs no token pacing).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import AsyncIterator
from typing import Any

from leanserve.serve.responses import SSE_DONE, chat_chunk, completion_chunk, sse

DONE = SSE_DONE
ENDPOINTS = ("chat", "completions")
# the legacy completions logprobs: four parallel lists, concatenated across chunks
_COMPLETION_LOGPROB_LISTS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
_EOL = re.compile(rb"\r\n?|\n")  # SSE lines end with CRLF, LF or a lone CR
_BOM = b"\xef\xbb\xbf"


def encode(obj: dict[str, Any]) -> bytes:
    """One event: ``data: <json>\\n\\n``."""
    return sse(obj)


# ---- bytes -> events ----------------------------------------------------------------------------

async def parse_events(body: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any]]:
    """The JSON object of each event in an SSE byte stream, up to ``data: [DONE]``.

    Chunk boundaries are arbitrary. Comment lines (``:...``) and fields other than ``data`` (``event``,
    ``id``, ``retry``) are ignored; several ``data`` lines of one event are joined with ``\\n``. An
    event left unterminated when the stream ends is dropped (the SSE standard); the caller tells a
    cut stream by its missing finish_reason. A payload that is not a JSON object raises ValueError.

    Incremental: each byte is scanned for a line end once, and only the unfinished last line is kept.
    """
    buf = bytearray()
    data: list[str] = []  # the data lines of the event being read
    skip_lf = False  # the last chunk ended with CR: an LF starting the next one belongs to it
    first = True
    async for chunk in body:
        if not chunk:
            continue
        if skip_lf:
            skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        scan = len(buf)  # bytes before this were searched already
        buf += chunk
        if first:
            if len(buf) < len(_BOM) and _BOM.startswith(bytes(buf)):
                continue  # maybe a BOM split across chunks
            first = False
            if buf.startswith(_BOM):
                del buf[:len(_BOM)]
                scan = 0
        start = 0  # where the current line begins
        while (m := _EOL.search(buf, scan)) is not None:
            line = buf[start:m.start()].decode("utf-8", errors="replace")
            if m.end() == len(buf) and m.group() == b"\r":
                skip_lf = True
            start = scan = m.end()
            if line:
                if not line.startswith(":"):
                    name, _, value = line.partition(":")
                    if name == "data":
                        data.append(value[1:] if value.startswith(" ") else value)
                continue
            payload = "\n".join(data)
            data = []
            if not payload:  # a blank line with no (or empty) data before it: nothing to dispatch
                continue
            if payload == "[DONE]":
                return
            yield _json_object(payload)
        del buf[:start]


def _json_object(payload: str) -> dict[str, Any]:
    try:
        obj = json.loads(payload)
    except json.JSONDecodeError:
        obj = None
    if not isinstance(obj, dict):
        raise ValueError(f"SSE event is not a JSON object: {payload[:80]!r}")
    return obj


# ---- chunks -> whole response -------------------------------------------------------------------

def _check_endpoint(endpoint: str) -> bool:
    """True for chat."""
    if endpoint not in ENDPOINTS:
        raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}")
    return endpoint == "chat"


class _Choice:
    """One choice being put together from its chunks."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.parts: dict[str, list[str]] = {}  # chat: delta field -> pieces; completions: "text"
        self.logprobs: dict[str, list[Any]] | None = None
        self.finish_reason: str | None = None
        self.has_stop_reason = False
        self.stop_reason: str | int | None = None

    def add(self, c: dict[str, Any], chat: bool) -> None:
        if chat:
            for name, value in (c.get("delta") or {}).items():
                if name == "role" or value is None:
                    continue
                if not isinstance(value, str):  # e.g. tool_calls: not concatenable; never cache it wrong
                    raise ValueError(f"cannot assemble the delta field {name!r}")
                self.parts.setdefault(name, []).append(value)
        elif c.get("text") is not None:
            self.parts.setdefault("text", []).append(c["text"])
        lp = c.get("logprobs")
        if lp is not None:
            if self.logprobs is None:
                self.logprobs = {k: [] for k in (("content",) if chat else _COMPLETION_LOGPROB_LISTS)}
            for k, entries in self.logprobs.items():
                entries.extend(lp.get(k) or [])
        if c.get("finish_reason") is not None:
            self.finish_reason = c["finish_reason"]
        if "stop_reason" in c:
            # leanserve sends it with the finish only; vLLM on every chunk, null until the end
            if not self.has_stop_reason or c["stop_reason"] is not None:
                self.stop_reason = c["stop_reason"]
            self.has_stop_reason = True

    def whole(self, chat: bool) -> dict[str, Any]:
        joined = {name: "".join(pieces) for name, pieces in self.parts.items()}
        out: dict[str, Any] = {"index": self.index}
        if chat:
            out["message"] = {"role": "assistant", "content": joined.pop("content", None), **joined}
        else:
            out["text"] = joined.get("text", "")
        out["logprobs"] = self.logprobs
        out["finish_reason"] = self.finish_reason
        if self.has_stop_reason:
            out["stop_reason"] = self.stop_reason
        return out


def assemble(endpoint: str, chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """The whole response a non-streamed request would have returned, from a stream's chunks.

    id/created/model come from the first chunk; per choice, text (chat: each string delta field,
    ``content`` None when no chunk had any) and logprobs are concatenated, the last non-null
    finish_reason kept, and stop_reason where the chunks carry it; ``usage`` is the last non-null
    one, kept whole (cost fields included). Error events are skipped: the caller handles them first.
    Raises ValueError without a chunk to read, or for a delta field that is not text (tool calls).
    """
    chat = _check_endpoint(endpoint)
    chunks = [c for c in chunks if "error" not in c]
    if not chunks:
        raise ValueError("no chunks to assemble")
    choices: dict[int, _Choice] = {}
    usage = None
    for chunk in chunks:
        for c in chunk.get("choices") or ():
            index = c.get("index", 0)
            choices.setdefault(index, _Choice(index)).add(c, chat)
        if chunk.get("usage") is not None:
            usage = chunk["usage"]
    first = chunks[0]
    return {"id": first.get("id"), "object": "chat.completion" if chat else "text_completion",
            "created": first.get("created"), "model": first.get("model"),
            "choices": [choices[i].whole(chat) for i in sorted(choices)],
            "usage": copy.deepcopy(usage)}


# ---- whole response -> chunks -------------------------------------------------------------------

def replay(endpoint: str, response: dict[str, Any], include_usage: bool) -> list[dict[str, Any]]:
    """The chunks a streamed request gets for a whole response, in leanserve's streaming shapes:

    chat: one ``{"role": "assistant", "content": ""}`` chunk per choice, then per choice one chunk with
    the whole content, its logprobs and the finish; completions: that one chunk per choice. With
    ``include_usage`` every chunk has ``"usage": null`` and a last chunk with no choices carries the
    usage (unless the response has none); without it, chunks have no ``usage`` key.
    """
    chat = _check_endpoint(endpoint)
    rid, created, model = response["id"], response["created"], response["model"]
    out: list[dict[str, Any]] = []
    choices = response["choices"]
    if chat:
        for ch in choices:
            # leanserve's first delta; an answer with no content at all (an upstream refusal) sends none
            role = {"role": "assistant", "content": ""}
            if ch["message"].get("content") is None:
                del role["content"]
            out.append(chat_chunk(rid, created, model, ch["index"], role, None, None, include_usage))
    for ch in choices:
        logprobs = copy.deepcopy(ch.get("logprobs"))
        finish, stop_reason = ch.get("finish_reason"), ch.get("stop_reason")
        if chat:
            delta = {}
            for name, value in ch["message"].items():
                if name == "role" or value is None or value == "":
                    continue
                if not isinstance(value, str):
                    raise ValueError(f"cannot replay the message field {name!r}")
                delta[name] = value
            chunk = chat_chunk(rid, created, model, ch["index"], delta, logprobs, finish, include_usage, stop_reason)
        else:
            chunk = completion_chunk(rid, created, model, ch["index"], ch.get("text") or "", logprobs, finish,
                                     include_usage, stop_reason)
        if "stop_reason" not in ch:  # an upstream answer without vLLM's field: do not add it
            chunk["choices"][0].pop("stop_reason", None)
        out.append(chunk)
    if include_usage and response.get("usage") is not None:
        out.append({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": created, "model": model, "choices": [], "usage": copy.deepcopy(response["usage"])})
    return out
