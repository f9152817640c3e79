"""Torch references of the attention ops (see tokenspeed_kernels.ops for contracts)."""

from __future__ import annotations

import math

import torch


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, visible: torch.Tensor | None):
    """q [R, D], k [L, D], v [L, Dv], visible [R, L] bool or None -> out [R, Dv], lse [R]."""
    scores = (q @ k.transpose(-1, -2)) * scale
    if visible is not None:
        scores = scores.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    has_key = torch.isfinite(lse)
    p = torch.exp(scores - torch.where(has_key, lse, torch.zeros_like(lse)).unsqueeze(-1))
    p = torch.where(has_key.unsqueeze(-1), p, torch.zeros_like(p))
    return p @ v, lse


def mla_decode_ref(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    causal: bool = True,
    head_dim_v: int = 512,
    kv_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``tokenspeed::mla_decode``; gathers each sequence's tokens page by page."""
    batch, q_len, heads, dim = q.shape
    page_size = kv_cache.shape[1]
    acc = _acc_dtype(q)
    out = torch.zeros(batch, q_len, heads, head_dim_v, dtype=q.dtype, device=q.device)
    lse = torch.full((batch, q_len, heads), -math.inf, dtype=torch.float32, device=q.device)
    for b in range(batch):
        length = int(cache_seqlens[b])
        if length == 0:
            continue
        n_pages = -(-length // page_size)
        pages = [kv_cache[int(block_table[b, p])] for p in range(n_pages)]
        kv = torch.cat(pages, dim=0)[:length].to(acc)
        if kv_scale is not None:
            kv = kv * kv_scale.to(acc)
        rows = q[b].to(acc).reshape(q_len * heads, dim)  # row = i * heads + h
        visible = None
        if causal:
            query_pos = torch.arange(q_len, device=q.device).repeat_interleave(heads) + (length - q_len)
            visible = torch.arange(length, device=q.device).unsqueeze(0) <= query_pos.unsqueeze(1)
        o, row_lse = _attend(rows, kv, kv[:, :head_dim_v], softmax_scale, visible)
        out[b] = o.reshape(q_len, heads, head_dim_v).to(q.dtype)
        lse[b] = row_lse.reshape(q_len, heads).float()
    return out, lse


def mla_prefill_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``tokenspeed::mla_prefill``, one sequence and one head group at a time."""
    del max_seqlen_q, max_seqlen_k  # only bounds for kernels' grids
    heads, kv_heads = q.shape[1], k.shape[1]
    group = heads // kv_heads
    acc = _acc_dtype(q)
    out = torch.zeros(q.shape[0], heads, v.shape[2], dtype=q.dtype, device=q.device)
    lse = torch.full((q.shape[0], heads), -math.inf, dtype=torch.float32, device=q.device)
    for b in range(cu_seqlens_q.numel() - 1):
        q0, q1 = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        k0, k1 = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
        lq, lk = q1 - q0, k1 - k0
        if lq == 0 or lk == 0:
            continue
        visible = None
        if causal:
            visible = torch.arange(lk, device=q.device).unsqueeze(0) <= (
                torch.arange(lq, device=q.device).unsqueeze(1) + (lk - lq)
            )
        for h in range(heads):
            kh = h // group
            o, row_lse = _attend(q[q0:q1, h].to(acc), k[k0:k1, kh].to(acc), v[k0:k1, kh].to(acc), softmax_scale, visible)
            out[q0:q1, h] = o.to(q.dtype)
            lse[q0:q1, h] = row_lse.float()
    return out, lse


def merge_attn_states_ref(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``tokenspeed::merge_attn_states``: a two-way logsumexp weighting."""
    acc = _acc_dtype(out_a)
    both = torch.stack([lse_a.to(acc), lse_b.to(acc)])
    lse = torch.logsumexp(both, dim=0)
    finite = torch.isfinite(lse)
    w = torch.where(finite, torch.exp(both - torch.where(finite, lse, torch.zeros_like(lse))), torch.zeros_like(both))
    out = out_a.to(acc) * w[0].unsqueeze(-1) + out_b.to(acc) * w[1].unsqueeze(-1)
    return out.to(out_a.dtype), lse.float()
