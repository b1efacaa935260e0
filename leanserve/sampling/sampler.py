"""Turns one row of logits per sequence into the next token (and, on request, its logprobs).

Order (vLLM v1 / OpenAI semantics; HF order for the truncation steps):

    raw logits ---------------------------------------------> logprobs (log_softmax, float32)
    logit_bias -> min_tokens -> penalties                     (can move the argmax: greedy sees them)
    temperature -> top-k -> top-p -> min-p -> exponential race (random rows only)

Random rows pick ``argmax(probs / q)`` with ``q ~ Exponential(1)``: that is an exact draw from
``probs`` (the "exponential race" / Gumbel-max trick) and, unlike ``torch.multinomial``, lets every
seeded row draw its own ``q`` from its own generator, so a seeded row's token depends only on its
seed and its own history, never on its batch neighbours.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from leanserve import kernels
from leanserve.types import SamplingParams, TokenLogprob

_NEG_INF = float("-inf")
# Smallest positive float32: q is clamped to it so a masked token (prob 0) never becomes 0/0 = NaN,
# which argmax would pick.
_TINY = torch.finfo(torch.float32).tiny


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """Index of the first maximum of each row, like ``argmax(dim=-1)`` (a NaN counts as the maximum).
    On CPU in float32/bfloat16 the native ``argmax_rows`` (kernels/csrc/fused.cpp); else ``max``'s
    indices, the same answer and 2-5x faster on CPU than ``argmax`` (2.5 vs 11.4 ms, 128 rows bf16)."""
    if (x.is_cpu and x.dim() == 2 and x.dtype in (torch.float32, torch.bfloat16) and x.shape[1] > 0
            and x.stride(1) == 1 and (ops := kernels.ops()) is not None):
        return ops.argmax_rows(x)
    return x.max(dim=-1).indices


@dataclass
class SamplingRow:
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # tokens generated so far for this sequence
    generator: torch.Generator | None  # per-request generator for seeded requests, else None


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per row
    logprobs: list[TokenLogprob | None]  # per row; None where params.logprobs is None


def _has_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _min_tokens_active(row: SamplingRow) -> bool:
    return len(row.output_token_ids) < row.params.min_tokens


def _needs_processing(row: SamplingRow) -> bool:
    p = row.params
    return bool(p.logit_bias) or _min_tokens_active(row) or _has_penalties(p)


def _index(idx: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(idx, dtype=torch.long, device=device)


def apply_logit_bias_(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Add each row's ``logit_bias`` in place; ids past the logits' width are ignored."""
    width = logits.shape[-1]
    r_idx: list[int] = []
    c_idx: list[int] = []
    vals: list[float] = []
    for i, row in enumerate(rows):
        for tok, bias in (row.params.logit_bias or {}).items():
            if tok < width:
                r_idx.append(i)
                c_idx.append(tok)
                vals.append(bias)
    if r_idx:
        dev = logits.device
        logits.index_put_(
            (_index(r_idx, dev), _index(c_idx, dev)),
            torch.tensor(vals, dtype=logits.dtype, device=dev),
            accumulate=True,  # add to the logit rather than overwrite it
        )


def apply_min_tokens_(logits: torch.Tensor, rows: Sequence[SamplingRow], eos_token_ids: Iterable[int]) -> None:
    """Until a row has ``min_tokens`` outputs, its EOS ids and stop_token_ids get -inf (in place).

    ignore_eos does not matter here: blocking EOS for a row that would not stop on it anyway is
    harmless, and stop_token_ids must be blocked either way.
    """
    width = logits.shape[-1]
    eos = tuple(eos_token_ids)
    r_idx: list[int] = []
    c_idx: list[int] = []
    for i, row in enumerate(rows):
        if _min_tokens_active(row):
            for tok in set(eos).union(row.params.stop_token_ids):
                if 0 <= tok < width:
                    r_idx.append(i)
                    c_idx.append(tok)
    if r_idx:
        dev = logits.device
        neg_inf = torch.tensor(_NEG_INF, dtype=logits.dtype, device=dev)
        logits.index_put_((_index(r_idx, dev), _index(c_idx, dev)), neg_inf)


