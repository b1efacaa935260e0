"""The step loop (schedule -> run -> update) and the offline `LLM` API.

The engine is the one place where the scheduler, the runner and the tokenizer meet. It implements
the `EngineCore` contract (engine/interface.py) the server drives. A request with ``n > 1`` is
fanned out into n sequences (``<id>#<i>``, so request ids may not hold ``#``) that share the
prompt's KV blocks through the prefix cache; their outputs are gathered back into one RequestOutput.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from leanserve.config import CacheConfig, EngineConfig, SchedulerConfig
from leanserve.cost.meter import CostMeter
from leanserve.engine.interface import ModelInfo, StepError, StepResult
from leanserve.engine.kv_cache import KVCacheManager
from leanserve.engine.runner import ModelRunner, kv_cache_block_bytes, kv_cache_torch_dtype
from leanserve.engine.scheduler import Scheduler
from leanserve.model.loader import LoadedModel, load_model, model_size
from leanserve.spec import make_proposer
from leanserve.spec.adaptive import Acceptance, StepCostModel, plan_drafts
from leanserve.spec.proposer import FallbackProposer, NgramProposer, Proposer, SuffixProposer, propose_all
from leanserve.tokenizer import IncrementalDetokenizer
from leanserve.types import (CompletionOutput, Priority, Request, RequestOutput, RequestStatus, SamplingParams,
                             SchedulerOutput, TokenLogprob)

log = logging.getLogger("leanserve")

DEFAULT_KV_CACHE_CPU = 1 << 30  # 1 GiB
DEFAULT_KV_CACHE_FRACTION_CUDA = 0.8  # of the memory left after the weights


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but torch sees no CUDA device")
    return torch.device(device)


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """AVX512-BF16 or AMX-BF16: bfloat16 matmuls run in hardware. Without them torch emulates
    bfloat16 on CPU, ~100x slower than float32 here (docs/performance.md)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" or cpu_has_native_bf16() else torch.float32
    if dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU does not support bfloat16; use --dtype float16 or float32")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


@dataclass
class _Sequence:
    """Engine-side state of one sequence: text so far and how it stops."""

    request: Request
    parent: "_Group"
    index: int
    detok: IncrementalDetokenizer
    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    stop_reason: str | int | None = None
    prompt_logprobs: dict[int, TokenLogprob] | None = None  # prompt index -> logprob (a recompute overwrites)
    acceptance: Acceptance = field(default_factory=Acceptance)  # how often its drafts stand (speculative decoding)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    embedding: list[float] | None = None  # SamplingParams.embed: the prompt's, once computed


