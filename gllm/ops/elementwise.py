"""The element-wise steps around a layer's matrix products, in plain torch: the contracts every backend keeps.

``gllm.ops.triton_fused`` (CUDA) and ``gllm.ops.cpu_kernels`` (C++) fuse each of these into one kernel with the
same arguments and results (up to rounding, as their docstrings say); these are the versions for any device
and the references their tests compare with. Importing this module imports no kernel library.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gllm.ops.attention import write_kv


def torch_add_rms_norm(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The contract of ``triton_add_rms_norm`` in torch: ``RMSNorm.forward`` after an in-place residual add."""
    if residual is None:
        residual = x
    else:
        residual.add_(x)
    xf = residual.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype), residual


def torch_rope_write_kv(
    qkv: Tensor, cos: Tensor, sin: Tensor, kv_cache: Tensor, slot_mapping: Tensor, num_heads: int, num_kv_heads: int
) -> Tensor:
    """The contract of ``triton_rope_write_kv`` in torch (the queries come back as a view, not contiguous)."""
    from gllm.model.rope import apply_rope  # here: gllm.model imports the model, which will import this module

    n, head_dim = qkv.shape[0], kv_cache.shape[-1]
    qk, v = qkv.split([(num_heads + num_kv_heads) * head_dim, num_kv_heads * head_dim], dim=-1)
    cos, sin = cos.reshape(n, 1, head_dim // 2), sin.reshape(n, 1, head_dim // 2)
    qk = apply_rope(qk.view(n, num_heads + num_kv_heads, head_dim), cos, sin)
    q, k = qk.split([num_heads, num_kv_heads], dim=1)
    write_kv(kv_cache, k, v.reshape(n, num_kv_heads, head_dim), slot_mapping)
    return q


def torch_silu_mul(gate_up: Tensor) -> Tensor:
    """The contract of ``triton_silu_mul`` in torch."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def torch_gelu_tanh_mul(gate_up: Tensor) -> Tensor:
    """``gelu(gate) * up`` with GELU's tanh approximation (Gemma's GeGLU), for ``gate_up [T, 2 I]`` (gate first)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.gelu(gate, approximate="tanh") * up
