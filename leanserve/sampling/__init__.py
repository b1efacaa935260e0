"""Token sampling: logits -> next token ids (+ logprobs)."""

from leanserve.sampling.sampler import (
    Sampler,
    SamplerOutput,
    SamplingRow,
    apply_top_k_top_p_min_p,
    process_logits,
    token_logprobs,
)

__all__ = ["Sampler", "SamplerOutput", "SamplingRow", "apply_top_k_top_p_min_p", "process_logits", "token_logprobs"]
