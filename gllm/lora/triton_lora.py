"""Triton kernels for the low-rank updates of rows under different adapters (the ``MixedRows`` of
``gllm.lora.grouped``), used where the attention runs on Triton: CUDA, or its CPU interpreter in tests.

Each row of a step names one adapter of the step's stacks (``a``: ``[adapters, in, R]``, each part's ``b``:
``[adapters, w, out]``). Two kernels, one program per row (and per column tile), read that adapter's
matrices straight from the stacks, so no row is padded to the busiest adapter's row count and nothing is
gathered or scattered around them:

* ``_shrink``: grid ``(rows, R tiles)``: ``u[i] = x[row_i] @ a[k_i]`` in float32, ``in`` walked in tiles;
* ``_expand``: grid ``(rows, out tiles)`` per part: ``y[row_i, out] += u[i, cols] @ b[k_i]``, summed in float32
  and rounded once, where the torch path rounds ``u`` and the product to the model's dtype first.

A decode row reads its adapter's matrices once; the few rows of one adapter in a step read them again
(they are small, and cached), which is the price of not padding.
"""

from __future__ import annotations

import torch

from gllm.lora.adapter import SiteUpdate
from gllm.ops.triton_attention import _jitted, _pad, tl

_IN_TILE = 64  # input values per shrink iteration
_OUT_TILE = 64  # output columns per expand program
_RANK_TILE = 64  # rank columns per shrink program


def _shrink(x_ptr, rows_ptr, slots_ptr, a_ptr, u_ptr, K, R, stride_x, stride_a0, stride_a1, stride_u,
            BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    i = tl.program_id(0)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row = tl.load(rows_ptr + i).to(tl.int64)
    k = tl.load(slots_ptr + i).to(tl.int64)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        kk = start + tl.arange(0, BLOCK_K)
        xv = tl.load(x_ptr + row * stride_x + kk, mask=kk < K, other=0.0).to(tl.float32)
        av = tl.load(a_ptr + k * stride_a0 + kk[:, None] * stride_a1 + r[None, :],
                     mask=(kk[:, None] < K) & (r[None, :] < R), other=0.0).to(tl.float32)
        acc += tl.sum(xv[:, None] * av, axis=0)
    tl.store(u_ptr + i * stride_u + r, acc, mask=r < R)


def _expand(u_ptr, rows_ptr, slots_ptr, b_ptr, y_ptr, W, N, col0, out0, stride_u, stride_b0, stride_b1, stride_y,
            BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr):
    i = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w = tl.arange(0, BLOCK_W)
    row = tl.load(rows_ptr + i).to(tl.int64)
    k = tl.load(slots_ptr + i).to(tl.int64)
    uv = tl.load(u_ptr + i * stride_u + col0 + w, mask=w < W, other=0.0)
    bv = tl.load(b_ptr + k * stride_b0 + w[:, None] * stride_b1 + n[None, :],
                 mask=(w[:, None] < W) & (n[None, :] < N), other=0.0).to(tl.float32)
    v = tl.sum(uv[:, None] * bv, axis=0)
    at = y_ptr + row * stride_y + out0 + n
    old = tl.load(at, mask=n < N, other=0.0)
    tl.store(at, (old.to(tl.float32) + v).to(old.dtype), mask=n < N)


def triton_add_updates(update: SiteUpdate, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor,
                       slots: torch.Tensor) -> None:
    """``y[rows[i], part.out] += (x[rows[i]] @ a[slots[i]])[part.cols] @ part.b[slots[i]]`` for every ``i``
    and part of a stacked ``update``, in place. ``rows`` and ``slots``: int tensors on ``x``'s device."""
    count, (in_features, rank) = rows.numel(), update.a.shape[1:]
    if count == 0:
        return
    a = update.a.contiguous()
    u = torch.empty(count, rank, device=x.device, dtype=torch.float32)
    block_r = min(_RANK_TILE, _pad(rank))
    _jitted(_shrink, ("K", "R"))[(count, triton_cdiv(rank, block_r))](
        x, rows, slots, a, u, in_features, rank, x.stride(0), a.stride(0), a.stride(1), u.stride(0),
        BLOCK_K=_IN_TILE, BLOCK_R=block_r)
    for part in update.parts:
        b = part.b.contiguous()
        width, out = b.shape[1:]
        _jitted(_expand, ("W", "N", "col0", "out0"))[(count, triton_cdiv(out, _OUT_TILE))](
            u, rows, slots, b, y, width, out, part.cols.start, part.out.start, u.stride(0), b.stride(0),
            b.stride(1), y.stride(0), BLOCK_W=_pad(width), BLOCK_N=_OUT_TILE)


def triton_cdiv(n: int, d: int) -> int:
    return -(-n // d)