@dataclass
class _Group:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[_Sequence] = field(default_factory=list)
    error: str | None = None

    @property
    def finished(self) -> bool:
        return all(s.request.is_finished for s in self.seqs)


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        device = resolve_device(config.device)
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        if loaded is None:
            loaded = load_model(config.model, resolve_dtype(config.dtype, device), device, config.quantization,
                                config.float_weights)
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        mcfg = loaded.config
        block_bytes = kv_cache_block_bytes(loaded, config.block_size, config.kv_cache_dtype)
        kv_bytes = config.kv_cache_memory or self._default_kv_bytes(device)
        num_blocks = kv_bytes // block_bytes
        capacity = num_blocks * config.block_size
        max_len = config.max_model_len or min(mcfg.max_position_embeddings, capacity)
        if max_len > mcfg.max_position_embeddings:
            raise ValueError(f"max_model_len {max_len} exceeds the model's context length {mcfg.max_position_embeddings}")
        if num_blocks < 1 or capacity < max_len:
            raise ValueError(
                f"the KV cache ({kv_bytes / 2**20:.0f} MiB = {capacity} tokens at {block_bytes // config.block_size} "
                f"bytes/token) cannot hold one request of max_model_len={max_len} tokens: raise --kv-cache-memory "
                f"to at least {-(-max_len // config.block_size) * block_bytes / 2**20:.0f} MiB or lower --max-model-len")
        self.max_model_len = max_len
        self.cache_config = CacheConfig(num_blocks, config.block_size, config.enable_prefix_caching, config.kv_cache_dtype)
        self.scheduler_config = SchedulerConfig(config.max_num_batched_tokens, config.max_num_seqs, max_len,
                                                max_batch_seqs_beside_interactive=config.batch_seqs_beside_interactive)
        self.kv_cache = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.scheduler_config, self.kv_cache)
        self.runner = ModelRunner(loaded, self.cache_config)
        self.eos_token_ids = loaded.eos_token_ids
        n_params, n_bytes = model_size(loaded.model)
        self.info = ModelInfo(max_model_len=max_len, vocab_size=int(mcfg.vocab_size), kv_cache_tokens=capacity,
                              max_num_seqs=config.max_num_seqs, dtype=str(loaded.dtype).removeprefix("torch."),
                              device=str(loaded.device), num_params=n_params, weight_bytes=n_bytes,
                              hidden_size=int(mcfg.hidden_size),
                              small_step_reads=loaded.model.small_step_reads(),
                              kv_cache_dtype=str(kv_cache_torch_dtype(loaded, config.kv_cache_dtype)).removeprefix("torch."),
                              kv_cache_tokens_unquantized=kv_bytes // kv_cache_block_bytes(loaded, config.block_size)
                              * config.block_size)
        self._groups: dict[str, _Group] = {}
        self._seqs: dict[str, _Sequence] = {}
        self._ids = itertools.count()
        self.meter = CostMeter()
        self.proposer = self._build_proposer()
        self.spec = SpecStats(config.num_speculative_tokens)
        self.step_cost = StepCostModel()  # fitted to this engine's decode steps; sizes the drafts
        self._propose_seconds = 0.0  # this step's share of proposing, kept out of the step cost fit
        torch.manual_seed(config.seed)

    def _build_proposer(self) -> Proposer | None:
        c = self.config
        if c.speculative not in ("draft", "auto"):
            return make_proposer(c.speculative)
        draft = None
        if c.speculative == "draft" or c.draft_model is not None:
            from leanserve.engine.draft import DraftModelProposer

            draft = DraftModelProposer.build(c.draft_model or "self", self.loaded, self.cache_config.num_tokens,
                                             c.block_size)
            log.info("speculative decoding: draft model %s, its KV cache %.0f MiB", draft.label, draft.kv_bytes / 2**20)
        if c.speculative == "draft":
            return draft
        # auto: the sequence's own text first (its own matches are the likeliest to stand), the
        # tenant's recent requests where that finds nothing, then the draft model where one is given
        lookup = FallbackProposer(NgramProposer(), SuffixProposer())
        return lookup if draft is None else FallbackProposer(lookup, draft)

    @staticmethod
    def _default_kv_bytes(device: torch.device) -> int:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return int(free * DEFAULT_KV_CACHE_FRACTION_CUDA)
        return DEFAULT_KV_CACHE_CPU

    def describe_runtime(self) -> str:
        """One line on how the model runs here: threads, native kernels, weight formats."""
        if self.loaded.device.type != "cpu":
            return f"{self.loaded.dtype} on {self.loaded.device}"
        from leanserve import kernels

        line = f"{torch.get_num_threads()} CPU threads ({os.cpu_count()} logical CPUs); {kernels.status()}"
        model = self.loaded.model
        q = model.quantized_summary()
        if q:
            line += f"; {q}"
        if model.native_decode and model.native_plan() is not None:
            line += "; decode steps run all layers in one native call"
        return line

    @property
    def kv_cache_tokens(self) -> int:
        return self.cache_config.num_tokens

    # ---- requests ----------------------------------------------------------------------------

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    priority: Priority = Priority.INTERACTIVE, tenant: str | None = None) -> None:
        """Queue a request. ValueError (with a message for the user) if it can never run."""
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        if "#" in request_id:
            raise ValueError("request ids must not contain '#' (the engine's suffix for the n choices)")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self.loaded.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        # one request's out-of-range id would fail the whole batch's step: refuse it here
        if any(t >= vocab for t in (params.logit_bias or {})):
            raise ValueError(f"logit_bias keys must be token ids in [0, {vocab})")
        if any(not 0 <= t < vocab for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; this model's context is {self.max_model_len} tokens "
                             "and at least one must be left to generate")
        group = _Group(request_id, ids, params)
        for i in range(params.n):
            rid = request_id if params.n == 1 else f"{request_id}#{i}"
            # n seeded samples must differ from each other and still be reproducible: seed + i, wrapped
            # into int64 so that every valid seed stays valid
            child = params if params.seed is None or i == 0 else dataclasses.replace(
                params, seed=(params.seed + i + 2**63) % 2**64 - 2**63)
            if i > 0 and child.prompt_logprobs is not None:
                # the prompt is scored once, by the first choice; the others may take it from the cache
                child = dataclasses.replace(child, prompt_logprobs=None, prompt_logprobs_start=0)
            req = Request(rid, ids, child, priority, tenant=tenant)
            seq = _Sequence(req, group, i, IncrementalDetokenizer(self.tokenizer, ids),
                            logprobs=[] if params.logprobs is not None else None,
                            prompt_logprobs={} if child.prompt_logprobs is not None else None)
            group.seqs.append(seq)
        for seq in group.seqs:
            self.scheduler.add_request(seq.request)
            self._seqs[seq.request.request_id] = seq
        self._groups[request_id] = group

    def abort_request(self, request_id: str, reason: str = "abort") -> RequestOutput | None:
        """Stop a request and free its blocks. Returns its last output (finished, unfinished choices
        ended with ``reason``) carrying the machine-seconds its work cost; None if it is not here."""
        group = self._groups.pop(request_id, None)
        if group is None:
            return None
        out = self._output(group)
        for c in out.outputs:
            if c.finish_reason is None:
                c.finish_reason = reason
        out.finished = True
        out.machine_seconds, out.prefill_seconds = self.meter.pop_split(request_id)
        for seq in group.seqs:
            self.scheduler.abort_request(seq.request.request_id)
            self._drop(seq)
        return out

    def has_unfinished(self) -> bool:
        return bool(self._groups)

    # ---- the step loop -----------------------------------------------------------------------

    def step(self) -> StepResult:
        """Schedule, run the model once, apply the sampled tokens. Returns the outputs of the requests
        that made progress (finished ones last time they appear) and the ids of those it ran. If the
        step fails, the requests it ran are dropped (final outputs ending with "error") and
        `StepError` names them; the engine is consistent again and keeps serving the rest."""
        start = time.perf_counter()  # the step's time, scheduling included, is what the meter splits
        try:
            self._propose()
            sched = self.scheduler.schedule()
        except Exception as e:  # a scheduler bug: no telling which requests it touched; drop them all
            raise self._fail(list(self._groups), e) from e
        if sched.is_empty:
            return StepResult()
        ran = list(dict.fromkeys(self._seqs[s.request.request_id].parent.request_id for s in sched.scheduled))
        try:
            return StepResult(self._run(sched, start), ran)
        except Exception as e:
            raise self._fail(ran, e) from e

    def _fail(self, request_ids: list[str], error: Exception) -> StepError:
        outputs = [o for o in (self.abort_request(rid, "error") for rid in request_ids) if o is not None]
        for o in outputs:
            o.error = f"the model step failed: {type(error).__name__}: {error}"
        # blocks named (hashed) in the failed step were never written: forget every block name
        self.kv_cache.reset_prefix_cache()
        log.error("engine step failed (%s: %s); dropped the %d request(s) of that step", type(error).__name__, error,
                  len(outputs), exc_info=error)
        return StepError(f"the model step failed: {type(error).__name__}: {error}", request_ids, outputs)

    def _run(self, sched: SchedulerOutput, start: float) -> list[RequestOutput]:
        work: dict[str, int] = {}  # tokens computed per request group (n > 1 samples bill as one)
        prefill: dict[str, int] = {}  # of those, prompt tokens (the rest are generated tokens)
        for s in sched.scheduled:
            gid = self._seqs[s.request.request_id].parent.request_id
            work[gid] = work.get(gid, 0) + s.num_new_tokens
            in_prompt = min(s.num_new_tokens, s.request.num_prompt_tokens - s.request.num_computed_tokens)
            if in_prompt > 0:
                prefill[gid] = prefill.get(gid, 0) + in_prompt
        result = self.runner.execute(sched)
        for rid, items in result.prompt_logprobs.items():
            seq = self._seqs[rid]
            assert seq.prompt_logprobs is not None
            seq.prompt_logprobs.update(items)
        for rid, vec in result.embeddings.items():
            self._seqs[rid].embedding = vec
        self._count_spec(sched, result.accepted)
        updated = self.scheduler.update(sched, result.sampled, result.accepted)
        touched: dict[str, _Group] = {}
        for req in updated:
            seq = self._seqs[req.request_id]
            rid = req.request_id
            lps = result.accepted_logprobs.get(rid, []) + ([result.logprobs[rid]] if rid in result.logprobs else [])
            new = len(result.accepted.get(rid, ())) + 1
            base = req.num_output_tokens - new
            for j, token in enumerate(req.output_token_ids[base:]):
                if self._append(seq, token, lps[j] if j < len(lps) else None, base + j + 1):
                    break
            touched[seq.parent.request_id] = seq.parent
        elapsed = time.perf_counter() - start
        self.meter.record_step(elapsed, work, prefill)
        if not prefill and self.proposer is not None:  # decode steps (drafts or not) fit the step cost
            self.step_cost.observe(sched.num_batched_tokens, elapsed - self._propose_seconds)
        if any(s.spec_token_ids for s in sched.scheduled):
            self.spec.verify_seconds += elapsed
        outputs = [self._output(g) for g in touched.values()]
        for g in touched.values():
            if g.finished:
                del self._groups[g.request_id]
                self.meter.pop_split(g.request_id)
        return outputs

    def _append(self, seq: _Sequence, token: int, logprob: TokenLogprob | None, n_out: int) -> bool:
        """Take output token number ``n_out`` (1-based; later ones may follow it from the same step,
        accepted drafts) and check the stop conditions. True if the sequence finished: any tokens
        after this one are dropped."""
        req, p = seq.request, seq.request.sampling_params
        if logprob is not None and seq.logprobs is not None:
            seq.logprobs.append(logprob)
        status: RequestStatus | None = None
        if token in self.eos_token_ids and not p.ignore_eos and n_out > p.min_tokens:
            status = RequestStatus.FINISHED_STOPPED
        elif token in p.stop_token_ids and n_out > p.min_tokens:
            status, seq.stop_reason = RequestStatus.FINISHED_STOPPED, token
        else:
            seq.text += seq.detok.add(token)
            if p.stop and n_out > p.min_tokens:
                hit = _find_stop(seq.text, p.stop, seq.detok, p.include_stop_str_in_output)
                if hit is not None:
                    seq.text, seq.stop_reason = hit
                    status = RequestStatus.FINISHED_STOPPED
        if status is None and ((p.max_tokens is not None and n_out >= p.max_tokens)
                               or req.num_prompt_tokens + n_out >= self.max_model_len):
            status = RequestStatus.FINISHED_LENGTH
        if status is None:
            return False
        del req.output_token_ids[n_out:]
        self.scheduler.finish_request(req.request_id, status)
        self._drop(seq)
        return True

    def _drop(self, seq: _Sequence) -> None:
        self._seqs.pop(seq.request.request_id, None)
        self.runner.reset_request(seq.request.request_id)
        if self.proposer is not None:
            self.proposer.finished(seq.request)

    # ---- speculative decoding ----------------------------------------------------------------

    def _propose(self) -> None:
        """Draft tokens for the decoding sequences, as many for each as ``plan_drafts`` finds worth
        their cost (none while more than ``speculative_max_batch`` decode)."""
        self._propose_seconds = 0.0
        if self.proposer is None:
            return
        running = self.scheduler.running
        decoding = [r for r in running if r.num_computed_tokens == r.num_tokens - 1]
        if not decoding or len(decoding) > self.config.speculative_max_batch:
            return
        t0 = time.perf_counter()
        limits = []
        for r in decoding:
            p = r.sampling_params
            room = self.max_model_len - r.num_tokens - 1  # the token sampled after the drafts must fit too
            if p.max_tokens is not None:
                room = min(room, p.max_tokens - r.num_output_tokens - 1)
            limits.append(max(0, min(self.config.num_speculative_tokens, room)))
        # a new sequence starts from the method's acceptance so far (8 drafts' worth of 0.5 before any)
        prior = (self.spec.num_accepted_tokens + 4) / (self.spec.num_draft_tokens + 8)
        alphas = [self._seqs[r.request_id].acceptance.value(prior) for r in decoding]
        prefilling = sum(r.num_tokens - r.num_computed_tokens for r in running if r.num_computed_tokens < r.num_tokens - 1)
        base = len(decoding) + min(prefilling, self.config.max_num_batched_tokens)
        a, b = self.step_cost.coefficients() or (1.0, self.step_cost.prior_slope)
        token_cost = getattr(self.proposer, "token_cost", None)  # a draft model's forwards; lookups: free
        ks = plan_drafts(alphas, limits, base, a, b, token_cost(len(decoding)) if token_cost is not None else 0.0)
        asked = [(r, k) for r, k in zip(decoding, ks) if k > 0]
        for r, k in zip(decoding, ks):
            r.spec_token_ids, r.spec_draft_probs = [], None
            if k == 0:
                self._seqs[r.request_id].acceptance.idle()
        if asked:
            drafts = propose_all(self.proposer, [r for r, _ in asked], [k for _, k in asked])
            for (r, k), d in zip(asked, drafts):
                r.spec_token_ids = d.tokens[:k]
                r.spec_draft_probs = d.probs
        self._propose_seconds = time.perf_counter() - t0
        self.spec.propose_seconds += self._propose_seconds

    def _count_spec(self, sched: SchedulerOutput, accepted: dict[str, list[int]]) -> None:
        """Acceptance counters, overall and per sequence (which sizes its next drafts)."""
        for s in sched.scheduled:
            if not s.spec_token_ids:
                continue
            k, a = len(s.spec_token_ids), len(accepted.get(s.request.request_id, ()))
            self.spec.record(k, a)
            seq = self._seqs.get(s.request.request_id)
            if seq is not None:
                seq.num_draft_tokens += k
                seq.num_accepted_tokens += a
                seq.acceptance.update(k, a)

    def _output(self, g: _Group) -> RequestOutput:
        outs = []
        hold = max((len(s) for s in g.params.stop), default=1) - 1
        for s in g.seqs:
            done = s.request.is_finished
            text = s.text if done or hold == 0 else s.text[:max(0, len(s.text) - hold)]  # a stop string may be forming
            outs.append(CompletionOutput(s.index, text, list(s.request.output_token_ids),
                                         s.request.status.value if done else None,
                                         list(s.logprobs) if s.logprobs is not None else None, s.stop_reason))
        cached = max(0, g.seqs[0].request.num_cached_tokens)
        prompt_lps = None
        if g.seqs[0].prompt_logprobs is not None:  # every choice scores the same prompt: the first's
            got = g.seqs[0].prompt_logprobs
            prompt_lps = [got.get(i) for i in range(len(g.prompt_token_ids))]
        return RequestOutput(g.request_id, g.prompt_token_ids, outs, cached, g.finished, g.error,
                             self.meter.charged(g.request_id), self.meter.charged_prefill(g.request_id), prompt_lps,
                             sum(s.num_draft_tokens for s in g.seqs), sum(s.num_accepted_tokens for s in g.seqs),
                             g.seqs[0].embedding)

    # ---- stats -------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "kv_cache_usage": self.kv_cache.usage,
            "prefix_cache_queries": self.kv_cache.prefix_cache_queries,
            "prefix_cache_hits": self.kv_cache.prefix_cache_hits,
            "num_preemptions": self.scheduler.num_preemptions_total,
            "spec_decode": self.spec.to_dict() if self.proposer is not None else None,
        }


