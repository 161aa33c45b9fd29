"""The ``cpu`` backend: C++ kernels (``cpu_kernels.cpp``) for the work around the CPU's matrix products.

On the CPU a decode step of a small model is not only matrix products: with plain torch, attention first
copies every sequence's cached K/V out of its blocks (``index_select``) and then runs SDPA over the copy,
and each layer's element-wise work is some thirty small torch ops. These kernels read the paged cache in
place and do each element-wise step in one pass. Their contracts are those of the ``torch_*`` functions in
``gllm.ops.elementwise`` and of ``gllm.ops.attention.decode_attention``; they take float32 and bfloat16
tensors (anything else goes to the torch function).

The library (``cpu_build``: compiled on first use for this machine's CPU and kept in the cache folder)
also holds the quantized matrix products of ``gllm.ops.block_linear``. Without a compiler, or when the
build fails, ``available()`` is False and the engine's ``auto`` backend uses plain torch.
``GLLM_CPU_KERNELS=0`` turns them off.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from gllm.ops import cpu_build
from gllm.ops.attention import decode_attention, decode_rows_one_by_one, paged_attention
from gllm.ops.metadata import AttentionMetadata
from gllm.ops.elementwise import torch_add_rms_norm, torch_gelu_tanh_mul, torch_rope_write_kv, torch_silu_mul

SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
HEAD_DIMS = (16, 32, 64, 96, 128, 256)  # those decode_attention is compiled for

_I64, _INT, _FLOAT, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
SIGNATURES = {  # name: argument types, result type, dtypes it is compiled for
    "add_rms_norm": ([_PTR] * 4 + [_I64] * 5 + [_INT, _FLOAT, _INT], None, SUFFIX),
    "silu_mul": ([_PTR] * 2 + [_I64] * 4 + [_INT], None, SUFFIX),
    "gelu_tanh_mul": ([_PTR] * 2 + [_I64] * 4 + [_INT], None, SUFFIX),
    "rope_write_kv": ([_PTR] * 7 + [_I64, _INT, _INT, _INT] + [_I64] * 4 + [_INT], None, SUFFIX),
    "decode_attention": ([_PTR] * 6 + [_INT] * 5 + [_I64, _I64, _FLOAT, _I64, _FLOAT, _INT], _INT, SUFFIX),
    "argmax_logsumexp": ([_PTR] + [_I64] * 3 + [_PTR, _PTR, _INT], None, [torch.float32]),
    "lora_site": ([_PTR, _I64, _PTR, _I64, _PTR, _PTR, _I64, _PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR, _INT], _INT,
                  SUFFIX),
}


@functools.cache
def kernels() -> dict[tuple[str, torch.dtype | None], ctypes._CFuncPtr]:
    """The compiled kernels by (name, dtype), built on first call; empty when they are off or cannot be built."""
    lib = cpu_build.library()
    if lib is None:
        return {}
    table = {}
    for name, (args, result, dtypes) in SIGNATURES.items():
        for dtype in dtypes:
            fn = getattr(lib, f"{name}_{SUFFIX[dtype]}")
            fn.argtypes, fn.restype = args, result
            table[name, dtype] = fn
    return table


def available() -> bool:
    """Whether the kernels are built and loadable on this machine."""
    return bool(kernels())


def cpu_add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """``torch_add_rms_norm``'s contract: ``(RMSNorm(r), r)`` with ``r = x + residual`` written into ``residual``."""
    fn = kernels().get(("add_rms_norm", x.dtype))
    res = x if residual is None else residual
    unit = x.stride(-1) == res.stride(-1) == weight.stride(-1) == 1
    if fn is None or not unit or weight.dtype != x.dtype or res.dtype != x.dtype:
        return torch_add_rms_norm(x, residual, weight, eps)
    rows, dim = x.shape
    out = torch.empty(rows, dim, dtype=x.dtype)
    fn(x.data_ptr(), res.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, dim, x.stride(0), res.stride(0),
       dim, residual is not None, eps, torch.get_num_threads())  # fmt: skip
    return out, res


