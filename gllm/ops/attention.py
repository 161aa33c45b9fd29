"""Default attention path on the paged KV cache (CPU and any torch device).

The cache of one layer is a tensor ``[2, num_blocks, block_size, kv_heads, head_dim]`` (keys, values).
A step first writes the new tokens' K/V into their slots, then attends:

* query (decode) attention: one token per sequence, all such sequences in one batched call over their
  gathered blocks, with a padding mask for sequences shorter than the longest;
* short-chunk attention: chunks of a few tokens (the candidates of a score request, short prompt
  tails) padded to the longest of them and run in one batched call, like decodes;
* context attention: each longer prompt chunk attends to its cached prefix and causally among itself.

Every path takes a layer's ``window`` (a sliding-window layer sees the last ``window`` positions, its own
included: key ``k`` is visible from query ``p`` when ``p - window < k <= p``) and ``softcap`` (scores
become ``softcap * tanh(score / softcap)`` before the mask and softmax, Gemma 2). SDPA has no soft-cap, so
soft-capped attention runs as plain products (``_attention``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gllm.ops.metadata import AttentionMetadata


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store new keys and values ``[T, kv_heads, D]`` in the cache at their flat slots ``[T]``."""
    _, num_blocks, block_size, kv_heads, head_dim = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * block_size, kv_heads, head_dim)
    flat[0].index_copy_(0, slot_mapping, k)
    flat[1].index_copy_(0, slot_mapping, v)


