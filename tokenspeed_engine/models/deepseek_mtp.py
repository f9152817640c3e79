"""DeepSeek-V3 NextN (MTP) drafting, and MTP models for tests and benchmarks.

The NextN layer itself is :class:`~tokenspeed_engine.models.deepseek_v3.DeepseekV3MTPLayer`
(``enorm`` / ``hnorm``, ``eh_proj`` over ``[embed(token t+1); hidden t]``, one decoder block,
then the shared head), loaded from the checkpoint's ``model.layers.{num_hidden_layers}``
and run by ``DeepseekV3ForCausalLM.forward_mtp``. Its KV lives in the cache layer after the
main layers, in the same pages as the target's: MTP row j (at position j) combines the
target's hidden state of token j with token j+1 and predicts token j+2.

Drafting ``k`` tokens (:func:`draft_tokens`): the first draft comes from the MTP pass over
the tokens the target just verified (or the prompt); each further draft runs the layer
once more on the previous draft, feeding the layer's own output hidden state in place of
the target's (which does not exist yet for a draft token), as DeepSeek's MTP modules chain.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from tokenspeed_engine.models.configs import DeepseekV3Config, randomize_
from tokenspeed_engine.speculative.batches import decode_batch

# logits [B, vocab] of one MTP step -> (draft tokens int64 [B], draft distributions or None)
DraftChooser = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
# (batch, prev_hidden [B, hidden]) -> (logits [B, vocab], hidden [B, hidden]); default: eager forward_mtp
MTPStep = Callable[[Any, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def require_mtp(model: Any) -> None:
    """ValueError unless ``model`` is a DeepSeek-V3 with a loaded NextN layer."""
    from tokenspeed_engine.models.deepseek_v3 import DeepseekV3ForCausalLM

    if not isinstance(model, DeepseekV3ForCausalLM):
        raise ValueError(f"speculative_num_steps: MTP drafting needs a DeepSeek-V3 model, got {type(model).__name__}")
    if len(model.mtp) == 0:
        raise ValueError(
            "speculative_num_steps: the model has no MTP (NextN) layer loaded; the checkpoint needs "
            "num_nextn_predict_layers >= 1 and its model.layers.{num_hidden_layers}.* weights"
        )


@torch.inference_mode()
def draft_tokens(
    model: Any,
    kv_cache: Any,
    first: torch.Tensor,
    hidden: torch.Tensor,
    start: np.ndarray,
    pages: np.ndarray,
    page_size: int,
    num_steps: int,
    choose: DraftChooser,
    mtp_step: MTPStep | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Run the MTP layer recursively to extend each sequence's first draft to ``num_steps``.

    Args:
        first: int64 [B], draft 1 (from the MTP pass that ended the previous step).
        hidden: [B, hidden], the MTP output hidden state of the row that drafted ``first``.
        start: [B], the position of the token before draft 1 (the verify's first position):
            draft j+1 is made by an MTP row at position ``start + j - 1`` (inside the KV the
            scheduler reserved for the verify, rewritten by the MTP pass after it).
        pages: int32 [B, W], block-table rows covering ``start + num_steps`` tokens.
        choose: picks the draft tokens from one step's logits (argmax, or a draw from q).

    Returns:
        ``(drafts, probs)``: drafts int64 [B, num_steps] (column 0 is ``first``); probs the
        chooser's distribution of drafts 2 .. num_steps (one entry per step, None if greedy).
    """
    drafts, probs = [first], []
    device = first.device
    step = mtp_step or (lambda batch, h: model.forward_mtp(batch, kv_cache, h, return_hidden=True))
    for j in range(1, num_steps):
        batch = decode_batch(np.asarray(start) + j - 1, 1, pages, page_size, drafts[-1], device)
        logits, hidden = step(batch, hidden)
        token, q = choose(logits)
        drafts.append(token)
        probs.append(q)
    return torch.stack(drafts, dim=1), probs


def build_random_mtp_model(
    config: DeepseekV3Config,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    std: float = 0.02,
    num_mtp_layers: int = 1,
) -> Any:
    """A DeepSeek-V3 of ``config`` with ``num_mtp_layers`` NextN layers, all weights random."""
    import dataclasses

    from tokenspeed_engine.models import build_model

    config = dataclasses.replace(config, num_nextn_predict_layers=max(config.num_nextn_predict_layers, num_mtp_layers))
    with torch.device(device):
        model = build_model(config, dtype=dtype, device=device, num_mtp_layers=num_mtp_layers)
    return randomize_(model, seed, std)


@torch.no_grad()
def make_perfect_draft_(model: Any, tokens: Sequence[int], seed: int = 0, scale: float = 1e4) -> dict[int, int]:
    """Set weights so that, on ``tokens``, the target's next token is a fixed function f of the
    current token and the MTP layer computes the same f: every draft is then the target's choice.

    How: token ``tokens[c]`` embeds as ``scale`` times the unit vector of coordinate c, so the
    residual stream is dominated by that direction through every layer (the attention and MLP
    outputs, computed from normalised inputs, are orders of magnitude smaller); the LM head
    maps direction c to ``f(tokens[c])`` with a logit far above every other row. The MTP
    layer's ``eh_proj`` passes the (normalised) embedding of token t+1 through with the same
    scale and ignores the hidden half, so its final hidden state points the same way and the
    shared head gives f(t+1), which is the target's prediction at t+1. Attention, MoE and the
    MTP block still run on real random weights; they only cannot outvote the embedding.

    Returns f as a dict (a random permutation of ``tokens``). The model must have untied
    embeddings, an MTP layer and ``hidden_size >= len(tokens)``.
    """
    require_mtp(model)
    cfg = model.config
    tokens = [int(t) for t in tokens]
    h = cfg.hidden_size
    if cfg.tie_word_embeddings:
        raise ValueError("make_perfect_draft_: needs untied embeddings")
    if model.model.embed_tokens.group.size != 1:
        raise ValueError("make_perfect_draft_: needs an unsharded vocabulary (one attention rank)")
    if len(set(tokens)) != len(tokens) or len(tokens) > h or not tokens:
        raise ValueError(f"make_perfect_draft_: need 1..{h} distinct tokens, got {len(tokens)}")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(tokens), generator=gen).tolist()
    f = {tokens[c]: tokens[perm[c]] for c in range(len(tokens))}
    embed = model.model.embed_tokens.weight
    head = model.lm_head.weight
    ids = torch.tensor(tokens, device=embed.device)
    embed[ids] = 0
    embed[ids, torch.arange(len(tokens), device=embed.device)] = scale
    # each direction c votes for f(tokens[c]) with weight 1; random rows stay ~N(0, std)
    targets = torch.tensor([f[t] for t in tokens], device=head.device)
    head[targets, torch.arange(len(tokens), device=head.device)] = 1.0
    for mtp in model.mtp:
        w = mtp.input.eh_proj.weight  # [h, 2h]: [embedding half | hidden half]
        w.zero_()
        w[:, :h] = torch.eye(h, dtype=w.dtype, device=w.device) * (scale / h**0.5)
        mtp.input.enorm.weight.fill_(1.0)
    return f
