"""Attention backends: which kernels write new K/V into the cache and attend over it.

* ``torch``: the default path of ``gllm.ops.attention`` (any device, the CPU's choice).
* ``triton``: Triton kernels for the KV write and decode attention, prompt chunks through SDPA
  (FlashAttention on CUDA); the choice on a CUDA GPU with Triton installed.
* ``reference``: the slow oracle, for tests.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from gllm.ops.attention import paged_attention, write_kv
from gllm.ops.metadata import AttentionMetadata
from gllm.ops.reference import reference_attention
from gllm.ops.triton_attention import triton_available, triton_decode_attention, triton_write_kv

WriteFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
AttendFn = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata, float], torch.Tensor]


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    write_kv: WriteFn
    attend: AttendFn


BACKENDS = {
    "torch": AttentionBackend("torch", write_kv, paged_attention),
    "reference": AttentionBackend("reference", write_kv, reference_attention),
    "triton": AttentionBackend("triton", triton_write_kv, functools.partial(paged_attention, decode=triton_decode_attention)),
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
