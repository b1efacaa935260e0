"""Speculative sampling's acceptance rule for drafts drawn from a draft model's distribution
(Leviathan et al. 2023, Chen et al. 2023): the emitted tokens are distributed exactly as if the
target had sampled them one at a time.

For draft token x_i drawn from q_i, accept it with probability min(1, p_i(x_i) / q_i(x_i)); at the
first rejection emit a token from the residual distribution norm(max(0, p_i - q_i)) (the correction
step) and stop; if every draft stands, emit one more from p_k. P(emit x) = q(x) min(1, p(x)/q(x)) +
P(reject) norm(p - q)+(x) = min(q, p)(x) + (p - q)+(x) = p(x).

Drafts that are single tokens with no distribution (prompt lookup, suffix index) need none of this:
the runner samples the target's own token at each row and keeps a draft while it matches, which is
this rule with q a point mass (accept with p(x); residual: p without x).
"""

from __future__ import annotations

import torch

from leanserve.sampling.sampler import exponential_noise


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) along the last axis; where p <= q everywhere (then p == q and a rejection
    has probability 0) p itself."""
    r = (p - q).clamp_min_(0)
    total = r.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp_min(torch.finfo(r.dtype).tiny), p)


def rejection_sample(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """p: (B, k + 1, V) target probabilities at each draft row and the row after the last;
    q: (B, k, V) the draft distributions the drafts (B, k) were drawn from. Returns (accepted (B,):
    how many drafts stand, a prefix; next (B,): the token emitted after them). Draws k uniforms and
    then one Exponential(1) vector per row from ``generator`` (the global one if None)."""
    b, k1, v = p.shape
    k = k1 - 1
    if q.shape != (b, k, v) or drafts.shape != (b, k):
        raise ValueError(f"shapes: p {tuple(p.shape)}, q {tuple(q.shape)}, drafts {tuple(drafts.shape)}")
    idx = drafts.to(torch.long)[..., None]
    p_d = p[:, :k].gather(2, idx).squeeze(2)
    q_d = q.gather(2, idx).squeeze(2)
    u = torch.rand(b, k, dtype=p.dtype, generator=generator, device=p.device)
    rejected = u * q_d >= p_d  # accept with probability min(1, p/q)
    first = rejected.to(torch.int8).argmax(dim=1)
    accepted = torch.where(rejected.any(dim=1), first, torch.full_like(first, k))
    rows = torch.arange(b, device=p.device)
    p_m = p[rows, accepted]
    q_m = torch.cat([q, torch.zeros_like(p[:, :1])], dim=1)[rows, accepted]  # after the last draft: q = 0
    dist = residual(p_m, q_m)
    noise = exponential_noise((b, v), [generator] * b if generator is not None else [None] * b, p.device)
    return accepted, (dist / noise).argmax(dim=-1)
