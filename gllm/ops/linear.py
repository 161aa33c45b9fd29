"""Faster CPU matrix products for the model's linear layers: each weight is repacked once after loading.

``F.linear`` in bfloat16 on the CPU reorders its weight on every call and is no faster than float32 for a
single row. Packing the weight once into oneDNN's blocked layout lets every later call go straight to its
AMX / AVX512-BF16 kernels: on a 2-core Xeon (SmolLM2-135M shapes) about 1.5x faster than ``F.linear`` for
one row and 2x for 16 rows. The results are those of ``F.linear`` in bfloat16.

Weights that come as llama.cpp blocks (Q4_0, Q4_1, Q8_0 in a GGUF file) can stay in them: on a CPU with
AMX, ``BlockLinear`` multiplies steps of up to 64 rows straight from the blocks (``block_matmul.cpp``),
reading a third to a half of the bytes of bfloat16 weights for the same bfloat16 results; larger steps
(prompts) use the packed bfloat16 copy.

Weight-only int8 (``quantize="int8"``) keeps a per-output-channel int8 copy of each weight and uses
torch's int8 matrix-vector kernel when a step has only a few rows (one stream decoding: reading the
weights is the cost, and int8 halves it); larger batches still use the packed bfloat16 weights, where
that kernel is slower. Values change slightly: ``benchmarks/quality.py`` measures by how much.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gllm.ops import cpu_kernels
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


# llama.cpp block types a decode step can read in place: kernel id, bytes per block of 32 values, and
# where its parts lie in a block (float16 scale, float16 minimum for Q4_1, then the quants).
BLOCK_TYPES = {"Q4_0": (0, 18), "Q4_1": (1, 20), "Q8_0": (2, 34)}
BLOCK_MAX_ROWS = 64


@dataclass
class BlockWeight:
    """A weight in llama.cpp's blocks: ``blocks [rows, cols / 32, bytes per block]`` uint8, as in the file."""

    kind: str
    blocks: torch.Tensor

    @staticmethod
    def cat(parts: list[BlockWeight]) -> BlockWeight | None:
        """The blocks of the row-wise concatenation (a fused Q/K/V or gate/up), or None if the kinds differ."""
        if len({p.kind for p in parts}) != 1:
            return None
        return BlockWeight(parts[0].kind, torch.cat([p.blocks for p in parts]))


def block_products_supported() -> bool:
    """Whether this CPU and build can multiply straight from block-quantized weights (AMX)."""
    return ("block_matmul_ready", None) in cpu_kernels.kernels()


class BlockLinear:
    """``x @ weight.T`` from a ``BlockWeight`` for steps of up to 64 rows; ``dense`` for larger ones (in a
    batch-invariant plan, ``gllm.ops.invariant``, larger ones go to the blocks too, 64 rows at a time).

    The blocks are regrouped once, tile by tile (16 rows by one block), so that the kernel streams them
    in order: quants ``[tiles, blocks, 16, bytes]``, scales and minimums ``[tiles, blocks, 16]`` float16.
    """

    def __init__(self, weight: BlockWeight, dense: Kernel):
        self.kind, bytes_per_block = BLOCK_TYPES[weight.kind]
        rows, cols, width = weight.blocks.shape
        assert width == bytes_per_block and rows % 16 == 0
        self.out_features, self.in_features = rows, cols * 32
        tiles = weight.blocks.reshape(rows // 16, 16, cols, width).transpose(1, 2)  # [tiles, blocks, 16, bytes]
        quant_start = 4 if weight.kind == "Q4_1" else 2

        def halves(start: int) -> torch.Tensor:  # a float16 field of every block, as raw int16
            return tiles[..., start : start + 2].contiguous().view(torch.int16).squeeze(-1).contiguous()

        self.scales = halves(0)
        self.mins = halves(2) if weight.kind == "Q4_1" else self.scales
        self.quants = tiles[..., quant_start:].contiguous()
        self.dense = dense
        self.matmul = cpu_kernels.kernels()["block_matmul", torch.bfloat16]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead, flat = x.shape[:-1], x.reshape(-1, x.shape[-1])
        rows = flat.shape[0]
        if rows == 0 or x.dtype != torch.bfloat16:
            return self.dense(x)
        if rows > BLOCK_MAX_ROWS:  # batch-invariant: every row through the blocks, in slices
            if current_plan() is None:
                return self.dense(x)
            return torch.cat([self._product(part) for part in flat.split(BLOCK_MAX_ROWS)]).view(*lead, -1)
        return self._product(flat).view(*lead, self.out_features)

    def _product(self, flat: torch.Tensor) -> torch.Tensor:
        rows = flat.shape[0]
        flat = flat.contiguous()
        y = torch.empty(rows, self.out_features, dtype=torch.bfloat16)
        done = self.matmul(self.kind, flat.data_ptr(), rows, self.in_features, self.out_features, self.quants.data_ptr(),
                           self.scales.data_ptr(), self.mins.data_ptr(), y.data_ptr(), torch.get_num_threads())  # fmt: skip
        assert done, "block_matmul refused a shape it was built for"
        return y


def make_kernel(weight: torch.Tensor, quantize: str | None) -> Kernel:
    """The fastest kernel for ``weight`` (a bfloat16 CPU tensor) under the chosen quantization."""
    if quantize is None:
        return PackedLinear(weight)
    if quantize == "int8":
        return Int8Linear(weight)
    raise ValueError(f"unknown quantize mode {quantize!r}; choose one of {', '.join(QUANTIZE_MODES)} or None")
