"""Top-k and top-p masks, per row of a batch, with one sort shared by both.

Tie rule: both filters rank a row's tokens by (logit descending, index ascending) and keep a prefix of
that order. top-k keeps exactly ``k`` tokens, so among tokens tied at the boundary the lowest indices
stay; this makes ``top_k=1`` pick what ``torch.argmax`` picks. top-p keeps the shortest prefix whose
probability reaches ``top_p``: token ``i`` stays when the probability of the tokens ranked before it is
below ``top_p``, so the most likely token always stays and ties at the boundary again favour low indices.
"""

from __future__ import annotations

import torch


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Mask with ``-inf`` all but each row's ``top_k`` best tokens; ``logits [B, V]``, ``top_k [B]``, 0 = off."""
    return filter_logits(logits, top_k=top_k, top_p=None)


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask with ``-inf`` all but each row's nucleus of probability ``top_p`` (in (0, 1], 1 = off)."""
    return filter_logits(logits, top_k=None, top_p=top_p)


def filter_logits(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Top-k, then top-p over what top-k left (renormalised); ``None`` skips a filter.

    Works in sorted order and scatters the mask back, so a batch costs one stable sort whatever mix of
    settings its rows use. Tokens already at ``-inf`` stay there.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    if top_k is None and top_p is None:
        return logits
    batch, vocab = logits.shape
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    position = torch.arange(vocab, device=logits.device)
    drop = torch.zeros(batch, vocab, dtype=torch.bool, device=logits.device)
    if top_k is not None:
        k = top_k.to(device=logits.device, dtype=torch.long)
        k = torch.where(k > 0, k, vocab)
        drop |= position >= k[:, None]
    if top_p is not None:
        p = top_p.to(device=logits.device, dtype=torch.float32)[:, None]
        probs = torch.softmax(sorted_logits.float().masked_fill(drop, float("-inf")), dim=-1)
        cumulative = torch.cumsum(probs, dim=-1)
        # Probability ranked strictly before each token; shifted rather than subtracted so it never
        # decreases along the row and the kept set is always a prefix.
        before = torch.cat([torch.zeros_like(cumulative[:, :1]), cumulative[:, :-1]], dim=-1)
        # position > 0: the best token stays even if a tiny top_p rounded to 0 in float32.
        drop |= (before >= p) & (p < 1.0) & (position > 0)
    mask = torch.empty_like(drop).scatter_(1, order, drop)
    return logits.masked_fill(mask, float("-inf"))
