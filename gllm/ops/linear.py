"""Faster CPU matrix products for the model's linear layers: each weight is repacked once after loading.

``F.linear`` in bfloat16 on the CPU reorders its weight on every call and is no faster than float32 for a
single row. Packing the weight once into oneDNN's blocked layout lets every later call go straight to its
AMX / AVX512-BF16 kernels: on a 2-core Xeon (SmolLM2-135M shapes) about 1.5x faster than ``F.linear`` for
one row and 2x for 16 rows. The results are those of ``F.linear`` in bfloat16.

Weights that come as llama.cpp blocks (a GGUF file) are not packed here: ``gllm.ops.block_linear``
multiplies straight from the blocks.

Weight-only int8 (``quantize="int8"``) keeps a per-output-channel int8 copy of each weight and uses
torch's int8 matrix-vector kernel when a step has only a few rows (one stream decoding: reading the
weights is the cost, and int8 halves it); larger batches still use the packed bfloat16 weights, where
that kernel is slower. Values change slightly: ``benchmarks/quality.py`` measures by how much.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gllm.ops.invariant import current_plan, invariant_rows

Kernel = Callable[[torch.Tensor], torch.Tensor]

QUANTIZE_MODES = ("int8",)
INT8_MAX_ROWS = 2  # steps with at most this many rows use the int8 kernel


def packing_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether this machine can run packed kernels for ``dtype`` (bfloat16 on a CPU with oneDNN bf16)."""
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def padded_rows(rows: int) -> int:
    """The row count a product is computed with: exact up to 4, then powers of two up to 64, then
    multiples of 64. oneDNN compiles and keeps a kernel per shape, so an unbounded variety of row counts
    (every prompt length) would grow the process's memory without end."""
    if rows <= 4:
        return rows
    if rows <= 64:
        return 1 << (rows - 1).bit_length()
    return -(-rows // 64) * 64


class PackedLinear:
    """``x @ weight.T`` with the weight in oneDNN's packed layout."""

    def __init__(self, weight: torch.Tensor):
        self.out_features = weight.shape[0]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return invariant_rows(x, self._product)  # as usual unless a batch-invariant plan is on

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        lead, flat = x.shape[:-1], x.reshape(-1, x.shape[-1])
        rows = flat.shape[0]
        pad = padded_rows(rows) - rows
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad, flat.shape[1])])
        y = torch.ops.mkldnn._linear_pointwise(flat, self.packed, None, "none", [], "")
        return y[:rows].view(*lead, self.out_features)


class Int8Linear:
    """Weight-only int8 for few rows, packed bfloat16 for many (see the module docstring)."""

    def __init__(self, weight: torch.Tensor):
        w = weight.float()
        scales = w.abs().amax(dim=1).clamp_min(1e-8) / 127.0
        self.qweight = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        self.scales = scales.to(weight.dtype)
        self.dense = PackedLinear(weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // x.shape[-1] > INT8_MAX_ROWS or current_plan() is not None:
            return self.dense(x)
        lead = x.shape[:-1]
        y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).contiguous(), self.qweight, self.scales)
        return y.view(*lead, self.qweight.shape[0])


def make_kernel(weight: torch.Tensor, quantize: str | None) -> Kernel:
    """The fastest kernel for ``weight`` (a bfloat16 CPU tensor) under the chosen quantization."""
    if quantize is None:
        return PackedLinear(weight)
    if quantize == "int8":
        return Int8Linear(weight)
    raise ValueError(f"unknown quantize mode {quantize!r}; choose one of {', '.join(QUANTIZE_MODES)} or None")
