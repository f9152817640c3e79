"""Greedy acceptance and rejection sampling (speculative/acceptance.py) against exact distributions."""

from __future__ import annotations

import itertools

import pytest
import torch

from tokenspeed_engine.sampling import SamplingParams, _filter_logits
from tokenspeed_engine.speculative.acceptance import (
    greedy_verify,
    rejection_verify,
    sample_from_probs,
    target_probs,
)


def test_greedy_verify_takes_the_longest_matching_prefix_then_the_target_token(gen):
    B, k, V = 7, 3, 11
    logits = torch.randn(B, k + 1, V, generator=gen)
    best = logits.argmax(-1)
    drafts = torch.randint(0, V, (B, k), generator=gen)
    want_n = [0, 1, 2, 3, 3, 1, 0]
    for b, n in enumerate(want_n):
        drafts[b, :n] = best[b, :n]
        if n < k:
            drafts[b, n] = (best[b, n] + 1) % V  # the first mismatch
    drafts[4] = best[4, :k]
    n, tokens = greedy_verify(drafts, logits)
    assert n.tolist() == want_n
    for b in range(B):  # emitted = accepted drafts + the target's token at the first mismatch / the bonus
        emitted = tokens[b, : n[b] + 1].tolist()
        assert emitted[: n[b]] == drafts[b, : n[b]].tolist() and emitted[-1] == int(best[b, n[b]])


def test_sample_from_probs_matches_the_distribution_and_never_draws_zero_mass(gen):
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]]).repeat(60000, 1)
    u = torch.rand(60000, generator=gen)
    freq = torch.bincount(sample_from_probs(probs, u), minlength=6).float() / 60000
    assert freq[[0, 2, 5]].sum() == 0
    assert (freq - probs[0]).abs().max() < 0.01  # std of a frequency here is <= 0.002
    edge = torch.tensor([0.0, 1.0 - 2**-24, 0.999999])  # the top of [0, 1) must not fall past the last mass
    assert sample_from_probs(probs[:3] * 3.7, edge).tolist() == [1, 4, 4]


def test_target_probs_is_the_plain_samplers_distribution(gen):
    logits = torch.randn(3, 50, generator=gen)
    greedy = target_probs(logits, SamplingParams(temperature=0.0))
    assert torch.equal(greedy.argmax(-1), logits.argmax(-1)) and torch.equal(greedy.sum(-1), torch.ones(3))
    p = SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.01)
    ref = torch.stack([_filter_logits(row, p).softmax(-1) for row in logits])
    assert torch.allclose(target_probs(logits, p), ref)


def _chain(V: int, gen: torch.Generator, sharp: float) -> torch.Tensor:
    return (torch.randn(V, V, generator=gen) * sharp).softmax(-1)


def _generate(P, Q, start: int, length: int, n: int, k: int, gen, verify) -> torch.Tensor:
    """``n`` sequences of ``length`` tokens after ``start`` by speculative steps (drafts from the
    chain Q, target chain P), vectorised over the sequences; returns [n, length]."""
    seq = torch.zeros(n, length, dtype=torch.long)
    filled = torch.zeros(n, dtype=torch.long)
    last = torch.full((n,), start, dtype=torch.long)
    rows = torch.arange(n)
    while bool((filled < length).any()):
        drafts, qs, ctx = [], [], last
        for _ in range(k):
            q = Q[ctx]
            d = sample_from_probs(q, torch.rand(n, generator=gen))
            drafts.append(d)
            qs.append(q)
            ctx = d
        drafts_t = torch.stack(drafts, 1)
        p = torch.stack([P[last]] + [P[d] for d in drafts], 1)  # p_i: after input i = [last, d_1 .. d_k]
        n_acc, tokens = verify(drafts_t, torch.stack(qs, 1), p, torch.rand(n, k, generator=gen), torch.rand(n, generator=gen))
        for j in range(k + 1):
            m = (j <= n_acc) & (filled + j < length)
            seq[rows[m], (filled + j)[m]] = tokens[m, j]
        got = torch.minimum(n_acc + 1, length - filled)
        filled = filled + got
        last = seq[rows, (filled - 1).clamp(min=0)]
    return seq


def _total_variation(seq: torch.Tensor, P: torch.Tensor, start: int) -> float:
    V, L = P.shape[0], seq.shape[1]
    counts = torch.bincount((seq * V ** torch.arange(L - 1, -1, -1)).sum(1), minlength=V**L).double() / seq.shape[0]
    exact = torch.zeros(V**L, dtype=torch.float64)
    for i, toks in enumerate(itertools.product(range(V), repeat=L)):
        prob, prev = 1.0, start
        for t in toks:
            prob *= float(P[prev, t])
            prev = t
        exact[i] = prob
    return 0.5 * float((counts - exact).abs().sum())


def _resample_from_target(drafts, q, p, u_acc, u_tok):
    """A classic bug, for contrast: the correction token drawn from p instead of max(p - q, 0)."""
    n, tokens = rejection_verify(drafts, q, p, u_acc, u_tok)
    rows = torch.arange(drafts.shape[0])
    tokens[rows, n] = sample_from_probs(p[rows, n], u_tok)
    return n, tokens


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rejection_sampling_preserves_the_target_distribution(k):
    """Sequences of 3 tokens over a 4-token vocabulary from a target Markov chain P with drafts from a
    different chain Q: the empirical distribution over all 64 sequences must match P's exactly (up to
    sampling noise, ~0.016 total variation at this size), while drafting from Q alone or the classic
    wrong correction would be far off."""
    gen = torch.Generator().manual_seed(1234 + k)
    V, L, N = 4, 3, 40000
    P, Q = _chain(V, gen, 1.5), _chain(V, gen, 1.5)
    seq = _generate(P, Q, 0, L, N, k, gen, rejection_verify)
    tv = _total_variation(seq, P, 0)
    assert tv < 0.035, f"total variation {tv:.4f} from the target"
    # the test can fail: the draft chain and the wrong correction are both detected
    assert _total_variation(_generate(Q, Q, 0, L, N, k, gen, rejection_verify), P, 0) > 0.1
    assert _total_variation(_generate(P, Q, 0, L, N, k, gen, _resample_from_target), P, 0) > 0.05


def test_rejection_with_one_hot_distributions_is_greedy(gen):
    B, k, V = 16, 3, 9
    logits = torch.randn(B, k + 1, V, generator=gen)
    draft_logits = logits[:, :k] + torch.randn(B, k, V, generator=gen) * 0.8
    drafts = draft_logits.argmax(-1)
    one_hot = lambda x: torch.nn.functional.one_hot(x.argmax(-1), V).float()  # noqa: E731
    n, tokens = rejection_verify(
        drafts, one_hot(draft_logits), one_hot(logits), torch.rand(B, k, generator=gen), torch.rand(B, generator=gen)
    )
    n_g, tokens_g = greedy_verify(drafts, logits)
    assert torch.equal(n, n_g)
    for b in range(B):
        assert tokens[b, : n[b] + 1].tolist() == tokens_g[b, : n[b] + 1].tolist()