def _gather(kv_cache: torch.Tensor, block_tables: torch.Tensor, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of a batch of sequences laid out contiguously: ``[B, kv_heads, num_blocks * bs, D]``.

    ``index_select`` over a flat view copies whole blocks; it is several times faster on the CPU than
    advanced indexing of the 5-D cache.
    """
    two, total, bs, kvh, dim = kv_cache.shape
    tables = block_tables[:, :num_blocks]
    batch = tables.shape[0]
    blocks = kv_cache.view(two, total, bs * kvh * dim).index_select(1, tables.reshape(-1))
    blocks = blocks.view(two, batch, num_blocks * bs, kvh, dim).transpose(2, 3)
    return blocks[0], blocks[1]


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, softcap: float | None
) -> torch.Tensor:
    """``softmax(q k^T scale) v`` over ``q [B, Hq, Q, D]``, ``k``/``v [B, Hk, L, D]`` (``Hk`` divides ``Hq``)
    with a boolean ``mask`` broadcastable to ``[B, Hq, Q, L]``; SDPA unless scores are soft-capped."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    scores = (torch.tanh(scores / softcap) * softcap).masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1).to(v.dtype), v)


def _visible(keys: torch.Tensor, query_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Which key positions ``keys`` each query position sees (broadcast): causal, within the window."""
    seen = keys <= query_pos
    return seen if window is None else seen & (keys > query_pos - window)


def decode_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, max_len: int,
    scale: float, window: int | None = None, softcap: float | None = None,
) -> torch.Tensor:  # fmt: skip
    """One query token per sequence: ``q [B, H, D]`` over each sequence's first ``seq_lens`` cached tokens.

    The query heads that share a KV head become the "query length" of one attention call per KV head
    (grouped-query attention without copying K/V per query head).
    """
    batch, num_heads, dim = q.shape
    block_size, kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    k, v = _gather(kv_cache, block_tables, -(-max_len // block_size))
    keys = torch.arange(k.shape[2], device=q.device)
    valid = _visible(keys, seq_lens.unsqueeze(1) - 1, window)  # [B, L]: padding and window
    grouped = q.view(batch, kv_heads, num_heads // kv_heads, dim)
    out = _attention(grouped, k, v, valid[:, None, None, :], scale, softcap)
    return out.reshape(batch, num_heads, dim)


def decode_rows_one_by_one(
    q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, max_len: int,
    scale: float, window: int | None = None, softcap: float | None = None,
) -> torch.Tensor:  # fmt: skip
    """``decode_attention`` one row at a time, each padded only to its own length: a row's output then
    depends on nothing else in the batch (exact replay on backends without a per-row kernel)."""
    lens = seq_lens.tolist()
    return torch.cat([
        decode_attention(q[i : i + 1], kv_cache, block_tables[i : i + 1], seq_lens[i : i + 1], lens[i], scale,
                         window, softcap)
        for i in range(q.shape[0])
    ])


def context_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int, scale: float,
    window: int | None = None, softcap: float | None = None,
) -> torch.Tensor:  # fmt: skip
    """A prompt chunk ``q [Q, H, D]`` at the end of a ``seq_len``-token context: causal, offset by the prefix.

    With a window, only the blocks from the first one the chunk's first query sees are gathered.
    """
    q_len = q.shape[0]
    block_size = kv_cache.shape[2]
    first = 0 if window is None else max(0, seq_len - q_len - window + 1) // block_size
    blocks = -(-seq_len // block_size) - first
    k, v = _gather(kv_cache, block_table[first:].unsqueeze(0), blocks)
    start = first * block_size  # position of the first gathered key
    k, v = k[:, :, : seq_len - start], v[:, :, : seq_len - start]
    qt = q.transpose(0, 1).unsqueeze(0)  # [1, H, Q, D]
    if q_len == seq_len and window is None and softcap is None:
        out = F.scaled_dot_product_attention(qt, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        query_pos = torch.arange(seq_len - q_len, seq_len, device=q.device).unsqueeze(1)
        mask = _visible(torch.arange(start, seq_len, device=q.device).unsqueeze(0), query_pos, window)
        out = _attention(qt, k, v, mask, scale, softcap)
    return out.squeeze(0).transpose(0, 1)


SHORT_CHUNK = 16  # prompt chunks up to this many tokens are batched together (short_chunk_attention)


def short_chunk_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, seqs: list[int], starts: list[int], scale: float,
    window: int | None = None, softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Several short chunks in one call: sequences ``seqs`` of ``meta`` whose new tokens start at packed
    rows ``starts``. Returns the attention output of their rows and the packed row index of each.

    Each chunk is padded to the longest one (padding rows repeat its last query and are dropped); the
    query heads of a KV head and the chunk's positions fold together into one query axis, as in
    ``decode_attention``, and a per-row mask is causal with the offset of the cached prefix.
    """
    dev, (_, num_heads, dim) = q.device, q.shape
    block_size, kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_heads // kv_heads
    q_lens = [meta.query_lens_list[i] for i in seqs]
    width = max(q_lens)
    pad = [[start + min(j, n - 1) for j in range(width)] for start, n in zip(starts, q_lens)]
    qp = q[torch.tensor(pad, device=dev)]  # [B, W, H, D]
    batch = qp.shape[0]
    index = torch.tensor(seqs, device=dev)
    max_len = max(meta.seq_lens_list[i] for i in seqs)
    k, v = _gather(kv_cache, meta.block_tables.index_select(0, index), -(-max_len // block_size))
    grouped = qp.view(batch, width, kv_heads, group, dim).permute(0, 2, 3, 1, 4).reshape(batch, kv_heads, -1, dim)
    seq_lens, lens = meta.seq_lens.index_select(0, index), torch.tensor(q_lens, device=dev)
    last = seq_lens[:, None] - lens[:, None] + torch.arange(width, device=dev).clamp(max=lens[:, None] - 1)
    mask = _visible(torch.arange(k.shape[2], device=dev), last[:, :, None], window)  # [B, W, L]
    mask = mask[:, None].expand(batch, group, width, k.shape[2]).reshape(batch, 1, group * width, k.shape[2])
    out = _attention(grouped, k, v, mask, scale, softcap)
    out = out.view(batch, kv_heads, group, width, dim).permute(0, 3, 1, 2, 4).reshape(batch * width, num_heads, dim)
    keep = [b * width + j for b, n in enumerate(q_lens) for j in range(n)]
    rows = [start + j for start, n in zip(starts, q_lens) for j in range(n)]
    return out[torch.tensor(keep, device=dev)], torch.tensor(rows, device=dev)


def paged_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
    window: int | None = None, softcap: float | None = None, decode=decode_attention,
) -> torch.Tensor:  # fmt: skip
    """Attention for a whole packed batch ``q [T, H, D]``: decodes in one call, then each prompt chunk.

    ``decode`` is the kernel for the one-token part (``decode_attention`` or a kernel of that signature).
    """
    nd = meta.num_decodes
    masks = {"window": window, "softcap": softcap}
    if nd == meta.num_seqs:
        return decode(q, kv_cache, meta.block_tables, meta.seq_lens, max(meta.seq_lens_list), scale, **masks)
    out = torch.empty_like(q)
    if nd:
        out[:nd] = decode(
            q[:nd], kv_cache, meta.block_tables[:nd], meta.seq_lens[:nd], max(meta.seq_lens_list[:nd]), scale, **masks
        )
    start, short, short_starts = nd, [], []
    for i in range(nd, meta.num_seqs):
        q_len = meta.query_lens_list[i]
        if q_len <= SHORT_CHUNK:
            short.append(i)
            short_starts.append(start)
        else:
            out[start : start + q_len] = context_attention(
                q[start : start + q_len], kv_cache, meta.block_tables[i], meta.seq_lens_list[i], scale, **masks
            )
        start += q_len
    if len(short) == 1:
        i, s0 = short[0], short_starts[0]
        n = meta.query_lens_list[i]
        out[s0 : s0 + n] = context_attention(
            q[s0 : s0 + n], kv_cache, meta.block_tables[i], meta.seq_lens_list[i], scale, **masks
        )
    elif short:
        values, rows = short_chunk_attention(q, kv_cache, meta, short, short_starts, scale, **masks)
        out[rows] = values
    return out
