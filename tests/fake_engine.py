"""A fake engine core: the whole `EngineCore` contract (leanserve/engine/interface.py), no model, no
torch work, exact control over when a step runs and when it fails."""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable

from leanserve.cost.meter import CostMeter
from leanserve.engine.interface import EngineCore, ModelInfo, StepError, StepResult
from leanserve.types import CompletionOutput, Priority, RequestOutput, SamplingParams

BAD_TOKEN = 42  # the fake engine refuses prompts holding it


class FakeTokenizer:
    eos_token_ids = (0,)
    has_chat_template = True
    vocab_size = 100
    tok = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [10 + ord(c) % 26 for c in text]

    def encode_chat(self, messages, add_generation_prompt: bool = True) -> list[int]:
        return self.encode("".join(m["content"] for m in messages))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)

    def id_to_token(self, i: int) -> str:
        return self.decode([i])


class FakeEngine:
    """One token per step for each of the first ``max_num_seqs`` requests; token i decodes to a letter.
    Each step charges ``step_s`` of machine time to the meter, split evenly over its requests."""

    def __init__(self, max_num_seqs: int = 4, step_s: float = 0.002) -> None:
        self.tokenizer = FakeTokenizer()
        self.info = ModelInfo(max_model_len=64, vocab_size=100, kv_cache_tokens=1024, max_num_seqs=max_num_seqs,
                              dtype="float32", device="cpu", num_params=1000, weight_bytes=4000)
        self.meter = CostMeter()
        self.step_s = step_s
        self.requests: dict[str, dict] = {}
        self.batches: list[list[str]] = []
        self.aborted: list[str] = []
        self.resets = 0
        self.step_calls = 0
        self.fail_when: Callable[[list[str]], bool] | None = None  # raise StepError in a step whose batch matches
        self.thread_ids: set[int] = set()

    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams,
                    priority: Priority = Priority.INTERACTIVE, tenant: str | None = None) -> None:
        self.thread_ids.add(threading.get_ident())
        if BAD_TOKEN in prompt:
            raise ValueError(f"prompt token {BAD_TOKEN} is not allowed here")
        self.requests[request_id] = {"prompt": list(prompt), "params": params,
                                     "tokens": [[] for _ in range(params.n)]}

    def _output(self, rid: str, finish: str | None) -> RequestOutput:
        r = self.requests[rid]
        choices = [CompletionOutput(i, self.tokenizer.decode(t), list(t), finish) for i, t in enumerate(r["tokens"])]
        return RequestOutput(rid, r["prompt"], choices, finished=finish is not None,
                             machine_seconds=self.meter.charged(rid))

    def abort_request(self, request_id: str, reason: str = "abort") -> RequestOutput | None:
        self.thread_ids.add(threading.get_ident())
        if request_id not in self.requests:
            return None
        out = self._output(request_id, reason)
        out.machine_seconds, out.prefill_seconds = self.meter.pop_split(request_id)
        del self.requests[request_id]
        self.aborted.append(request_id)
        return out

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def stats(self) -> dict:
        return {"num_running": min(len(self.requests), self.info.max_num_seqs),
                "num_waiting": max(0, len(self.requests) - self.info.max_num_seqs),
                "kv_cache_usage": len(self.requests) / 100, "prefix_cache_queries": 0, "prefix_cache_hits": 0,
                "num_preemptions": 0}

    def step(self) -> StepResult:
        self.thread_ids.add(threading.get_ident())
        self.step_calls += 1
        batch = list(self.requests)[:self.info.max_num_seqs]
        if not batch:
            return StepResult()
        self.batches.append(batch)
        time.sleep(self.step_s)
        if self.fail_when is not None and self.fail_when(batch):
            self.fail_when = None
            outs = [o for o in (self.abort_request(rid, "error") for rid in batch) if o is not None]
            self.resets += 1
            raise StepError("the model step failed: RuntimeError: simulated kernel failure", batch, outs)
        self.meter.record_step(self.step_s, {rid: len(self.requests[rid]["tokens"]) for rid in batch})
        outs = []
        for rid in batch:
            r = self.requests[rid]
            p: SamplingParams = r["params"]
            for toks in r["tokens"]:
                toks.append(len(toks) % 26)
            done = all(len(t) >= p.max_tokens for t in r["tokens"])
            out = self._output(rid, "length" if done else None)
            if done:
                out.machine_seconds, out.prefill_seconds = self.meter.pop_split(rid)
                del self.requests[rid]
            outs.append(out)
        return StepResult(outs, batch)


def missing_members(obj: object, protocol: type = EngineCore) -> list[str]:
    """The members of ``protocol`` that ``obj`` lacks or whose parameters differ (names, in order)."""
    missing = []
    for name in protocol.__annotations__:
        if not isinstance(obj, type) and not hasattr(obj, name):
            missing.append(name)
    for name, member in vars(protocol).items():
        if name.startswith("_") or not callable(member):
            continue
        got = getattr(obj, name, None)
        if got is None:
            missing.append(name)
            continue
        want = [p for p in inspect.signature(member).parameters if p != "self"]
        have = [p for p in inspect.signature(got).parameters if p != "self"]
        if have[:len(want)] != want:
            missing.append(f"{name}{tuple(have)}")
    return missing