def _gate_mul(name: str, gate_up: torch.Tensor) -> torch.Tensor | None:
    """The ``name`` kernel (``silu_mul``, ``gelu_tanh_mul``) on ``gate_up [T, 2 I]``; None when it cannot run."""
    fn = kernels().get((name, gate_up.dtype))
    if fn is None or gate_up.stride(-1) != 1:
        return None
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, inter, dtype=gate_up.dtype)
    fn(gate_up.data_ptr(), out.data_ptr(), rows, inter, gate_up.stride(0), inter, torch.get_num_threads())
    return out


def cpu_silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up [T, 2 I]`` (gate first): ``[T, I]``."""
    out = _gate_mul("silu_mul", gate_up)
    return torch_silu_mul(gate_up) if out is None else out


def cpu_gelu_tanh_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(gate) * up`` for ``gate_up [T, 2 I]`` (gate first): ``[T, I]``."""
    out = _gate_mul("gelu_tanh_mul", gate_up)
    return torch_gelu_tanh_mul(gate_up) if out is None else out


def cpu_rope_write_kv(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
    num_heads: int, num_kv_heads: int,
) -> torch.Tensor:  # fmt: skip
    """Rotate queries and keys of ``qkv [T, (H + 2 KV) * D]``, store keys and values at ``slot_mapping``,
    return the rotated queries ``[T, H, D]`` (``torch_rope_write_kv``'s contract)."""
    n, dim = qkv.shape[0], kv_cache.shape[-1]
    cos, sin = cos.reshape(n, dim // 2), sin.reshape(n, dim // 2)
    fn = kernels().get(("rope_write_kv", qkv.dtype))
    same = cos.dtype == sin.dtype == kv_cache.dtype == qkv.dtype and slot_mapping.dtype == torch.int64
    strided = qkv.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1 or not kv_cache.is_contiguous()
    if fn is None or not same or strided:
        return torch_rope_write_kv(qkv, cos, sin, kv_cache, slot_mapping, num_heads, num_kv_heads)
    q = torch.empty(n, num_heads, dim, dtype=qkv.dtype)
    slots = slot_mapping.contiguous()
    plane = kv_cache.stride(0)
    fn(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), q.data_ptr(), kv_cache.data_ptr(),
       kv_cache.data_ptr() + plane * kv_cache.element_size(), slots.data_ptr(), n, num_heads, num_kv_heads, dim,
       qkv.stride(0), cos.stride(0), sin.stride(0), num_kv_heads * dim, torch.get_num_threads())  # fmt: skip
    return q


def cpu_decode_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, max_len: int,
    scale: float, window: int | None = None, softcap: float | None = None, fallback=decode_attention,
) -> torch.Tensor:  # fmt: skip
    """``decode_attention``'s contract (``q [B, H, D]``, one token per sequence), reading blocks in place;
    a sliding-window layer reads only the blocks of its window. A task computes one sequence's heads alone,
    so a row's output never depends on the other rows."""
    batch, heads, dim = q.shape
    _, _, block_size, kv_heads, _ = kv_cache.shape
    fn = kernels().get(("decode_attention", q.dtype))
    fits = dim in HEAD_DIMS and kv_cache.dtype == q.dtype and kv_cache.is_contiguous()
    if fn is None or not fits or block_tables.dtype != torch.int64 or seq_lens.dtype != torch.int64:
        return fallback(q, kv_cache, block_tables, seq_lens, max_len, scale, window, softcap)
    q, tables, lens = q.contiguous(), block_tables.contiguous(), seq_lens.contiguous()
    out = torch.empty_like(q)
    plane = kv_cache.stride(0)
    done = fn(q.data_ptr(), kv_cache.data_ptr(), kv_cache.data_ptr() + plane * kv_cache.element_size(),
              tables.data_ptr(), lens.data_ptr(), out.data_ptr(), batch, heads, kv_heads, dim, block_size,
              tables.stride(0), block_size * kv_heads * dim, scale, window or 0, softcap or 0.0,
              torch.get_num_threads())  # fmt: skip
    assert done, f"decode attention is not compiled for head_dim {dim}"
    return out


