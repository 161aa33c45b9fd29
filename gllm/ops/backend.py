"""Backends: the kernels a layer calls around its matrix products (attention, KV write, the element-wise work).

* ``cpu``: C++ kernels for the CPU (``gllm.ops.cpu_kernels``): decode attention reading the paged cache
  in place and the fused element-wise steps; prompt chunks use torch's SDPA. The CPU's choice when the
  kernels can be built on this machine.
* ``torch``: the default path of ``gllm.ops.attention`` and plain torch ops (any device; the CPU's
  fallback without a C++ compiler).
* ``triton``: Triton kernels for attention (decodes and prompt chunks, reading the paged cache in place:
  ``gllm.ops.triton_attention``, ``gllm.ops.triton_prefill``) and the fused element-wise steps (add +
  RMSNorm, RoPE + KV write, SiLU or GELU * up: ``gllm.ops.triton_fused``); the choice on a CUDA GPU with Triton.
  Imported only when chosen.
* ``reference``: the slow attention oracle, for tests.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import torch

from gllm.ops import cpu_kernels
from gllm.ops.attention import decode_rows_one_by_one, paged_attention
from gllm.ops.elementwise import torch_add_rms_norm, torch_gelu_tanh_mul, torch_rope_write_kv, torch_silu_mul
from gllm.ops.metadata import AttentionMetadata
from gllm.ops.reference import reference_attention

# attend(q, kv_cache, meta, scale, window=None, softcap=None): a layer's sliding window and score soft-cap
# (``gllm.ops.attention``) go to every backend's attention.
AttendFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class AttentionBackend:
    """Same contracts on every backend: see ``gllm.ops.elementwise``.

    ``decode_rows`` has ``decode_attention``'s contract with one more promise: each row's output depends
    on that row alone (its query, blocks and length), never on the other rows of the call.
    """

    name: str
    attend: AttendFn
    rope_write_kv: Callable[..., torch.Tensor] = torch_rope_write_kv
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]] = torch_add_rms_norm
    silu_mul: Callable[[torch.Tensor], torch.Tensor] = torch_silu_mul
    gelu_tanh_mul: Callable[[torch.Tensor], torch.Tensor] = torch_gelu_tanh_mul
    decode_rows: Callable[..., torch.Tensor] = decode_rows_one_by_one

    def attention(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                  window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        """``attend``, then the rows of ``meta.exact`` computed again one query each (batch-invariant)."""
        out = self.attend(q, kv_cache, meta, scale, window=window, softcap=softcap)
        if (exact := meta.exact) is not None:
            out[exact.rows] = self.decode_rows(q[exact.rows], kv_cache, exact.block_tables, exact.seq_lens,
                                               max(exact.seq_lens_list), scale, window, softcap)
        return out


def _triton_backend() -> AttentionBackend:
    """Imported only when chosen: Triton is a large library, and loading it on a CPU run costs start-up time
    and prints nanobind's leak report at every exit."""
    from gllm.ops import triton_fused as fused
    from gllm.ops.triton_prefill import triton_paged_attention

    return AttentionBackend("triton", triton_paged_attention, fused.triton_rope_write_kv, fused.triton_add_rms_norm,
                            fused.triton_silu_mul, fused.triton_gelu_tanh_mul)


BACKENDS: dict[str, Callable[[], AttentionBackend]] = {
    "torch": lambda: AttentionBackend("torch", paged_attention),
    "reference": lambda: AttentionBackend("reference", reference_attention),
    "cpu": lambda: AttentionBackend(
        "cpu",
        cpu_kernels.cpu_paged_attention,
        cpu_kernels.cpu_rope_write_kv,
        cpu_kernels.cpu_add_rms_norm,
        cpu_kernels.cpu_silu_mul,
        cpu_kernels.cpu_gelu_tanh_mul,
        cpu_kernels.cpu_decode_rows,
    ),
    "triton": _triton_backend,
}


def triton_available() -> bool:
    """True when the Triton kernels can run here: Triton is installed and a GPU (or Triton's CPU interpreter)
    is on. Asked without importing Triton."""
    return importlib.util.find_spec("triton") is not None and (
        torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


def select_backend(name: str, device: torch.device) -> AttentionBackend:
    """Resolve a backend name; ``auto`` picks Triton on CUDA when it can run, the C++ kernels on the CPU
    when they build, else torch."""
    if name == "auto":
        if device.type == "cuda" and triton_available():
            name = "triton"
        else:
            name = "cpu" if device.type == "cpu" and cpu_kernels.available() else "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r} (choose from auto, {', '.join(BACKENDS)})")
    if name == "triton" and not triton_available():
        raise ValueError("the triton attention backend needs Triton and a CUDA GPU (or TRITON_INTERPRET=1)")
    if name == "cpu" and (device.type != "cpu" or not cpu_kernels.available()):
        raise ValueError("the cpu attention backend needs the CPU device and a C++ compiler to build its kernels")
    return BACKENDS[name]()
