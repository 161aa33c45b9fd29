"""Triton decode attention over the paged KV cache: the GPU version of ``decode_attention``.

Same signature and results as the torch path in ``gllm.ops.attention``; that path gathers every block of
the batch into a padded copy before attending, this kernel reads K/V in place through the block table.
(New K/V reach the cache through ``gllm.ops.triton_fused.triton_rope_write_kv``.)

* ``triton_decode_attention``: grid ``(B, kv_heads, splits)``. One program holds all the query heads that
  share one KV head (grouped-query attention), so each K/V tile is loaded once for the whole group. It walks
  its sequence in tiles of ``_TILE`` tokens, looks up each token's block in the block table, and keeps an
  online softmax in float32. Long sequences with few programs are cut into ``splits`` ranges of tokens
  (flash-decoding); each range leaves a partial output and its log-sum-exp, which torch merges afterwards.

Limits: every ``seq_len >= 1``; the last dimension of ``q``, ``k``, ``v`` and the cache is contiguous;
``q`` and the cache share a dtype (float32, float16 or bfloat16). Any ``head_dim``, ``block_size`` and
group size work; they are padded to powers of two and at least 16 because ``tl.dot`` needs tiles of at
least 16 in every dimension, and the padded rows and columns are masked. Float32 products are exact
(``input_precision="ieee"``, no TF32); with 16-bit caches the softmax weights are rounded to the cache
dtype before they multiply V, as in FlashAttention.

The module imports without Triton (for tests that skip); ``gllm.ops.backend.triton_available()`` says
whether the kernels can run, and the engine imports this module only when it chooses them.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: nothing here is launched, and triton_available() says so
    triton = None
    tl = None


_TILE = 64  # tokens per K/V tile: big enough for tl.dot and for wide loads, small enough for registers
_TARGET_PROGRAMS = 256  # split sequences until about this many programs run (two per SM on an H100)
_MIN_TILES_PER_SPLIT = 4  # below this a split costs more in merging than it gains in parallelism


@functools.cache
def _jitted(kernel: Callable[..., None], varying: tuple[str, ...] = ()) -> Any:
    """Wrap a kernel with ``triton.jit`` at its first launch: Triton reads ``TRITON_INTERPRET`` when it
    wraps, and by then a test (or a CPU-only run) has had the chance to set it, whatever imported us first.

    ``varying``: integer arguments whose value changes from step to step (block-table widths, offsets).
    Triton would otherwise compile a variant for each value that is 1 or a multiple of 16, and a first
    compile in the middle of serving stalls every stream.
    """
    return triton.jit(kernel, do_not_specialize=varying)


def _pad(n: int) -> int:
    """Smallest power of two ``>= max(n, 16)``: the tile sizes ``tl.arange`` and ``tl.dot`` accept."""
    return max(16, 1 << (n - 1).bit_length())


def _decode_kernel(
    q_ptr, cache_ptr, tables_ptr, seq_lens_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qh,
    stride_kv, stride_block, stride_token, stride_head,
    stride_table,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    split_len, scale, window, softcap,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, STORE_LSE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    end = tl.minimum(seq_len, split * split_len + split_len)
    # A sliding-window layer (window > 0) sees the last `window` tokens only: earlier blocks are not read.
    start = tl.maximum(split * split_len, tl.where(window > 0, seq_len - window, 0))

    rows = tl.arange(0, GROUP_PAD)  # query heads of this KV head, padded to a tl.dot tile
    dims = tl.arange(0, DIM_PAD)
    cols = tl.arange(0, TILE)
    heads = kv_head * GROUP + rows
    row_ok = rows < GROUP
    dim_ok = dims < HEAD_DIM
    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    ).to(DOT_DTYPE)
    row_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    row_sum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    k_base = cache_ptr + kv_head * stride_head
    table = tables_ptr + seq * stride_table

    for tile in range(start, end, TILE):  # every tile holds a valid token, so row_max turns finite at once
        pos = tile + cols
        pos_ok = pos < end
        block = tl.load(table + pos // BLOCK_SIZE, mask=pos_ok, other=0)
        token = block * stride_block + (pos % BLOCK_SIZE) * stride_token  # int64: large caches are safe
        kv_mask = pos_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_base + token[:, None] + dims[None, :], mask=kv_mask, other=0.0)  # [TILE, DIM_PAD]
        s = _scores(tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION), scale, softcap, SOFTCAP)
        s = tl.where(pos_ok[None, :], s, float("-inf"))  # [GROUP_PAD, TILE]
        new_max = tl.maximum(row_max, tl.max(s, 1))
        p = tl.exp2(s - new_max[:, None])
        rescale = tl.exp2(row_max - new_max)
        v = tl.load(k_base + stride_kv + token[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        acc = acc * rescale[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=PRECISION)
        row_sum = row_sum * rescale + tl.sum(p, 1)
        row_max = new_max

    has_keys = row_sum > 0  # false only for a split that starts past this sequence's end
    safe_sum = tl.where(has_keys, row_sum, 1.0)
    out_ptrs = out_ptr + seq * stride_ob + heads[:, None] * stride_oh + split * stride_os + dims[None, :]
    tl.store(out_ptrs, acc / safe_sum[:, None], mask=row_ok[:, None] & dim_ok[None, :])
    if STORE_LSE:  # natural-log log-sum-exp of the scores, for merging the splits
        lse = tl.where(has_keys, (row_max + tl.log2(safe_sum)) * 0.6931471805599453, float("-inf"))
        tl.store(lse_ptr + seq * stride_lb + heads * stride_lh + split, lse, mask=row_ok)


def _scores(dots, scale, softcap, SOFTCAP: tl.constexpr):
    """Attention scores from query-key products, in base 2 (the softmax runs on ``exp2``); soft-capped to
    ``softcap * tanh(score / softcap)`` with ``SOFTCAP`` (tanh from ``exp``: the interpreter has no libdevice)."""
    s = dots * scale
    if SOFTCAP:
        s = softcap * (2.0 / (1.0 + tl.exp(-2.0 * s / softcap)) - 1.0)
    return s * 1.4426950408889634  # log2(e)


def _dot_dtype(cache_dtype: torch.dtype) -> tl.dtype:
    """Operand dtype of the kernel's ``tl.dot``: the cache's own, so 16-bit caches run on tensor cores.

    Triton's CPU interpreter multiplies bfloat16 operands as their raw 16-bit patterns, so under the
    interpreter bfloat16 tiles are widened to float32 first (float16 is correct there and stays native).
    """
    if cache_dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        return tl.float32
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[cache_dtype]


def _num_splits(programs: int, max_len: int) -> int:
    """How many token ranges to cut each sequence into so that a small batch still fills the GPU."""
    tiles = -(-max_len // _TILE)
    return max(1, min(_TARGET_PROGRAMS // programs, tiles // _MIN_TILES_PER_SPLIT))


def triton_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    max_len: int,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    *,
    num_splits: int | None = None,
) -> torch.Tensor:
    """One query token per sequence: ``q [B, H, D]`` over each sequence's first ``seq_lens`` cached tokens
    (its last ``window`` ones for a sliding-window layer; scores soft-capped by ``softcap``).

    ``num_splits`` overrides the heuristic that cuts long sequences across programs (tests use it).
    """
    batch, num_heads, head_dim = q.shape
    _, _, block_size, kv_heads, _ = kv_cache.shape
    assert kv_cache.stride(-1) == 1, "head_dim of the cache must be contiguous"
    q = q.contiguous()
    group = num_heads // kv_heads
    if num_splits is None:
        num_splits = _num_splits(batch * kv_heads, max_len)
    tiles = -(-max_len // _TILE)
    split_len = -(-tiles // num_splits) * _TILE
    num_splits = -(-max_len // split_len)  # no range that starts past the longest sequence

    dot_dtype = _dot_dtype(kv_cache.dtype)
    out = torch.empty_like(q)
    if num_splits == 1:
        partial, lse = out.unsqueeze(2), out  # the kernel writes the final result; lse is not stored
    else:
        partial = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    varying = ("stride_table", "stride_ob", "stride_oh", "stride_os", "stride_lb", "stride_lh", "split_len", "window")
    _jitted(_decode_kernel, varying)[(batch, kv_heads, num_splits)](
        q, kv_cache, block_tables, seq_lens, partial, lse,
        q.stride(0), q.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0),
        partial.stride(0), partial.stride(1), partial.stride(2), lse.stride(0), lse.stride(1),
        split_len, scale, window or 0, softcap or 1.0,
        GROUP=group, GROUP_PAD=_pad(group), HEAD_DIM=head_dim, DIM_PAD=_pad(head_dim),
        BLOCK_SIZE=block_size, TILE=_TILE, STORE_LSE=num_splits > 1,
        DOT_DTYPE=dot_dtype, PRECISION="ieee" if dot_dtype == tl.float32 else None,  # fp32: exact, no TF32
        SOFTCAP=softcap is not None,
    )  # fmt: skip
    if num_splits == 1:
        return out
    weights = torch.softmax(lse, dim=-1).unsqueeze(-1)  # each range's share of the softmax mass
    return (partial * weights).sum(2).to(q.dtype)