def _token_bins(token_lists: Sequence[Sequence[int]], width: int, device: torch.device) -> torch.Tensor:
    """(len(token_lists), width) float32 counts of each token id per list."""
    counts = torch.zeros(len(token_lists), width, dtype=torch.float32, device=device)
    lens = [len(t) for t in token_lists]
    if sum(lens):
        toks = torch.cat([torch.as_tensor(t, dtype=torch.long) for t in token_lists]).to(device)
        row_of = torch.repeat_interleave(torch.arange(len(token_lists)), torch.tensor(lens)).to(device)
        counts.index_put_((row_of, toks), torch.ones_like(toks, dtype=torch.float32), accumulate=True)
    return counts


def apply_penalties_(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Repetition (HF/vLLM), frequency and presence (OpenAI) penalties, in place, vectorized over
    the rows that have any.

    repetition: tokens seen in prompt or output: logit > 0 -> logit / r, else logit * r.
    frequency/presence: over output tokens only: logit -= f * count; logit -= p * (count > 0).
    """
    sel = [i for i, row in enumerate(rows) if _has_penalties(row.params)]
    if not sel:
        return
    dev = logits.device
    width = logits.shape[-1]
    sel_t = _index(sel, dev)
    sub = logits.index_select(0, sel_t)
    params = [rows[i].params for i in sel]
    out_counts = _token_bins([rows[i].output_token_ids for i in sel], width, dev)
    out_seen = out_counts > 0

    if any(p.repetition_penalty != 1.0 for p in params):
        # Prompt ids only matter for rows with a repetition penalty; skip the rest's (long) prompts.
        prompts = [rows[i].prompt_token_ids if p.repetition_penalty != 1.0 else [] for i, p in zip(sel, params)]
        seen = out_seen | (_token_bins(prompts, width, dev) > 0)
        rep = torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32, device=dev)[:, None]
        penalized = torch.where(sub > 0, sub / rep, sub * rep)
        sub = torch.where(seen, penalized, sub)

    freq = torch.tensor([p.frequency_penalty for p in params], dtype=torch.float32, device=dev)[:, None]
    pres = torch.tensor([p.presence_penalty for p in params], dtype=torch.float32, device=dev)[:, None]
    sub = sub - freq * out_counts
    sub = sub - pres * out_seen.to(torch.float32)
    logits.index_copy_(0, sel_t, sub)


def process_logits(logits: torch.Tensor, rows: Sequence[SamplingRow], eos_token_ids: Iterable[int]) -> torch.Tensor:
    """The argmax-changing steps (logit_bias -> min_tokens -> penalties) on a float32 copy.

    Greedy rows take the argmax of exactly this tensor.
    """
    out = logits.to(torch.float32, copy=True)
    apply_logit_bias_(out, rows)
    apply_min_tokens_(out, rows, eos_token_ids)
    apply_penalties_(out, rows)
    return out


def apply_top_k_top_p_min_p(
    logits: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor | None,
) -> torch.Tensor:
    """Mask (temperature-scaled) logits to -inf outside each row's top-k, then top-p, then min-p set.

    Per-row tensors of shape (rows,); a disabled row carries top_k <= 0 or >= width, top_p >= 1,
    min_p = 0. Returns a new tensor.
    - top_k keeps every token tied with the k-th best value (HF/vLLM). It uses topk(max k), not a
      full-vocab sort, which is the expensive part of sampling.
    - top_p keeps the smallest prefix (best first) whose mass reaches top_p: a token survives when
      the mass strictly before it is < top_p, so the best token always survives. Needs a sort.
    - min_p drops tokens with prob < min_p * max_prob. Masking never removes the best token, so
      renormalization does not change this ratio and top-k before min-p changes nothing.
    """
    width = logits.shape[-1]
    dev = logits.device
    original = logits
    if top_k is not None:
        k = top_k.to(torch.long)
        active = (k > 0) & (k < width)
        if bool(active.any()):
            k_max = int(k[active].max())  # Sampler builds top_k on the CPU: no device sync
            k = torch.where(active, k, k_max).to(dev)
            kth = logits.topk(k_max, dim=-1).values.gather(1, (k - 1)[:, None])
            kth = kth.masked_fill(~active.to(dev)[:, None], _NEG_INF)
            logits = logits.masked_fill(logits < kth, _NEG_INF)
    if top_p is not None:
        p = top_p.to(device=dev, dtype=torch.float32)
        # A disabled row (p >= 1) must keep everything even if float32 cumsum rounds up to 1.0 early.
        p = torch.where(p >= 1.0, torch.full_like(p, 2.0), p)
        sorted_lg, order = logits.sort(dim=-1, descending=True)
        probs = sorted_lg.softmax(dim=-1)
        mass_before = torch.cat([torch.zeros_like(probs[:, :1]), probs.cumsum(dim=-1)[:, :-1]], dim=-1)
        drop_sorted = mass_before >= p[:, None]
        drop_sorted[:, 0] = False  # the best token always survives, even a top_p that rounds to 0 in float32
        logits = logits.masked_fill(torch.empty_like(drop_sorted).scatter_(1, order, drop_sorted), _NEG_INF)
    if min_p is not None:
        mp = min_p.to(device=dev, dtype=torch.float32)
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < probs.amax(dim=-1, keepdim=True) * mp[:, None], _NEG_INF)
    return logits.clone() if logits is original else logits


def exponential_noise(
    shape: tuple[int, int], generators: Sequence[torch.Generator | None], device: torch.device
) -> torch.Tensor:
    """Exponential(1) noise, one row per generator: seeded rows draw from their own generator
    (``torch.empty(vocab).exponential_(generator=g)``), unseeded rows share one global draw."""
    n, width = shape
    q = torch.empty(n, width, dtype=torch.float32, device=device)
    seeded = [i for i, g in enumerate(generators) if g is not None]
    if not seeded:
        q.exponential_()
    else:
        unseeded = [i for i, g in enumerate(generators) if g is None]
        if unseeded:
            shared = torch.empty(len(unseeded), width, dtype=torch.float32, device=device).exponential_()
            q[_index(unseeded, device)] = shared
        draws = []
        for i in seeded:
            g = generators[i]
            assert g is not None
            draws.append(torch.empty(width, dtype=torch.float32, device=g.device).exponential_(generator=g))
        q[_index(seeded, device)] = torch.stack(draws).to(device)
    return q.clamp_min_(_TINY)


def advance_generator(generator: torch.Generator, width: int, draws: int) -> None:
    """Move a seeded row's generator on by ``draws`` sampling steps, exactly as ``exponential_noise``
    consumes it (one Exponential(1) vector of ``width`` per step): speculative decoding samples a
    row per draft and then rewinds to the rows it used, so a seeded request draws the same numbers
    whether or not it speculates."""
    for _ in range(draws):
        torch.empty(width, dtype=torch.float32, device=generator.device).exponential_(generator=generator)


class Sampler:
    def __init__(self, vocab_size: int, eos_token_ids: Iterable[int]) -> None:
        # The model's logits may be wider than the tokenizer vocab (padded lm_head): every step works
        # on logits.shape[-1] columns; vocab_size is kept for callers only.
        self.vocab_size = vocab_size
        self.eos_token_ids: tuple[int, ...] = tuple(eos_token_ids)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be (len(rows)={len(rows)}, vocab), got {tuple(logits.shape)}")
        n = len(rows)
        if n == 0:
            return SamplerOutput([], [])
        greedy = [row.params.greedy for row in rows]
        want_lp = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
        processing = any(_needs_processing(row) for row in rows)

        # Hot path: plain greedy decode is one argmax (bf16 -> f32 is exact, so same answer as f32).
        if all(greedy) and not processing and not want_lp:
            return SamplerOutput(_argmax(logits).tolist(), [None] * n)

        dev = logits.device
        proc = process_logits(logits, rows, self.eos_token_ids) if processing else logits.to(torch.float32)
        random_rows = [i for i in range(n) if not greedy[i]]
        if not random_rows:
            tokens = _argmax(proc)
        else:
            tokens = torch.empty(n, dtype=torch.long, device=dev)
            greedy_rows = [i for i in range(n) if greedy[i]]
            if greedy_rows:
                g_t = _index(greedy_rows, dev)
                tokens[g_t] = _argmax(proc.index_select(0, g_t))
            r_t = _index(random_rows, dev) if greedy_rows else None
            sub = proc.index_select(0, r_t) if r_t is not None else proc
            sampled = self._sample_random(sub, [rows[i] for i in random_rows])
            if r_t is None:
                tokens = sampled
            else:
                tokens[r_t] = sampled
        token_ids: list[int] = tokens.tolist()
        return SamplerOutput(token_ids, self._logprobs(logits, rows, want_lp, tokens, token_ids))

    @staticmethod
    def _sample_random(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        probs = Sampler._random_probs(logits, rows)
        q = exponential_noise((len(rows), logits.shape[-1]), [row.generator for row in rows], logits.device)
        return _argmax(probs.div_(q))

    @staticmethod
    def _random_probs(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """The distribution random rows draw from: temperature, then top-k, top-p, min-p, softmax."""
        dev = logits.device
        width = logits.shape[-1]
        params = [row.params for row in rows]
        temp = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev)
        scaled = logits / temp[:, None]
        use_k = any(0 < p.top_k < width for p in params)
        use_p = any(p.top_p < 1.0 for p in params)
        use_min_p = any(p.min_p > 0.0 for p in params)
        if use_k or use_p or use_min_p:
            scaled = apply_top_k_top_p_min_p(
                scaled,
                torch.tensor([min(p.top_k, width) for p in params]) if use_k else None,
                torch.tensor([p.top_p for p in params], dtype=torch.float32) if use_p else None,
                torch.tensor([p.min_p for p in params], dtype=torch.float32) if use_min_p else None,
            )
        return scaled.softmax(dim=-1)

    def probs(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """(rows, vocab) float32: the distribution each row's token is drawn from (every processing
        step applied; a greedy row: one-hot at its argmax). Speculative sampling compares these."""
        proc = process_logits(logits, rows, self.eos_token_ids) if any(_needs_processing(r) for r in rows) \
            else logits.to(torch.float32)
        out = torch.zeros_like(proc).scatter_(1, _argmax(proc)[:, None], 1.0)  # greedy rows: one-hot
        random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
        if random_rows:
            r_t = _index(random_rows, proc.device)
            out[r_t] = self._random_probs(proc.index_select(0, r_t), [rows[i] for i in random_rows])
        return out

    @staticmethod
    def _logprobs(
        logits: torch.Tensor,
        rows: Sequence[SamplingRow],
        want: list[int],
        tokens: torch.Tensor,
        token_ids: list[int],
    ) -> list[TokenLogprob | None]:
        """Logprobs of the RAW logits (before bias/penalties/temperature), as OpenAI and vLLM report."""
        out: list[TokenLogprob | None] = [None] * len(rows)
        if not want:
            return out
        w_t = _index(want, logits.device)
        lp = torch.log_softmax(logits.index_select(0, w_t).to(torch.float32), dim=-1)
        chosen: list[float] = lp.gather(1, tokens.index_select(0, w_t)[:, None]).squeeze(1).tolist()
        max_n = min(max(rows[i].params.logprobs or 0 for i in want), lp.shape[-1])
        top_vals: list[list[float]] = []
        top_ids: list[list[int]] = []
        if max_n > 0:
            vals, ids = lp.topk(max_n, dim=-1)  # sorted, best first
            top_vals, top_ids = vals.tolist(), ids.tolist()
        for j, i in enumerate(want):
            k = rows[i].params.logprobs or 0
            top = list(zip(top_ids[j][:k], top_vals[j][:k])) if k else []
            out[i] = TokenLogprob(token_id=token_ids[i], logprob=chosen[j], top=top)
        return out


def token_logprobs(logits: torch.Tensor, targets: Sequence[int], top_n: int = 0) -> list[TokenLogprob]:
    """Each row's log-probability of its target token under the raw logits (float32 log-softmax),
    the target's rank (1 + how many tokens are strictly likelier: 1 is the argmax) and the
    ``top_n`` likeliest tokens, best first. For prompt logprobs, where the target is known."""
    x = logits.to(torch.float32)  # (rows, vocab); the log-softmax is never materialized
    lse = torch.logsumexp(x, dim=-1, keepdim=True)  # (rows, 1)
    tgt = torch.tensor(list(targets), dtype=torch.long, device=x.device)[:, None]
    target = x.gather(1, tgt)  # (rows, 1)
    ranks: list[int] = ((x > target).sum(dim=-1) + 1).tolist()
    values: list[float] = (target - lse).squeeze(1).tolist()
    k = min(top_n, x.shape[-1])
    tops: list[list[tuple[int, float]]] = [[] for _ in values]
    if k > 0:
        vals, ids = x.topk(k, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), (vals - lse).tolist())]
    return [TokenLogprob(t, v, top, rank) for t, v, top, rank in zip(targets, values, tops, ranks)]
