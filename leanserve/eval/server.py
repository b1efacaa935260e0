"""Any OpenAI-compatible server as an evaluation backend.

    tokenize  POST /tokenize {"prompt", "add_special_tokens"}          (leanserve, vLLM)
    score     POST /v1/completions {"prompt": token ids, "echo": true,  (OpenAI's legacy convention;
              "logprobs": 1, "max_tokens": 1, "temperature": 0,         leanserve and vLLM answer it)
              "prompt_logprobs_start": start}                           (leanserve extra, ignored
                                                                         elsewhere: then every prompt
                                                                         token is scored)
    generate  POST /v1/completions {"prompt": text, "max_tokens", "stop", "temperature": 0,
              "logprobs": 0}                                            (each chosen token's logprob:
                                                                         choices[0].logprobs.token_logprobs)

Cost is what the server says in ``usage.cost`` (USD; leanserve's ``cost_details`` adds the
machine-seconds), per response, so each generated answer carries its own; a server that reports
none leaves the run's $ unknown. Requests run
``max_in_flight`` at a time, in the order given, so items that share a context reach the prefix
cache together.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import httpx

from leanserve.eval.backend import CostTally, GenerateRequest, Generation, Score, ScoreRequest

GREEDY_TOLERANCE = 1e-5  # a scored token whose logprob is within this of the top one counts as the argmax


class ServerError(RuntimeError):
    """The server refused or failed a request (one line for the user)."""


class ServerBackend:
    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None,
                 max_in_flight: int = 8, timeout: float = 600.0) -> None:
        root = base_url.rstrip("/")
        self.root = root[:-3] if root.endswith("/v1") else root
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self.max_in_flight = max(1, max_in_flight)
        self._tally = CostTally()
        self._client = httpx.Client(timeout=timeout, headers=self.headers)
        models = self._get("/v1/models").get("data") or []
        if not models:
            raise ServerError(f"{self.root}/v1/models lists no model")
        card = next((m for m in models if m.get("id") == model), None) if model else models[0]
        if card is None:
            raise ServerError(f"{self.root} serves {', '.join(str(m.get('id')) for m in models)}, not {model!r}")
        self.model = str(card["id"])
        self.max_length = int(card.get("max_model_len") or 2048)
        self._version: str | None = None
        try:
            self._version = self._get("/version").get("version")
        except ServerError:
            pass

    # ---- the contract ------------------------------------------------------------------------

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        r = self._client.post(self.root + "/tokenize", json={"model": self.model, "prompt": text,
                                                              "add_special_tokens": add_special_tokens})
        if r.status_code == 404:
            raise ServerError(f"the server at {self.root} has no /tokenize endpoint (leanserve and vLLM have one): "
                              "the tasks need the model's token ids")
        tokens = _json(r, "/tokenize").get("tokens")
        if not isinstance(tokens, list):
            raise ServerError(f"{self.root}/tokenize answered without a token list")
        return [int(t) for t in tokens]

    def score(self, requests: list[ScoreRequest]) -> list[Score]:
        bodies = [{"model": self.model, "prompt": list(r.token_ids), "max_tokens": 1, "temperature": 0, "echo": True,
                   "logprobs": 1, "prompt_logprobs_start": r.start} for r in requests]
        return [_score(r, body, self.root) for r, body in zip(requests, self._post_all(bodies))]

    def generate(self, requests: list[GenerateRequest]) -> list[Generation]:
        bodies = [{"model": self.model, "prompt": r.prompt, "max_tokens": r.max_tokens, "temperature": 0,
                   "logprobs": 0, **({"stop": list(r.stop)} if r.stop else {})} for r in requests]
        return [_generation(b) for b in self._post_all(bodies)]

    def cost(self) -> CostTally:
        t = CostTally()
        t.add(self._tally)
        return t

    def describe(self) -> dict[str, Any]:
        return {"backend": "server", "base_url": self.root, "model": self.model, "max_model_len": self.max_length,
                "server_version": self._version}

    def close(self) -> None:
        self._client.close()

    # ---- HTTP --------------------------------------------------------------------------------

    def _get(self, path: str) -> dict[str, Any]:
        try:
            r = self._client.get(self.root + path)
        except httpx.HTTPError as e:
            raise ServerError(f"cannot reach {self.root}: {type(e).__name__}: {e}") from None
        return _json(r, path)

    def _post_all(self, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """POST /v1/completions for each body, ``max_in_flight`` at a time; answers in order."""
        t0 = time.perf_counter()

        async def run() -> list[dict[str, Any]]:
            sem = asyncio.Semaphore(self.max_in_flight)
            async with httpx.AsyncClient(timeout=self.timeout, headers=self.headers,
                                         limits=httpx.Limits(max_connections=self.max_in_flight)) as client:
                async def one(body: dict[str, Any]) -> dict[str, Any]:
                    async with sem:
                        try:
                            r = await client.post(self.root + "/v1/completions", json=body)
                        except httpx.HTTPError as e:
                            raise ServerError(f"{self.root}/v1/completions: {type(e).__name__}: {e}") from None
                        return _json(r, "/v1/completions")
                return await asyncio.gather(*(one(b) for b in bodies))

        answers = asyncio.run(run())
        for a in answers:
            self._tally.add(_cost_of(a))
        self._tally.wall_seconds += time.perf_counter() - t0
        return answers


def _json(r: httpx.Response, path: str) -> dict[str, Any]:
    try:
        body = r.json()
    except ValueError:
        body = None
    if r.status_code >= 400 or not isinstance(body, dict):
        err = body.get("error") if isinstance(body, dict) else None
        message = err.get("message") if isinstance(err, dict) else (r.text[:200] or r.reason_phrase)
        raise ServerError(f"{path} answered {r.status_code}: {message}")
    return body


def _score(req: ScoreRequest, answer: dict[str, Any], root: str) -> Score:
    lp = (answer.get("choices") or [{}])[0].get("logprobs") or {}
    values, tops = lp.get("token_logprobs"), lp.get("top_logprobs")
    n = len(req.token_ids)
    if not isinstance(values, list) or len(values) < n or any(values[i] is None for i in range(req.start, n)):
        raise ServerError(f"the server at {root} returned no prompt log-probabilities (echo + logprobs on "
                          "/v1/completions): it cannot run log-likelihood tasks")
    scored = tuple(float(values[i]) for i in range(req.start, n))
    greedy = True
    for i, v in zip(range(req.start, n), scored):
        top = tops[i] if isinstance(tops, list) and i < len(tops) else None
        if isinstance(top, dict) and top and max(top.values()) > v + GREEDY_TOLERANCE:
            greedy = False
    return Score(scored, greedy)


def _generation(answer: dict[str, Any]) -> Generation:
    choice = (answer.get("choices") or [{}])[0]
    lp = choice.get("logprobs") or {}
    values = lp.get("token_logprobs") if isinstance(lp, dict) else None
    logprobs = tuple(float(v) for v in values if _is_number(v)) if isinstance(values, list) else ()
    cost = _cost_of(answer)
    details = (answer.get("usage") or {}).get("cost_details")
    seconds = cost.machine_seconds if isinstance(details, dict) and _is_number(details.get("machine_seconds")) \
        else None
    return Generation(str(choice.get("text") or ""), logprobs, cost.usd, seconds)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _cost_of(answer: dict[str, Any]) -> CostTally:
    usage = answer.get("usage") or {}
    cost = usage.get("cost")
    usd: float | None = None
    if isinstance(cost, int | float) and not isinstance(cost, bool) and math.isfinite(cost):
        usd = float(cost)
    elif isinstance(cost, dict) and isinstance(cost.get("usd"), int | float):  # older leanserve servers
        usd = float(cost["usd"])
    details = usage.get("cost_details") if isinstance(usage.get("cost_details"), dict) else {}
    seconds = details.get("machine_seconds") if isinstance(details.get("machine_seconds"), int | float) else 0.0
    return CostTally(float(seconds), usd, int(usage.get("prompt_tokens") or 0),
                     int(usage.get("completion_tokens") or 0), 1)
