"""Reference paged attention: slow, obviously right, and the oracle every fast path is tested against."""

from __future__ import annotations

import math

import torch

from gllm.ops.metadata import AttentionMetadata


def gather_sequence_kv(
    kv_cache: torch.Tensor, block_table: list[int], seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy one sequence's first ``seq_len`` keys and values out of its blocks: ``[seq_len, kv_heads, D]``."""
    block_size = kv_cache.shape[2]
    keys, values = [], []
    for i in range(math.ceil(seq_len / block_size)):
        used = min(block_size, seq_len - i * block_size)
        keys.append(kv_cache[0, block_table[i], :used])
        values.append(kv_cache[1, block_table[i], :used])
    return torch.cat(keys), torch.cat(values)


def reference_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
    window: int | None = None, softcap: float | None = None,
) -> torch.Tensor:  # fmt: skip
    """Attention of packed queries ``[T, H, D]`` over the cache (new K/V already written): ``[T, H, D]``.

    One sequence at a time: gather its blocks, expand the KV heads to the query heads (GQA), and take
    ``softmax(q k^T * scale + mask) v`` in float32 with an explicit causal mask, offset by the cached prefix.
    ``window``: a query at position ``p`` sees keys ``p - window < k <= p``; ``softcap``: scores become
    ``softcap * tanh(score / softcap)`` before the mask.
    """
    out = torch.empty_like(q)
    num_heads = q.shape[1]
    start = 0
    for i, (q_len, seq_len) in enumerate(zip(meta.query_lens_list, meta.seq_lens_list)):
        table = meta.block_tables[i].tolist()
        k, v = gather_sequence_kv(kv_cache, table, seq_len)
        group = num_heads // k.shape[1]
        k = k.float().repeat_interleave(group, dim=1)  # [S, H, D]
        v = v.float().repeat_interleave(group, dim=1)
        qi = q[start : start + q_len].float()  # [Q, H, D]
        scores = torch.einsum("qhd,shd->hqs", qi, k) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        query_pos = torch.arange(seq_len - q_len, seq_len).unsqueeze(1)
        key_pos = torch.arange(seq_len).unsqueeze(0)
        hidden = key_pos > query_pos
        if window is not None:
            hidden |= key_pos <= query_pos - window
        scores = scores.masked_fill(hidden, float("-inf"))
        out[start : start + q_len] = torch.einsum("hqs,shd->qhd", scores.softmax(-1), v).to(q.dtype)
        start += q_len
    return out
