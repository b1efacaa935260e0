"""Draft-model proposers for speculative decoding: a smaller model with the target's tokenizer
(``--draft-model NAME``), or the target's own first layers with its final norm and head
(``--draft-model self:N``: no second model, no more weights).

The draft keeps its own paged KV cache (its own blocks, as many tokens as the target's cache). For
each sequence it remembers which tokens its cache holds; a call feeds what is new since (the prompt
the first time, then the tokens the target accepted and added) and then generates k tokens one
forward at a time, all speculating sequences batched together. Drafts the target rejects leave stale
KV slots that the next call writes over: the cache is only ever trusted up to the longest prefix it
shares with the sequence.

Greedy and seeded requests draft the draft's argmax, which the runner checks against the target's
own draw at each row: a seeded request's output is then the very one it gets without speculation.
Unseeded sampling requests draw their drafts from the draft's distribution under the request's own
sampling settings and hand those distributions to the runner, whose rejection sampler
(sampling/rejection.py) keeps the target's distribution exactly and accepts more of them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from leanserve.model.attention import AttentionMetadata, GatherWorkspace
from leanserve.model.base import CausalLM
from leanserve.model.loader import LoadedModel
from leanserve.sampling.sampler import Sampler, SamplingRow, _argmax, exponential_noise, process_logits
from leanserve.spec.adaptive import StepCostModel
from leanserve.spec.proposer import Draft, SpecSequence
from leanserve.tokenizer import LeanTokenizer
from leanserve.types import Request

log = logging.getLogger("leanserve")


class TokenizerMismatch(ValueError):
    pass


def check_same_tokenizer(target: LeanTokenizer, draft: LeanTokenizer, draft_name: str) -> None:
    """A draft must spell every token as the target does: same vocabulary (token -> id, special
    tokens included) and the same end-of-sequence ids. TokenizerMismatch (one line) otherwise."""
    tv, dv = target.tok.get_vocab(with_added_tokens=True), draft.tok.get_vocab(with_added_tokens=True)
    if tv != dv:
        differ = len(set(tv.items()) ^ set(dv.items()))
        raise TokenizerMismatch(
            f"draft model {draft_name} has another tokenizer than the target ({len(dv)} vs {len(tv)} tokens, "
            f"{differ} token/id pairs differ): a draft must share the target's tokenizer")
    if set(target.eos_token_ids) != set(draft.eos_token_ids):
        raise TokenizerMismatch(f"draft model {draft_name} ends sequences with token ids {sorted(draft.eos_token_ids)}, "
                                f"the target with {sorted(target.eos_token_ids)}: a draft must share the target's tokenizer")


@dataclass
class _State:
    blocks: list[int] = field(default_factory=list)
    cached: list[int] = field(default_factory=list)  # the tokens whose K/V the draft's cache holds, in order


class DraftModelProposer:
    """``Proposer`` over a draft model (a smaller one, or ``CausalLM.shallow_prefix`` of the target)."""

    name = "draft"

    def __init__(self, model: CausalLM, label: str, num_tokens: int, block_size: int, eos_token_ids: frozenset[int],
                 dtype: torch.dtype, device: torch.device) -> None:
        cfg = model.cfg
        self.model, self.label, self.block_size, self.device = model, label, block_size, device
        self.num_blocks = max(1, num_tokens // block_size)
        shape = (self.num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                          for _ in range(cfg.num_layers)]
        self.kv_bytes = sum(k.numel() * k.element_size() * 2 for k, _ in self.kv_caches)
        self.windows = set(cfg.layer_windows)
        self.sampler = Sampler(cfg.vocab_size, eos_token_ids)
        self.workspace = GatherWorkspace()
        self._free = list(range(self.num_blocks - 1, -1, -1))
        self._states: dict[str, _State] = {}
        self.forward_cost = StepCostModel(prior_slope=0.1)  # the draft's one-token-per-sequence forwards

    def token_cost(self, num_seqs: int) -> float:
        """Seconds one draft token costs when ``num_seqs`` sequences draft together (0 until measured)."""
        ab = self.forward_cost.coefficients()
        if ab is None or num_seqs < 1:
            return 0.0
        return ab[0] / num_seqs + ab[1]

    @classmethod
    def build(cls, spec: str, target: LoadedModel, num_tokens: int, block_size: int) -> DraftModelProposer:
        """``self:N`` (the target's first N layers) or a model name/path (loaded in the target's dtype
        and device, its tokenizer checked against the target's)."""
        if spec.startswith("self"):
            n_text = spec.removeprefix("self").removeprefix(":")
            total = target.config.num_layers
            try:
                n = int(n_text) if n_text else max(1, total // 4)
            except ValueError:
                raise ValueError(f"--draft-model {spec!r}: expected self or self:N (N layers of the target)") from None
            if not 1 <= n < total:
                raise ValueError(f"--draft-model {spec!r}: the target has {total} layers; a self-draft takes 1 to {total - 1}")
            model = target.model.shallow_prefix(n)
            label = f"self:{n} (the first {n} of the target's {total} layers, its final norm and head)"
        else:
            from leanserve.model.loader import load_config_and_tokenizer, load_model, resolve

            _, tokenizer, _ = load_config_and_tokenizer(resolve(spec))  # checked before loading any weight
            check_same_tokenizer(target.tokenizer, tokenizer, spec)
            draft = load_model(spec, target.dtype, target.device)
            model, label = draft.model, f"{spec} ({draft.config.num_layers} layers)"
        return cls(model, label, num_tokens, block_size, target.eos_token_ids, target.dtype, target.device)

    # ---- Proposer ---------------------------------------------------------------------------

    def propose(self, seq: SpecSequence, k: int) -> list[int]:
        return self.propose_batch([seq], [k])[0].tokens

    def finished(self, seq: SpecSequence) -> None:
        st = self._states.pop(seq.request_id, None)
        if st is not None:
            self._free += st.blocks

    @torch.inference_mode()
    def propose_batch(self, seqs: list[SpecSequence], ks: list[int]) -> list[Draft]:
        out = [Draft([]) for _ in seqs]
        # per speculating sequence: [index, state, tokens to feed, first position, drafts left]
        live: list[list] = []
        for i, (seq, k) in enumerate(zip(seqs, ks)):
            if k <= 0:
                continue
            tokens = seq.prompt_token_ids + seq.output_token_ids
            st = self._states.get(seq.request_id)
            if st is None:
                st = self._states[seq.request_id] = _State()
            keep = _common_prefix(st.cached, tokens, len(tokens) - 1)  # feed at least the last token
            if not self._reserve(st, len(tokens) + k - 1):  # the last draft is never fed back
                continue
            st.cached = tokens[:keep]
            live.append([i, st, tokens[keep:], keep, k])
        probs: dict[int, list[torch.Tensor]] = {}
        first = True
        while live:
            t0 = time.perf_counter()
            ids, pos, qlens, clens, tables = [], [], [], [], []
            for _, st, feed, start, _ in live:
                ids += feed
                pos += range(start, start + len(feed))
                qlens.append(len(feed))
                clens.append(start + len(feed))
                tables.append(st.blocks)
            meta = AttentionMetadata.build(qlens, clens, tables, self.block_size, self.windows, self.device)
            meta.workspace = self.workspace
            hidden = self.model(torch.tensor(ids, dtype=torch.long, device=self.device),
                                torch.tensor(pos, dtype=torch.long, device=self.device), meta, self.kv_caches)
            last = torch.tensor([sum(qlens[:j + 1]) - 1 for j in range(len(live))], device=self.device)
            logits = self.model.compute_logits(hidden[last])
            rows = [self._row(seqs[i], out[i].tokens) for i, *_ in live]
            tokens = self._draw(logits, rows, probs, [i for i, *_ in live])
            nxt = []
            for entry, token in zip(live, tokens):
                i, st, feed, start, left = entry
                st.cached += feed
                out[i].tokens.append(token)
                if left > 1:
                    nxt.append([i, st, [token], start + len(feed), left - 1])
            if not first:  # the first forward catches up (prompts, accepted tokens): not a draft's cost
                self.forward_cost.observe(len(live), time.perf_counter() - t0)
            first = False
            live = nxt
        for i, rows_p in probs.items():
            out[i].probs = torch.stack(rows_p)
        return out

    # ---- internals --------------------------------------------------------------------------

    def _draw(self, logits: torch.Tensor, rows: list[SamplingRow], probs: dict[int, list[torch.Tensor]],
              owners: list[int]) -> list[int]:
        """Greedy and seeded rows: the draft's argmax (after the request's logit processing).
        Unseeded random rows: a draw from the draft's distribution, kept for the rejection sampler."""
        sampling = [not r.params.greedy and r.params.seed is None for r in rows]
        if not any(sampling):
            return _argmax(process_logits(logits, rows, self.sampler.eos_token_ids)).tolist()
        dist = self.sampler.probs(logits, rows)
        noise = exponential_noise(tuple(dist.shape), [None] * len(rows), dist.device)
        drawn = (dist / noise).argmax(dim=-1).tolist()
        top = dist.argmax(dim=-1).tolist()
        for j, i in enumerate(owners):
            if sampling[j]:
                probs.setdefault(i, []).append(dist[j])
        return [d if s else t for d, t, s in zip(drawn, top, sampling)]

    @staticmethod
    def _row(seq: SpecSequence, drafts: list[int]) -> SamplingRow:
        assert isinstance(seq, Request)
        return SamplingRow(seq.sampling_params, seq.prompt_token_ids, seq.output_token_ids + drafts, None)

    def _reserve(self, st: _State, num_tokens: int) -> bool:
        need = -(-num_tokens // self.block_size) - len(st.blocks)
        if need > len(self._free):
            return False  # the draft's cache is full: no drafts for this sequence this step
        for _ in range(max(0, need)):
            st.blocks.append(self._free.pop())
        return True

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    if a[:n] == b[:n]:  # the usual case, compared at C speed
        return n
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
