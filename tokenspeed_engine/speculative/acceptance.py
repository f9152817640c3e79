"""Accepting draft tokens: greedy matching and speculative (rejection) sampling.

Notation for one request with ``k`` drafts ``d_1 .. d_k``: the verify forward feeds
``[t, d_1, .., d_k]`` and yields target distributions ``p_0 .. p_k``, where ``p_i`` is the
distribution of the token after input ``i``; ``q_i`` is the draft distribution ``d_i`` was
drawn from.

* Greedy: ``d_i`` is accepted while it equals ``argmax p_{i-1}``; the first mismatch (or,
  after ``k`` matches, position ``k``) contributes the target's own argmax: the "bonus"
  token. The emitted tokens are therefore exactly ``argmax p_0 .. argmax p_n``, which is
  what plain greedy decoding would have produced.
* Sampling (temperature > 0): ``d_i`` is accepted with probability ``min(1, p(d_i) / q(d_i))``;
  at the first rejection the token is drawn from ``max(p - q, 0)`` renormalised, and after
  ``k`` acceptances the bonus is drawn from ``p_k``. Each emitted token is then distributed
  exactly as ``p`` (Leviathan et al. 2023; Chen et al. 2023), for any draft distribution q.
  ``p`` is the same filtered distribution the plain sampler draws from (temperature,
  top-k, top-p, min-p).

Every random draw takes an explicit uniform, so a seeded request's draws come from its own
generator and the functions are deterministic given their inputs.
"""

from __future__ import annotations

import torch

from tokenspeed_engine.sampling import SamplingParams, _filter_logits


def sample_from_probs(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One draw per row of ``probs`` [R, V] (non-negative, any positive total) by inverting the
    CDF at ``u`` [R] in [0, 1); int64 [R]. Tokens with zero mass are never drawn."""
    cdf = probs.float().cumsum(-1)
    x = (u.float() * cdf[:, -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, x, right=True).squeeze(-1)
    # u * total may round up to the total: fall back to the last token that has mass
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1)
    return torch.minimum(idx, last)


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution the plain sampler draws from for ``params``, for each row of ``logits``
    [R, V]: one-hot at the argmax when greedy, else the filtered softmax. fp32 [R, V]."""
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return torch.stack([_filter_logits(row, params).softmax(-1) for row in logits])


def greedy_verify(drafts: torch.Tensor, target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy acceptance for a batch: ``drafts`` int64 [B, k], ``target_logits`` [B, k+1, V].

    Returns ``(n, tokens)``: n int64 [B] accepted drafts, tokens int64 [B, k+1] the target's
    argmax per position; request b emits ``tokens[b, : n[b] + 1]`` (its accepted drafts equal
    those argmaxes, then the bonus token).
    """
    tokens = target_logits.argmax(-1)
    k = drafts.shape[1]
    match = (drafts == tokens[:, :k]).long()
    return match.cumprod(1).sum(1), tokens


def rejection_verify(
    drafts: torch.Tensor,
    draft_probs: torch.Tensor,
    probs: torch.Tensor,
    u_accept: torch.Tensor,
    u_token: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling for a batch.

    Args:
        drafts: int64 [B, k], drawn from ``draft_probs``.
        draft_probs: [B, k, V], q_1 .. q_k.
        probs: [B, k+1, V], the target's p_0 .. p_k.
        u_accept: [B, k] uniforms in [0, 1) for the accept tests.
        u_token: [B] uniforms for the one token drawn from the residual (or p_k).

    Returns:
        ``(n, tokens)``: n int64 [B] accepted drafts; tokens int64 [B, k+1], of which request b
        emits ``tokens[b, : n[b] + 1]`` (accepted drafts, then the corrected / bonus token).
    """
    bsz, k = drafts.shape
    probs, draft_probs = probs.float(), draft_probs.float()
    idx = drafts.unsqueeze(-1)
    p_d = probs[:, :k].gather(-1, idx).squeeze(-1)
    q_d = draft_probs.gather(-1, idx).squeeze(-1)
    accept = u_accept.float() * q_d < p_d  # u < p/q without dividing (q_d > 0: d was drawn from q)
    n = accept.long().cumprod(1).sum(1)
    rows = torch.arange(bsz, device=drafts.device)
    p_n = probs[rows, n]
    # q at the rejected position; after k acceptances there is no draft left (q = 0: draw from p_k)
    q_pad = torch.cat([draft_probs, torch.zeros_like(draft_probs[:, :1])], dim=1)
    residual = (p_n - q_pad[rows, n]).clamp_min(0)
    # a rejection implies p(d) < q(d), hence residual mass > 0; rounding can still empty it
    empty = residual.sum(-1) <= 0
    residual = torch.where(empty.unsqueeze(-1), p_n, residual)
    tokens = torch.cat([drafts, torch.zeros_like(drafts[:, :1])], dim=1)
    tokens[rows, n] = sample_from_probs(residual, u_token)
    return n, tokens
