"""SchedulerOutput -> one flat batch -> one model forward -> sampled tokens (StepOutput).

The flat batch, for scheduled requests A (prefill chunk of 3) and B, C (decode)::

    input_ids : a0 a1 a2 | b7 | c4        positions: 0 1 2 | 7 | 4
    slot_mapping: where each token's K/V goes (see model/attention.py)
    sample rows : the last row of each request whose chunk reaches its end (a2 if A's prompt is
                  done, b7, c4); only those rows go through the LM head.
"""

from __future__ import annotations

import torch

from leanserve.config import CacheConfig
from leanserve.model.attention import AttentionMetadata, GatherWorkspace, kv_row_width
from leanserve.model.loader import LoadedModel
from leanserve.sampling.rejection import rejection_sample
from leanserve.sampling.sampler import Sampler, SamplingRow, advance_generator, token_logprobs
from leanserve.types import Request, SchedulerOutput, StepOutput


def kv_cache_torch_dtype(loaded: LoadedModel, kv_cache_dtype: str = "auto") -> torch.dtype:
    """The caches' element type: the model's dtype, or int8 for the 8-bit cache (model/attention.py)."""
    return torch.int8 if kv_cache_dtype == "int8" else loaded.dtype


def kv_cache_block_bytes(loaded: LoadedModel, block_size: int, kv_cache_dtype: str = "auto") -> int:
    """Bytes of one block of every layer's K and V (the 8-bit cache: each row's scale included)."""
    cfg, dtype = loaded.config, kv_cache_torch_dtype(loaded, kv_cache_dtype)
    row = kv_row_width(cfg.head_dim, dtype) * torch.empty(0, dtype=dtype).element_size()
    return 2 * cfg.num_layers * cfg.num_kv_heads * row * block_size


LOGIT_ROWS = 128  # rows whose logits are computed at once (128 x 49k float32: 25 MB)


