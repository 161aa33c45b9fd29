"""Fused Triton kernels for the elementwise work of a decode step (their torch twins: ``gllm.ops.elementwise``).

On CUDA a layer's RMSNorm, RoPE, SwiGLU and residual adds are otherwise ~30 tiny kernels; these three
replace them, so a CUDA graph of a step holds a few nodes per layer. Each ``triton_*`` function has a
``torch_*`` twin in ``gllm.ops.elementwise`` with the same contract (any device), so the model makes one call
shape on both paths.

* ``triton_add_rms_norm``: grid ``(T,)``, one program per row: the residual add (in place) and RMSNorm.
* ``triton_rope_write_kv``: grid ``(T, heads + 2 * kv_heads)``, one program per head of a token's fused
  Q/K/V row: it rotates a query head into the new ``q`` or a key head into the cache, or copies a value head.
* ``triton_silu_mul`` / ``triton_gelu_tanh_mul``: grid ``(T, column tiles)``: ``silu(gate) * up`` or
  ``gelu_tanh(gate) * up`` (Gemma's GeGLU).

Results equal the torch code bit for bit wherever torch's op order can be repeated: every torch op on a
16-bit tensor computes in float32 and rounds to its dtype, and the kernels round at the same places; FMA
contraction is off, as torch does not fuse. RoPE / KV write and SiLU * up are exact in every dtype on CUDA
(SiLU uses libdevice's ``expf`` like torch). RMSNorm sums its float32 squares in another order than torch,
so float32 differs by ~1e-7 relative and a 16-bit output is now and then 1-2 ulps off (~1e-5 of them).
Under Triton's CPU interpreter ``exp`` is numpy's (so SiLU is as close as RMSNorm), and float32 -> bfloat16
casts truncate instead of rounding, so bfloat16 is rounded on the bit pattern there (``_round_bits``).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from gllm.ops.triton_attention import _jitted, tl

try:
    from triton.language.extra import libdevice
except ImportError:  # no Triton: only the torch references are usable
    libdevice = None

_GATE_TILE = 1024  # columns per gate program (SiLU or GELU times up)


def _round(x, DTYPE: tl.constexpr):
    """Round float32 ``x`` to ``DTYPE`` (to nearest even) and widen it back: the result of one torch op."""
    return x.to(DTYPE).to(tl.float32)


def _round_bits(x, DTYPE: tl.constexpr):
    """``_round`` to bfloat16 done on the float32 bit pattern, for the interpreter (whose casts truncate)."""
    bits = x.to(tl.int32, bitcast=True).to(tl.int64)  # 64 bits: the interpreter checks no overflow there
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.int32).to(tl.float32, bitcast=True)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _rounding(dtype: torch.dtype) -> tuple[Any, Any]:
    """The kernels' ``DTYPE`` and ``ROUND`` arguments for tensors of ``dtype``.

    ``ROUND`` is a ``constexpr`` argument so that the helper, like the kernels, is wrapped at first launch. The
    interpreter gets it unwrapped: it runs kernels as Python, and a wrapped helper would re-patch
    ``triton.language`` at every call (4x slower).
    """
    tl_dtype = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]
    if _interpreted():
        return tl_dtype, _round_bits if dtype == torch.bfloat16 else _round
    return tl_dtype, _jitted(_round)


def _add_rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, stride_x, stride_r, stride_o, dim, inv_dim, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, DTYPE: tl.constexpr, ROUND: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    r = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = ROUND(r + tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32), DTYPE)
        tl.store(res_ptr + row * stride_r + cols, r.to(DTYPE), mask=mask)
    y = ROUND(r * tl.rsqrt(tl.sum(r * r, 0) * inv_dim + eps), DTYPE)
    w = tl.load(w_ptr + cols, mask=mask).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, ROUND(w * y, DTYPE).to(DTYPE), mask=mask)


def triton_add_rms_norm(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``(RMSNorm(r), r)`` for ``x [T, D]``, where ``r = x + residual`` is written into ``residual`` (or is ``x``).

    Exact but for the float32 mean of squares, summed in another order than torch's (then multiplied by
    ``1 / D``, as torch's CUDA mean does): rare 1-2 ulp differences in 16-bit outputs. One pass: ``D <= 8192``.
    """
    rows, dim = x.shape
    out = torch.empty(rows, dim, dtype=x.dtype, device=x.device)
    has_residual = residual is not None
    residual = residual if has_residual else x
    if rows == 0:
        return out, residual
    assert x.stride(-1) == residual.stride(-1) == weight.stride(-1) == 1 and weight.dtype == x.dtype
    block = 1 << (dim - 1).bit_length()
    dtype, round_fn = _rounding(x.dtype)
    _jitted(_add_rms_norm_kernel)[(rows,)](
        x, residual, weight, out, x.stride(0), residual.stride(0), out.stride(0), dim, 1.0 / dim, eps,
        HAS_RESIDUAL=has_residual, BLOCK=block, DTYPE=dtype, ROUND=round_fn,
        num_warps=min(16, max(1, block // 512)), enable_fp_fusion=False,
    )  # fmt: skip
    return out, residual


def _rope_write_kv_kernel(
    qkv_ptr, cos_ptr, sin_ptr, q_ptr, cache_ptr, slots_ptr,
    stride_t, stride_cos, stride_sin, stride_kv, stride_slot, stride_head, num_heads, rotated_heads,
    HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr, DTYPE: tl.constexpr, ROUND: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    half = HEAD_DIM // 2
    dims = tl.arange(0, HALF_PAD)
    mask = dims < half
    src = qkv_ptr + token * stride_t + head * HEAD_DIM  # query, key and value heads follow one another
    x1 = tl.load(src + dims, mask=mask).to(tl.float32)
    x2 = tl.load(src + half + dims, mask=mask).to(tl.float32)
    slot = tl.load(slots_ptr + token)
    if head < rotated_heads:  # each torch op of apply_rope rounds to DTYPE
        c = tl.load(cos_ptr + token * stride_cos + dims, mask=mask).to(tl.float32)
        s = tl.load(sin_ptr + token * stride_sin + dims, mask=mask).to(tl.float32)
        out1 = ROUND(ROUND(x1 * c, DTYPE) - ROUND(x2 * s, DTYPE), DTYPE)
        out2 = ROUND(ROUND(x2 * c, DTYPE) + ROUND(x1 * s, DTYPE), DTYPE)
        if head < num_heads:
            dst = q_ptr + (token * num_heads + head) * HEAD_DIM
        else:
            dst = cache_ptr + slot * stride_slot + (head - num_heads) * stride_head
    else:  # a value head, stored as it is
        out1, out2 = x1, x2
        dst = cache_ptr + stride_kv + slot * stride_slot + (head - rotated_heads) * stride_head
    tl.store(dst + dims, out1.to(DTYPE), mask=mask)
    tl.store(dst + half + dims, out2.to(DTYPE), mask=mask)


def triton_rope_write_kv(
    qkv: Tensor, cos: Tensor, sin: Tensor, kv_cache: Tensor, slot_mapping: Tensor, num_heads: int, num_kv_heads: int
) -> Tensor:
    """Rotate the queries and keys of the fused ``qkv [T, (H + 2 KV) * D]`` by ``cos`` / ``sin [T, (1,) D/2]``.

    Keys (rotated) and values go to the cache at the flat slots ``slot_mapping [T]``; returns the rotated
    queries as a new ``[T, H, D]``. Bit-exact with ``torch_rope_write_kv`` in every dtype.
    """
    num_tokens = qkv.shape[0]
    head_dim = kv_cache.shape[-1]
    q = torch.empty(num_tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if num_tokens == 0:
        return q
    assert qkv.shape[1] == (num_heads + 2 * num_kv_heads) * head_dim and cos.dtype == sin.dtype == qkv.dtype
    cos, sin = cos.reshape(num_tokens, head_dim // 2), sin.reshape(num_tokens, head_dim // 2)
    flat = kv_cache.view(2, -1, num_kv_heads, head_dim)  # slot -> row, as write_kv
    assert qkv.stride(-1) == cos.stride(-1) == sin.stride(-1) == flat.stride(-1) == 1
    dtype, round_fn = _rounding(qkv.dtype)
    _jitted(_rope_write_kv_kernel)[(num_tokens, num_heads + 2 * num_kv_heads)](
        qkv, cos, sin, q, flat, slot_mapping,
        qkv.stride(0), cos.stride(0), sin.stride(0), flat.stride(0), flat.stride(1), flat.stride(2),
        num_heads, num_heads + num_kv_heads,
        HEAD_DIM=head_dim, HALF_PAD=max(16, 1 << (head_dim // 2 - 1).bit_length()), DTYPE=dtype, ROUND=round_fn,
        num_warps=1, enable_fp_fusion=False,
    )  # fmt: skip
    return q


def _gate_mul_kernel(
    x_ptr, out_ptr, stride_x, stride_o, inter,
    TILE: tl.constexpr, DTYPE: tl.constexpr, ROUND: tl.constexpr, LIBDEVICE: tl.constexpr, GELU: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * TILE + tl.arange(0, TILE)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask).to(tl.float32)
    if GELU:  # torch's tanh approximation, in its order: 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
        inner = 0.7978845608028654 * (gate + 0.044715 * (gate * gate * gate))
        if LIBDEVICE:
            t = libdevice.tanh(inner)
        else:  # the interpreter has no libdevice
            t = 2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0
        act = ROUND(0.5 * gate * (1.0 + t), DTYPE)
    else:
        if LIBDEVICE:  # expf, as torch's CUDA silu (tl.exp is the less exact ex2.approx)
            e = libdevice.exp(-gate)
        else:
            e = tl.exp(-gate)
        act = ROUND(tl.div_rn(gate, 1.0 + e), DTYPE)
    tl.store(out_ptr + row * stride_o + cols, ROUND(act * up, DTYPE).to(DTYPE), mask=mask)


def _gate_mul(gate_up: Tensor, gelu: bool) -> Tensor:
    rows, width = gate_up.shape
    inter = width // 2
    out = torch.empty(rows, inter, dtype=gate_up.dtype, device=gate_up.device)
    if rows == 0:
        return out
    assert gate_up.stride(-1) == 1
    tile = min(_GATE_TILE, 1 << (inter - 1).bit_length())
    dtype, round_fn = _rounding(gate_up.dtype)
    _jitted(_gate_mul_kernel)[(rows, -(-inter // tile))](
        gate_up, out, gate_up.stride(0), out.stride(0), inter,
        TILE=tile, DTYPE=dtype, ROUND=round_fn, LIBDEVICE=not _interpreted(), GELU=gelu,
        num_warps=4, enable_fp_fusion=False,
    )  # fmt: skip
    return out


def triton_silu_mul(gate_up: Tensor) -> Tensor:
    """``silu(gate) * up`` for ``gate_up [T, 2 I]`` (gate first): ``[T, I]``. Exact on CUDA in every dtype."""
    return _gate_mul(gate_up, gelu=False)


def triton_gelu_tanh_mul(gate_up: Tensor) -> Tensor:
    """``gelu_tanh(gate) * up`` for ``gate_up [T, 2 I]`` (gate first): ``[T, I]``, in torch's order of operations
    (libdevice's ``tanh`` on CUDA; under the interpreter tanh comes from ``exp``, a few ulps away)."""
    return _gate_mul(gate_up, gelu=True)
