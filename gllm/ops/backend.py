"""Backends: the kernels a layer calls around its matrix products (attention, KV write, the element-wise work).

* ``torch``: the default path of ``gllm.ops.attention`` and plain torch ops (any device, the CPU's choice).
* ``triton``: Triton kernels for attention (decodes and prompt chunks, reading the paged cache in place:
  ``gllm.ops.triton_attention``, ``gllm.ops.triton_prefill``) and the fused element-wise steps (add +
  RMSNorm, RoPE + KV write, SiLU * up: ``gllm.ops.triton_fused``); the choice on a CUDA GPU with Triton.
* ``reference``: the slow attention oracle, for tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from gllm.ops.attention import paged_attention
from gllm.ops.metadata import AttentionMetadata
from gllm.ops.reference import reference_attention
from gllm.ops.triton_attention import triton_available
from gllm.ops.triton_prefill import triton_paged_attention
from gllm.ops.triton_fused import (
    torch_add_rms_norm,
    torch_rope_write_kv,
    torch_silu_mul,
    triton_add_rms_norm,
    triton_rope_write_kv,
    triton_silu_mul,
)

AttendFn = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata, float], torch.Tensor]


@dataclass(frozen=True)
class AttentionBackend:
    """Same contracts on every backend: see the ``torch_*`` functions of ``gllm.ops.triton_fused``."""

    name: str
    attend: AttendFn
    rope_write_kv: Callable[..., torch.Tensor] = torch_rope_write_kv
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]] = torch_add_rms_norm
    silu_mul: Callable[[torch.Tensor], torch.Tensor] = torch_silu_mul


BACKENDS = {
    "torch": AttentionBackend("torch", paged_attention),
    "reference": AttentionBackend("reference", reference_attention),
    "triton": AttentionBackend(
        "triton",
        triton_paged_attention,
        triton_rope_write_kv,
        triton_add_rms_norm,
        triton_silu_mul,
    ),
}


def select_backend(name: str, device: torch.device) -> AttentionBackend:
    """Resolve a backend name; ``auto`` picks Triton on CUDA when it can run, else torch."""
    if name == "auto":
        name = "triton" if device.type == "cuda" and triton_available() else "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r} (choose from auto, {', '.join(BACKENDS)})")
    if name == "triton" and not triton_available():
        raise ValueError("the triton attention backend needs Triton and a CUDA GPU (or TRITON_INTERPRET=1)")
    return BACKENDS[name]