class ModelRunner:
    def __init__(self, loaded: LoadedModel, cache_config: CacheConfig) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        self.block_size = cache_config.block_size
        cfg = loaded.config
        dtype = kv_cache_torch_dtype(loaded, cache_config.kv_cache_dtype)
        shape = (cache_config.num_blocks, cache_config.block_size, cfg.num_kv_heads, kv_row_width(cfg.head_dim, dtype))
        self.kv_caches = [(torch.zeros(shape, dtype=dtype, device=self.device),
                           torch.zeros(shape, dtype=dtype, device=self.device)) for _ in range(cfg.num_layers)]
        self.windows = set(cfg.layer_windows)
        self.sampler = Sampler(cfg.vocab_size, loaded.eos_token_ids)
        self.generators: dict[str, torch.Generator] = {}
        self.pooled: dict[str, tuple[torch.Tensor, int]] = {}  # embedding requests: (sum of hidden rows, rows)
        self.workspace = GatherWorkspace()

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> StepOutput:
        input_ids: list[int] = []
        positions: list[int] = []
        query_lens, context_lens, tables = [], [], []
        sample_rows: list[int] = []
        sampling: list[tuple[Request, list[int]]] = []  # the requests that sample, with the drafts they verify
        # prompt logprobs: (flat row, request, prompt index of the token that row's logits predict)
        prompt_rows: list[tuple[int, Request, int]] = []
        pool_rows: list[tuple[Request, int, int, bool]] = []  # embedding: (request, first flat row, rows, last chunk)
        for s in out.scheduled:
            r, start, n = s.request, s.request.num_computed_tokens, s.num_new_tokens
            if r.sampling_params.embed and start < r.num_prompt_tokens:
                k = min(n, r.num_prompt_tokens - start)
                if start == 0:  # a first chunk, or a preempted request's recompute: start over
                    self.pooled.pop(r.request_id, None)
                pool_rows.append((r, len(input_ids), k, start + k == r.num_prompt_tokens))
            if r.sampling_params.prompt_logprobs is not None:
                first = max(r.sampling_params.prompt_logprobs_start, 1)
                base = len(input_ids) - start  # flat row of position q is base + q
                for q in range(max(start, first - 1), min(start + n, r.num_prompt_tokens - 1)):
                    prompt_rows.append((base + q, r, q + 1))
            drafts = s.spec_token_ids
            input_ids += _token_slice(r, start, n - len(drafts)) + drafts
            positions += range(start, start + n)
            query_lens.append(n)
            context_lens.append(start + n)
            tables.append(s.block_ids)
            if s.samples:  # with drafts: one row more for each, each predicting the token after it
                sample_rows += range(len(input_ids) - 1 - len(drafts), len(input_ids))
                sampling.append((r, drafts))
        meta = AttentionMetadata.build(query_lens, context_lens, tables, self.block_size, self.windows, self.device)
        meta.workspace = self.workspace
        ids_t = torch.tensor(input_ids, dtype=torch.long).to(self.device, non_blocking=True)
        pos_t = torch.tensor(positions, dtype=torch.long).to(self.device, non_blocking=True)
        hidden = self.model(ids_t, pos_t, meta, self.kv_caches)  # (num_tokens, hidden_size)
        result = StepOutput()
        for r, lo, k, last in pool_rows:
            part = hidden[lo:lo + k].float().sum(0)  # (hidden_size,)
            acc, count = self.pooled.get(r.request_id, (0.0, 0))
            acc, count = acc + part, count + k
            if last:
                self.pooled.pop(r.request_id, None)
                mean = acc / count
                result.embeddings[r.request_id] = (mean / mean.norm().clamp_min(1e-12)).tolist()
            else:
                self.pooled[r.request_id] = (acc, count)
        sample_logits = self._logits(hidden, prompt_rows, sample_rows, result)
        if not sampling:
            return result
        rows = [self._sampling_row(r, drafts[:i]) for r, drafts in sampling for i in range(len(drafts) + 1)]
        states = {r.request_id: g.get_state() for r, drafts in sampling
                  if drafts and (g := self.generators.get(r.request_id)) is not None}
        sampled = self.sampler(sample_logits, rows)
        i = 0
        for r, drafts in sampling:
            lo, hi = i, i + len(drafts) + 1
            i = hi
            q = r.spec_draft_probs
            if drafts and q is not None and not r.sampling_params.greedy:
                # drafts drawn from a draft model's distribution: speculative sampling's acceptance rule
                m, tokens, lps = self._rejection_sample(r, drafts, q, sample_logits[lo:hi], rows[lo:hi])
            else:
                # the target sampled every row itself (greedy: its argmax): a draft stands while it
                # equals what the target produced in its place, and the first row that differs, or the
                # row after the last draft, gives one more token. Lossless: every emitted token is the
                # target's (rejection sampling with a point-mass draft distribution).
                tokens, lps = sampled.token_ids[lo:hi], sampled.logprobs[lo:hi]
                m = 0
                while m < len(drafts) and tokens[m] == drafts[m]:
                    m += 1
            result.sampled[r.request_id] = tokens[m]
            if lps[m] is not None:
                result.logprobs[r.request_id] = lps[m]
            if drafts:
                result.accepted[r.request_id] = drafts[:m]
                result.accepted_logprobs[r.request_id] = [lp for lp in lps[:m] if lp is not None]
                if r.request_id in states and m < len(drafts):  # as if only the m + 1 used rows had drawn
                    gen = self.generators[r.request_id]
                    gen.set_state(states[r.request_id])
                    advance_generator(gen, sample_logits.shape[-1], m + 1)
        return result

    def _rejection_sample(self, r: Request, drafts: list[int], q: torch.Tensor, logits: torch.Tensor,
                          rows: list[SamplingRow]) -> tuple[int, list[int], list]:
        """-> (accepted drafts m, the rows' tokens with the emitted one at m, their logprobs). Only
        unseeded requests carry draft distributions (engine/draft.py), so the global generator draws."""
        p = self.sampler.probs(logits, rows)
        k, width = len(drafts), p.shape[-1]
        q = q[:k, :width].to(device=p.device, dtype=p.dtype)
        if q.shape[-1] < width:  # a draft model with a narrower (unpadded) vocabulary
            q = torch.nn.functional.pad(q, (0, width - q.shape[-1]))
        draft_t = torch.tensor(drafts, dtype=torch.long, device=p.device)
        accepted, nxt = rejection_sample(p[None], q[None], draft_t[None])
        m = int(accepted[0])
        tokens = drafts[:m] + [int(nxt[0])] + drafts[m + 1:]
        want = list(range(m + 1)) if r.sampling_params.logprobs is not None else []
        tok_t = torch.tensor(tokens, dtype=torch.long, device=p.device)
        lps = Sampler._logprobs(logits, rows, want, tok_t, tokens) if want else [None] * len(tokens)
        return m, tokens, lps

    def _logits(self, hidden: torch.Tensor, prompt_rows: list[tuple[int, Request, int]], sample_rows: list[int],
                result: StepOutput) -> torch.Tensor | None:
        """The LM head over the prompt-logprob rows and then the sample rows, in slices of
        ``LOGIT_ROWS`` (a long prefill never holds all its logits; few rows read the head's weights
        once, not once for each kind). Each asked-for prompt token's logprob (with rank and top-N)
        goes into ``result``; returns the sample rows' logits (None: none)."""
        flat = [row for row, _, _ in prompt_rows] + sample_rows
        kept: list[torch.Tensor] = []
        for lo in range(0, len(flat), LOGIT_ROWS):
            rows = torch.tensor(flat[lo:lo + LOGIT_ROWS], dtype=torch.long, device=self.device)
            logits = self.model.compute_logits(hidden[rows])  # (rows, vocab_size)
            part = prompt_rows[lo:lo + LOGIT_ROWS]
            if part:
                targets = [r.prompt_token_ids[i] for _, r, i in part]
                top_n = max(r.sampling_params.prompt_logprobs or 0 for _, r, _ in part)
                for (_, r, i), lp in zip(part, token_logprobs(logits[:len(part)], targets, top_n)):
                    lp.top = lp.top[:r.sampling_params.prompt_logprobs or 0]
                    result.prompt_logprobs.setdefault(r.request_id, []).append((i, lp))
            if len(part) < logits.shape[0]:
                kept.append(logits[len(part):])
        if not kept:
            return None
        return kept[0] if len(kept) == 1 else torch.cat(kept)

    def _sampling_row(self, r: Request, drafts: list[int]) -> SamplingRow:
        """The row that predicts the token after ``drafts`` (penalties and min_tokens see them as output)."""
        p = r.sampling_params
        gen = None
        if p.seed is not None and not p.greedy:
            gen = self.generators.get(r.request_id)
            if gen is None:
                gen = self.generators[r.request_id] = torch.Generator(device=self.device).manual_seed(p.seed)
        return SamplingRow(p, r.prompt_token_ids, r.output_token_ids + drafts if drafts else r.output_token_ids, gen)

    def reset_request(self, request_id: str) -> None:
        """A finished request's generator and pooled rows go; a preempted one's restart so recompute is exact."""
        self.generators.pop(request_id, None)
        self.pooled.pop(request_id, None)


def _token_slice(r: Request, start: int, n: int) -> list[int]:
    p = r.num_prompt_tokens
    if start >= p:  # decode: only generated tokens, no concatenation of the whole history
        return r.output_token_ids[start - p:start - p + n]
    if start + n <= p:
        return r.prompt_token_ids[start:start + n]
    return r.prompt_token_ids[start:] + r.output_token_ids[:start + n - p]
