"""The engine in this process as an evaluation backend: every engine option (dtype, KV cache,
batching, the levers as they come) applies, and cost comes from the engine's own meter.

Scoring is a one-token request whose prompt is the whole sequence, asking for the prompt
log-probabilities from ``start`` on (``SamplingParams.prompt_logprobs_start``): the tokens before
may come from the prefix cache, so items that share a context compute it once. Requests are added
in the order given, up to ``max_in_flight`` at a time, and the engine batches them.

Generation asks for the chosen tokens' log-probabilities (``SamplingParams.logprobs=0``), and each
answer carries its own bill: the machine-seconds the meter charged that request, in $ at the price
basis, the same bill the run's total adds up.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from leanserve.config import EngineConfig
from leanserve.cost.basis import resolve_price_basis
from leanserve.cost.billing import Bill, Billing
from leanserve.engine.engine import LLMEngine
from leanserve.eval.backend import CostTally, GenerateRequest, Generation, Score, ScoreRequest
from leanserve.types import RequestOutput, SamplingParams


class InProcessBackend:
    def __init__(self, engine_config: EngineConfig, max_in_flight: int = 64, price_per_hour: float | None = None,
                 hardware: str | None = None) -> None:
        self.config = engine_config
        self.engine = LLMEngine(engine_config)
        self.tokenizer = self.engine.tokenizer
        self.max_length = self.engine.max_model_len
        self.max_in_flight = max(1, min(max_in_flight, engine_config.max_num_seqs))
        basis = resolve_price_basis(hardware, price_per_hour, self.engine.info.device)
        self.billing = Billing(basis, self.engine.meter, engine_config.model)
        self._tally = CostTally()
        self._ids = 0

    # ---- the contract ------------------------------------------------------------------------

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def score(self, requests: list[ScoreRequest]) -> list[Score]:
        params = [SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, prompt_logprobs_start=r.start)
                  for r in requests]
        outs, _ = self._run([list(r.token_ids) for r in requests], params)
        scores = []
        for r, out in zip(requests, outs):
            lps = out.prompt_logprobs or []
            got = [lps[i] for i in range(r.start, len(r.token_ids))]
            if any(lp is None for lp in got):
                raise RuntimeError(f"the engine returned no prompt logprob for some of tokens {r.start}..")
            scores.append(Score(tuple(lp.logprob for lp in got), all(lp.rank == 1 for lp in got)))
        return scores

    def generate(self, requests: list[GenerateRequest]) -> list[Generation]:
        prompts = [self.tokenize(r.prompt) for r in requests]
        params = [SamplingParams(max_tokens=max(1, min(r.max_tokens, self.max_length - len(p) - 1)), temperature=0.0,
                                 stop=r.stop, logprobs=0) for r, p in zip(requests, prompts)]
        outs, bills = self._run(prompts, params)
        return [Generation(out.outputs[0].text, tuple(lp.logprob for lp in out.outputs[0].logprobs or ()),
                           bill.usd, bill.machine_seconds) for out, bill in zip(outs, bills)]

    def cost(self) -> CostTally:
        t = CostTally()
        t.add(self._tally)
        return t

    def describe(self) -> dict[str, Any]:
        loaded = self.engine.loaded
        path = Path(loaded.source.path)
        model = loaded.model
        return {"backend": "in-process", "model": self.config.model, "model_path": str(path),
                "model_sha256": _file_digest(path), "dtype": self.engine.info.dtype, "device": self.engine.info.device,
                "quantization": None if self.config.quantization == "none" else self.config.quantization,
                "weights": model.quantized_summary() or None, "kv_cache_dtype": self.engine.info.kv_cache_dtype,
                "speculation": None if self.config.speculative == "off" else {
                    "method": self.config.speculative, "num_speculative_tokens": self.config.num_speculative_tokens,
                    "max_batch": self.config.speculative_max_batch,
                    **({"draft_model": self.config.draft_model} if self.config.draft_model else {})},
                "max_model_len": self.max_length,
                "max_num_batched_tokens": self.config.max_num_batched_tokens, "max_num_seqs": self.config.max_num_seqs,
                "prefix_caching": self.config.enable_prefix_caching, "runtime": self.engine.describe_runtime(),
                "price_basis": self.billing.basis.to_dict()}

    def close(self) -> None:
        pass

    # ---- running requests ----------------------------------------------------------------------

    def _run(self, prompts: list[list[int]], params: list[SamplingParams]) -> tuple[list[RequestOutput], list[Bill]]:
        """All requests through the engine, at most ``max_in_flight`` at once, in the given order:
        their final outputs and their bills, in that order."""
        t0 = time.perf_counter()
        done: dict[str, RequestOutput] = {}
        bills: dict[str, Bill] = {}
        ids: list[str] = []
        pending = list(zip(prompts, params))
        pending.reverse()
        live = 0
        while pending or live:
            while pending and live < self.max_in_flight:
                prompt, p = pending.pop()
                self._ids += 1
                rid = f"eval-{self._ids}"
                self.engine.add_request(rid, prompt, p)
                ids.append(rid)
                live += 1
            for out in self.engine.step().outputs:
                if out.finished:
                    done[out.request_id] = out
                    live -= 1
                    bill = bills[out.request_id] = self.billing.close(out, None)
                    self._tally.add(CostTally(bill.machine_seconds, bill.usd, out.num_prompt_tokens,
                                              out.num_generated_tokens, 1))
        self._tally.wall_seconds += time.perf_counter() - t0
        return [done[i] for i in ids], [bills[i] for i in ids]


def _file_digest(path: Path) -> str | None:
    """sha256 of a model file (a GGUF), or of an HF folder's weights files in name order."""
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()

