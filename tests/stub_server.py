"""A fake OpenAI-compatible server whose timing is known exactly, for testing the benchmark client.

Every streamed request waits ``ttft_ms`` before its first content chunk, then ``itl_ms`` before each
later one, one token per chunk. With ``max_concurrency`` set, at most that many requests are served
at once and the rest queue (so throughput saturates there, which is what a sweep must find).

    .venv/bin/python tests/stub_server.py --port 8123 --ttft-ms 100 --itl-ms 50 --output-len 10

Not a model: the "tokens" are the words " tok0", " tok1", ... A test helper, not part of the package:
the tests import it as ``tests.stub_server``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


@dataclass(frozen=True)
class StubConfig:
    ttft_ms: float = 100.0
    itl_ms: float = 50.0
    output_len: int = 10  # used when the request carries no max_tokens
    honor_max_tokens: bool = True
    model: str = "stub-model"
    report_usage: bool = True  # include usage in the final chunk when stream_options.include_usage
    cost_per_token_usd: float | None = None  # adds usage.cost (USD) like a leanserve server
    accepted_predictions: int | None = None  # adds usage.completion_tokens_details: this many accepted, half rejected
    max_concurrency: int = 0  # 0: unlimited
    role_chunk: bool = True  # chat: send an empty-content role chunk first, as real servers do
    fail_status: int = 0  # >0: every `fail_every`-th request answers with this HTTP status
    fail_every: int = 0

    def __post_init__(self) -> None:
        if self.ttft_ms < 0 or self.itl_ms < 0:
            raise ValueError("ttft_ms and itl_ms must be >= 0")
        if self.output_len < 1:
            raise ValueError("output_len must be >= 1")


def _prompt_tokens(body: dict[str, Any]) -> int:
    if "messages" in body:
        text = " ".join(str(m.get("content", "")) for m in body.get("messages") or [])
    else:
        prompt = body.get("prompt", "")
        text = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
    return max(1, len(text.split()))


def create_app(config: StubConfig | None = None) -> FastAPI:
    cfg = config or StubConfig()
    app = FastAPI(title="leanserve bench stub")
    gate = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency > 0 else None
    counter = {"n": 0}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": cfg.model, "object": "model", "owned_by": "stub"}]}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    async def handle(request: Request, chat: bool) -> Any:
        # The clock starts when the request reaches the handler, so JSON parsing and routing here
        # do not add to the configured TTFT (the client still sees the HTTP round trip).
        t_arrival = time.perf_counter()
        body = await request.json()
        counter["n"] += 1
        if cfg.fail_every > 0 and cfg.fail_status and counter["n"] % cfg.fail_every == 0:
            return JSONResponse(
                status_code=cfg.fail_status,
                content={"error": {"message": "stub failure", "type": "stub", "code": cfg.fail_status}},
            )
        n_out = cfg.output_len
        if cfg.honor_max_tokens and body.get("max_tokens"):
            n_out = int(body["max_tokens"])
        n_in = _prompt_tokens(body)
        model = body.get("model") or cfg.model
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:12]
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def usage() -> dict[str, Any]:
            u: dict[str, Any] = {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}
            if cfg.cost_per_token_usd is not None:
                u["cost"] = cfg.cost_per_token_usd * (n_in + n_out)
            if cfg.accepted_predictions is not None:
                u["completion_tokens_details"] = {"accepted_prediction_tokens": cfg.accepted_predictions,
                                                  "rejected_prediction_tokens": cfg.accepted_predictions // 2}
            return u

        def chunk(text: str | None, finish: str | None = None, role: bool = False) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {"content": text}
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish}
            return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}

        if not body.get("stream"):
            if gate:
                await gate.acquire()
            try:
                t0 = time.perf_counter() if gate else t_arrival
                total = (cfg.ttft_ms + cfg.itl_ms * (n_out - 1)) / 1000.0
                await asyncio.sleep(max(0.0, t0 + total - time.perf_counter()))
            finally:
                if gate:
                    gate.release()
            text = "".join(f" tok{i}" for i in range(n_out))
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                      if chat else {"index": 0, "text": text, "finish_reason": "length"})
            out = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                   "model": model, "choices": [choice]}
            if cfg.report_usage:
                out["usage"] = usage()
            return out

        async def events() -> AsyncIterator[bytes]:
            if gate:
                await gate.acquire()
            try:
                # Served from arrival, or from admission when requests queue behind max_concurrency.
                t0 = time.perf_counter() if gate else t_arrival
                if chat and cfg.role_chunk:
                    yield f"data: {json.dumps(chunk(None, role=True))}\n\n".encode()
                # Sleep to absolute deadlines so per-token drift does not accumulate.
                for i in range(n_out):
                    deadline = t0 + (cfg.ttft_ms + cfg.itl_ms * i) / 1000.0
                    delay = deadline - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    finish = "length" if i == n_out - 1 else None
                    yield f"data: {json.dumps(chunk(f' tok{i}', finish))}\n\n".encode()
                if include_usage and cfg.report_usage:
                    final = {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                             "usage": usage()}
                    yield f"data: {json.dumps(final)}\n\n".encode()
                yield b"data: [DONE]\n\n"
            finally:
                if gate:
                    gate.release()

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await handle(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await handle(request, chat=False)

    return app


@contextlib.contextmanager
def serve_in_subprocess(*args: str, timeout_s: float = 20.0) -> Iterator[str]:
    """Run the stub in a child process on a free 127.0.0.1 port; yields its base URL.

    ``args`` are command-line options, e.g. ``"--ttft-ms", "200"``. Used by the tests: a separate
    process keeps the server's event loop and GIL out of the client's timings.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base_url = f"http://127.0.0.1:{port}"
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an env proxy
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise RuntimeError(f"stub server exited with {proc.returncode}: {err[-500:]}")
            try:
                with no_proxy.open(base_url + "/health", timeout=1.0) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"stub server did not start within {timeout_s:g} s")
            time.sleep(0.05)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    p = argparse.ArgumentParser(prog="tests/stub_server.py", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--ttft-ms", type=float, default=100.0)
    p.add_argument("--itl-ms", type=float, default=50.0)
    p.add_argument("--output-len", type=int, default=10)
    p.add_argument("--ignore-max-tokens", action="store_true", help="always produce --output-len tokens")
    p.add_argument("--model", default="stub-model")
    p.add_argument("--no-usage", action="store_true", help="never report usage (client must count chunks)")
    p.add_argument("--cost-per-token-usd", type=float, default=None)
    p.add_argument("--max-concurrency", type=int, default=0)
    p.add_argument("--accepted-predictions", type=int, default=None)
    p.add_argument("--fail-status", type=int, default=0)
    p.add_argument("--fail-every", type=int, default=0)
    a = p.parse_args(argv)
    cfg = StubConfig(ttft_ms=a.ttft_ms, itl_ms=a.itl_ms, output_len=a.output_len,
                     honor_max_tokens=not a.ignore_max_tokens, model=a.model, report_usage=not a.no_usage,
                     cost_per_token_usd=a.cost_per_token_usd, max_concurrency=a.max_concurrency,
                     fail_status=a.fail_status, fail_every=a.fail_every, accepted_predictions=a.accepted_predictions)
    uvicorn.run(create_app(cfg), host=a.host, port=a.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