@dataclass
class SpecStats:
    """Speculative decoding's counters (vLLM's spec_decode metrics): drafts verified, draft tokens,
    accepted tokens, acceptance per draft position, and the time spent proposing."""

    max_k: int
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    propose_seconds: float = 0.0  # asking the proposer for drafts
    verify_seconds: float = 0.0  # the steps that verified drafts (their whole time, other sequences' work included)
    accepted_per_pos: list[int] = field(default_factory=list)

    def record(self, k: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += k
        self.num_accepted_tokens += accepted
        if len(self.accepted_per_pos) < self.max_k:
            self.accepted_per_pos += [0] * (self.max_k - len(self.accepted_per_pos))
        for i in range(accepted):
            self.accepted_per_pos[i] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens per verifying step: the accepted drafts plus the one the target adds."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"num_drafts": self.num_drafts, "num_draft_tokens": self.num_draft_tokens,
                "num_accepted_tokens": self.num_accepted_tokens, "accepted_per_pos": list(self.accepted_per_pos),
                "acceptance_rate": self.acceptance_rate, "mean_acceptance_length": self.mean_acceptance_length,
                "propose_seconds": self.propose_seconds, "verify_seconds": self.verify_seconds}


def _find_stop(text: str, stops: Sequence[str], detok: IncrementalDetokenizer, include: bool) -> tuple[str, str] | None:
    """The earliest stop string in the text's recent tail -> (text cut before it, the stop string)."""
    best: tuple[int, str] | None = None
    for s in stops:
        # only the last delta can have completed a stop string: search from just before it
        i = text.find(s, max(0, len(text) - len(s) - 64))
        if i != -1 and (best is None or i < best[0]):
            best = (i, s)
    if best is None:
        return None
    i, s = best
    return (text[:i + len(s)] if include else text[:i]), s


class LLM:
    """Offline batch generation: ``LLM("smollm2-135m").generate(prompts, SamplingParams(...))``."""

    def __init__(self, model: str = EngineConfig.model, loaded: LoadedModel | None = None, **kwargs: Any) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs), loaded)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: str | list[str] | list[list[int]], sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: Priority = Priority.INTERACTIVE) -> list[RequestOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = sampling_params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} sampling params for {len(prompts)} prompts")
        ids = []
        for prompt, p in zip(prompts, plist):
            rid = self.engine.new_request_id()
            self.engine.add_request(rid, prompt, p, priority)
            ids.append(rid)
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = True) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.encode_chat(c) for c in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        from tqdm import tqdm

        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm or len(ids) < 2)
        start, n_out = time.perf_counter(), 0
        while self.engine.has_unfinished():
            for out in self.engine.step().outputs:
                if out.finished:
                    done[out.request_id] = out
                    n_out += out.num_generated_tokens
                    bar.update(1)
                    bar.set_postfix_str(f"{n_out / (time.perf_counter() - start):.1f} out tok/s")
        bar.close()
        return [done[i] for i in ids]