def cpu_decode_rows(
    q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, max_len: int,
    scale: float, window: int | None = None, softcap: float | None = None,
) -> torch.Tensor:  # fmt: skip
    """Batch-invariant decode attention (``AttentionBackend.decode_rows``): the kernel when it fits,
    else torch one row at a time."""
    return cpu_decode_attention(q, kv_cache, block_tables, seq_lens, max_len, scale, window, softcap,
                                fallback=decode_rows_one_by_one)


def cpu_paged_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
    window: int | None = None, softcap: float | None = None,
) -> torch.Tensor:  # fmt: skip
    """``paged_attention`` with the decodes on ``cpu_decode_attention`` (prompt chunks stay on torch SDPA)."""
    return paged_attention(q, kv_cache, meta, scale, window, softcap, decode=cpu_decode_attention)


def cpu_argmax_logsumexp(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For float32 CPU ``logits [B, V]``: each row's argmax (the first of equal maxima, as ``torch.argmax``)
    and log-sum-exp, in one call. None when the kernels are off, or when a row holds an infinity or NaN
    (then torch's own rules for those apply)."""
    fn = kernels().get(("argmax_logsumexp", logits.dtype))
    if fn is None or logits.device.type != "cpu" or logits.dim() != 2 or logits.stride(-1) != 1:
        return None
    rows, vocab = logits.shape
    argmax, lse = torch.empty(rows, dtype=torch.int64), torch.empty(rows, dtype=torch.float32)
    fn(logits.data_ptr(), rows, vocab, logits.stride(0), argmax.data_ptr(), lse.data_ptr(), torch.get_num_threads())
    return (argmax, lse) if rows == 0 or bool(torch.isfinite(lse).all()) else None


def cpu_lora_rows(update, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, starts: torch.Tensor) -> bool:
    """``y[rows[i], part.out] += (x[rows[i]] @ a[g])[part.cols] @ part.b[g]`` for every part of a stacked
    ``update`` (``gllm.lora.grouped``) and every ``i`` of group ``g`` (``starts[g] <= i < starts[g + 1]``), in
    place, in one call (``lora_rows.cpp``); False, changing nothing, when the kernel cannot take these
    tensors. ``a``: ``[adapters, in, R]``; each part's ``b``: ``[adapters, w, out columns]``; ``rows``,
    ``starts``: int32."""
    fn = kernels().get(("lora_site", x.dtype))
    if fn is None or x.stride(-1) != 1 or y.stride(-1) != 1 or y.dtype != x.dtype:
        return False
    args = update.kernel_args
    if args is None:  # once per stacked update: the parts' places and matrices, as the kernel reads them
        a, bs = update.a, [part.b for part in update.parts]
        usable = all(t.dtype == x.dtype and t.is_contiguous() for t in [a, *bs]) and a.shape[2] <= 256
        info = torch.tensor([[p.cols.start, p.b.shape[1], p.out.start, p.b.shape[2]] for p in update.parts])
        pointers = torch.tensor([b.data_ptr() for b in bs], dtype=torch.int64)
        args = update.kernel_args = (usable, a, info, pointers)
    usable, a, info, pointers = args
    if not usable or a.dtype != x.dtype:
        return False
    count, (d_in, rank) = rows.numel(), a.shape[1:]
    u = torch.empty(count, rank, dtype=torch.float32)
    return not fn(x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), rows.data_ptr(), starts.data_ptr(),
                  starts.numel() - 1, a.data_ptr(), d_in, rank, len(pointers), info.data_ptr(), pointers.data_ptr(),
                  u.data_ptr(), torch.get_num_threads())
