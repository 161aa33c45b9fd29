"""Triton attention for prompt chunks over the paged KV cache, and the whole-batch entry of the Triton backend.

``triton_paged_attention`` runs a packed batch in at most two launches: the decode kernel of
``gllm.ops.triton_attention`` for the leading one-token sequences, and the chunk kernel here for every
prompt chunk, whatever their number. (The torch path loops over chunks in Python; with 64 prompts in a
step that loop, not the GPU, set the pace.)

``_chunk_kernel``: grid ``(chunks, kv_heads, query tiles)``. A program takes ``BLOCK_Q`` consecutive
tokens of one chunk and the ``GROUP`` query heads of one KV head, folded into one axis of rows, so each
K/V tile is loaded once for all of them. A chunk of ``q`` tokens in a ``seq_len``-token sequence sits at
positions ``seq_len - q .. seq_len - 1``: each row attends to the cached prefix and causally within the
chunk, reading K/V in place through the block table, with an online softmax in float32.
"""

from __future__ import annotations

import torch

from gllm.ops.metadata import AttentionMetadata
from gllm.ops.triton_attention import _TILE, _dot_dtype, _jitted, _pad, _scores, tl, triton_decode_attention

_ROWS = 64  # query rows (tokens x heads of a group) per program: one tl.dot tile


def _chunk_kernel(
    q_ptr, cache_ptr, tables_ptr, seq_lens_ptr, starts_ptr, out_ptr,
    stride_qt, stride_qh, stride_kv, stride_block, stride_token, stride_head, stride_table, stride_ot, stride_oh,
    first_seq, scale, window, softcap,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
):  # fmt: skip
    seq = first_seq + tl.program_id(0)
    kv_head = tl.program_id(1)
    first = tl.program_id(2) * BLOCK_Q  # first token of this program, counted in the chunk
    q_start = tl.load(starts_ptr + seq)
    q_len = tl.load(starts_ptr + seq + 1) - q_start
    if first < q_len:
        seq_len = tl.load(seq_lens_ptr + seq)
        prefix = seq_len - q_len  # position of the chunk's first token
        rows = tl.arange(0, ROWS)
        token = first + rows // GROUP
        heads = kv_head * GROUP + rows % GROUP
        row_ok = (rows < BLOCK_Q * GROUP) & (token < q_len)
        dims = tl.arange(0, DIM_PAD)
        dim_ok = dims < HEAD_DIM
        cols = tl.arange(0, TILE)
        q_rows = (q_start + token).to(tl.int64)
        q = tl.load(
            q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + dims[None, :],
            mask=row_ok[:, None] & dim_ok[None, :],
            other=0.0,
        ).to(DOT_DTYPE)
        query_pos = prefix + token
        # A sliding-window layer (window > 0): row r sees keys query_pos - window < k <= query_pos, so the
        # program starts at the first key its first row sees.
        lowest = tl.where(window > 0, query_pos - window, -1)
        first_key = tl.where(window > 0, tl.maximum(prefix + first - window + 1, 0), 0)
        row_max = tl.full([ROWS], float("-inf"), tl.float32)
        row_sum = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, DIM_PAD], tl.float32)
        k_base = cache_ptr + kv_head * stride_head
        table = tables_ptr + seq * stride_table
        end = tl.minimum(seq_len, prefix + first + BLOCK_Q)  # one past the last key any row may see
        for tile in range(first_key, end, TILE):
            pos = tile + cols
            pos_ok = pos < end
            block = tl.load(table + pos // BLOCK_SIZE, mask=pos_ok, other=0)
            slot = block * stride_block + (pos % BLOCK_SIZE) * stride_token
            kv_mask = pos_ok[:, None] & dim_ok[None, :]
            k = tl.load(k_base + slot[:, None] + dims[None, :], mask=kv_mask, other=0.0)
            s = _scores(tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION), scale, softcap, SOFTCAP)
            seen = (pos[None, :] <= query_pos[:, None]) & (pos[None, :] > lowest[:, None])
            s = tl.where(pos_ok[None, :] & seen, s, float("-inf"))  # [ROWS, TILE]
            new_max = tl.maximum(row_max, tl.max(s, 1))
            # A row that has seen no key yet (its window starts later) keeps max -inf: shift by 0 instead.
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            p = tl.exp2(s - shift[:, None])
            rescale = tl.exp2(row_max - shift)
            v = tl.load(k_base + stride_kv + slot[:, None] + dims[None, :], mask=kv_mask, other=0.0)
            acc = acc * rescale[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=PRECISION)
            row_sum = row_sum * rescale + tl.sum(p, 1)
            row_max = new_max
        out = acc / tl.where(row_ok, row_sum, 1.0)[:, None]
        out_ptrs = out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + dims[None, :]
        tl.store(out_ptrs, out, mask=row_ok[:, None] & dim_ok[None, :])


def query_starts(meta: AttentionMetadata, device: torch.device) -> torch.Tensor:
    """Row of each sequence's first new token in the packed batch, and the total at the end: ``[B + 1]``."""
    if meta.query_starts is not None:
        return meta.query_starts
    starts = [0]
    for n in meta.query_lens_list:
        starts.append(starts[-1] + n)
    return torch.tensor(starts, dtype=torch.int64, device=device)


def triton_context_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float, out: torch.Tensor, first_seq: int,
    window: int | None = None, softcap: float | None = None,
) -> None:
    """Attention of every prompt chunk from sequence ``first_seq`` on, written into the rows of ``out``."""
    _, num_heads, head_dim = q.shape
    _, _, block_size, kv_heads, _ = kv_cache.shape
    assert kv_cache.stride(-1) == q.stride(-1) == out.stride(-1) == 1, "head_dim must be contiguous"
    group = num_heads // kv_heads
    block_q = max(1, _ROWS // group)
    longest = max(meta.query_lens_list[first_seq:])
    dot_dtype = _dot_dtype(kv_cache.dtype)
    grid = (meta.num_seqs - first_seq, kv_heads, -(-longest // block_q))
    _jitted(_chunk_kernel, ("first_seq", "stride_table", "window"))[grid](
        q, kv_cache, meta.block_tables, meta.seq_lens, query_starts(meta, q.device), out,
        q.stride(0), q.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        meta.block_tables.stride(0), out.stride(0), out.stride(1),
        first_seq, scale, window or 0, softcap or 1.0,
        GROUP=group, BLOCK_Q=block_q, ROWS=_pad(block_q * group), HEAD_DIM=head_dim, DIM_PAD=_pad(head_dim),
        BLOCK_SIZE=block_size, TILE=_TILE,
        DOT_DTYPE=dot_dtype, PRECISION="ieee" if dot_dtype == tl.float32 else None,  # fp32: exact, no TF32
        SOFTCAP=softcap is not None,
    )  # fmt: skip


def triton_paged_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
    window: int | None = None, softcap: float | None = None,
) -> torch.Tensor:  # fmt: skip
    """A whole packed batch ``q [T, H, D]``: decodes in one launch, all prompt chunks in another."""
    nd = meta.num_decodes
    if nd:
        decoded = triton_decode_attention(
            q[:nd], kv_cache, meta.block_tables[:nd], meta.seq_lens[:nd], max(meta.seq_lens_list[:nd]), scale,
            window, softcap,
        )
        if nd == meta.num_seqs:
            return decoded
    out = torch.empty_like(q)
    if nd:
        out[:nd] = decoded
    triton_context_attention(q, kv_cache, meta, scale, out, nd, window, softcap)
    return out
