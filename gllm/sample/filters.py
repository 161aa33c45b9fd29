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


CANDIDATES = 512  # a long row is filtered among its best tokens when the decision falls inside them


def filter_logits(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Top-k, then top-p over what top-k left (renormalised); ``None`` skips a filter.

    Works in sorted order and scatters the mask back, so a batch costs one sort whatever mix of settings
    its rows use. On the CPU a row longer than ``CANDIDATES`` sorts only its best ``CANDIDATES`` tokens,
    which decides it whenever its last kept token ranks above the smallest of them (a full sort of a
    50,000-token vocabulary costs more than a decode step); otherwise that row is sorted in full.
    Tokens already at ``-inf`` stay there.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    if top_k is None and top_p is None:
        return logits
    vocab = logits.shape[1]
    k = None if top_k is None else top_k.to(device=logits.device, dtype=torch.long)
    # On the CPU only: the check reads values back, which would stall a GPU's queue (where sorting is cheap).
    if logits.device.type == "cpu" and vocab > CANDIDATES and (k is None or int(k.max()) < CANDIDATES):
        mask, undecided = _filter_best(logits, k, top_p)
        if undecided.any():  # only those rows are sorted in full: a row's mask never depends on the others
            rows = undecided.nonzero().squeeze(1)
            mask[rows] = _full_sort_mask(logits[rows], None if k is None else k[rows],
                                         None if top_p is None else top_p.to(logits.device)[rows])
        return logits.masked_fill(mask, float("-inf"))
    return logits.masked_fill(_full_sort_mask(logits, k, top_p), float("-inf"))


def _full_sort_mask(logits: torch.Tensor, k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    drop = _drop_sorted(sorted_logits, k, top_p, logits.shape[1], None)
    return torch.empty_like(drop).scatter_(1, order, drop)


def _drop_sorted(
    sorted_logits: torch.Tensor, k: torch.Tensor | None, top_p: torch.Tensor | None, vocab: int,
    norm: torch.Tensor | None,
) -> torch.Tensor:  # fmt: skip
    """Which of a row's tokens, ranked best first, the filters drop. ``norm``: the log-sum-exp of each
    row's whole distribution when ``sorted_logits`` holds only its best tokens (None: they are all)."""
    batch, width = sorted_logits.shape
    position = torch.arange(width, device=sorted_logits.device)
    drop = torch.zeros(batch, width, dtype=torch.bool, device=sorted_logits.device)
    if k is not None:
        drop |= position >= torch.where(k > 0, k, vocab)[:, None]
    if top_p is not None:
        p = top_p.to(device=sorted_logits.device, dtype=torch.float32)[:, None]
        masked = sorted_logits.float().masked_fill(drop, float("-inf"))
        if norm is None:
            probs = torch.softmax(masked, dim=-1)
        else:  # a top-k set lies wholly among the best tokens; other rows normalise over all of theirs
            limited = torch.zeros(batch, dtype=torch.bool, device=drop.device) if k is None else k > 0
            probs = torch.exp(masked - torch.where(limited, torch.logsumexp(masked, dim=-1), norm)[:, None])
        cumulative = torch.cumsum(probs, dim=-1)
        # Probability ranked strictly before each token; shifted rather than subtracted so it never
        # decreases along the row and the kept set is always a prefix.
        before = torch.cat([torch.zeros_like(cumulative[:, :1]), cumulative[:, :-1]], dim=-1)
        # position > 0: the best token stays even if a tiny top_p rounded to 0 in float32.
        drop |= (before >= p) & (p < 1.0) & (position > 0)
    return drop


def _filter_best(
    logits: torch.Tensor, k: torch.Tensor | None, top_p: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask of ``filter_logits`` from each row's best ``CANDIDATES`` tokens, and which rows it does not
    decide: filtered rows that keep a token tied with the smallest candidate (tokens left out may tie
    with it too)."""
    batch, vocab = logits.shape
    values, ids = torch.topk(logits, CANDIDATES, dim=-1)  # ties in no fixed order: re-rank them
    ids, by_id = ids.sort(dim=-1)
    values, by_value = values.gather(1, by_id).sort(dim=-1, descending=True, stable=True)
    ids = ids.gather(1, by_value)
    norm = None if top_p is None else torch.logsumexp(logits.float(), dim=-1)
    drop = _drop_sorted(values, k, top_p, vocab, norm)
    filtered = torch.zeros(batch, dtype=torch.bool, device=logits.device)
    if k is not None:
        filtered |= k > 0
    if top_p is not None:
        filtered |= top_p.to(logits.device) < 1.0
    kept = (~drop).sum(dim=-1)
    last_kept = values.gather(1, (kept - 1).clamp(min=0)[:, None])[:, 0]
    mask = filtered[:, None].expand(batch, vocab).clone()  # a filtered row drops every token left out
    return mask.scatter_(1, ids, drop), filtered & (last_kept <= values[:, -1])
