"""Matrix products and embedding lookups straight from a GGUF file's quantized blocks, on the CPU.

A decode step reads every weight once, so its speed is the speed of reading the weights: kept in the
file's blocks, a Q4_K_M model reads 0.56-0.82 bytes a value instead of bfloat16's 2. The blocks stay
where the loader mapped them (the file's own bytes, no second copy), and the C++ kernels of
``quant_*.cpp`` multiply from them: each product quantizes its activations to int8 once and sums
u8 x s8 products in integers with the best instructions the CPU has; prompts use the same kernels, four
rows at a time against each unpacked weight row. The int8 rounding of the activations (one step per 16
values) moves a product by a fraction of a percent; ``benchmarks/quality.py`` measures what that costs.

Instruction sets (``ISAS``): ``portable`` C++ everywhere, ``avx2``, ``avxvnni``, ``avx512vnni``, and
``amx`` (Q4_0 / Q4_1 / Q8_0 decode steps of bfloat16 activations as exact bfloat16 products; the rest on
the best of the others). The best the CPU has is used; ``GLLM_CPU_ISA=name`` pins one.
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from gllm.ops import cpu_build
from gllm.ops.invariant import current_plan

ISAS = ("portable", "avx2", "avxvnni", "avx512vnni", "amx")
AMX = ISAS.index("amx")
AMX_MAX_ROWS = 64  # calls with more rows go to the vector kernels (quant_dispatch.cpp, amx_takes)
ACTIVATION_GROUP = 16  # activation values that share one int8 step (quant_formats.h, QuantActs)
BLOCK_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")  # what the kernels read

_I64, _INT, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
SIGNATURES = {  # name: argument types, result type
    "quant_isa_usable": ([_INT], _INT),
    "quant_matmul": ([_PTR, _INT, _I64, _I64, _INT, _PTR, _PTR, _PTR, _PTR, _INT, _INT, _INT], _INT),
    "quant_dequantize_rows": ([_INT, _PTR, _I64, _PTR, _I64, _PTR, _INT, _INT], _INT),
    "quant_activations": ([_PTR, _INT, _I64, _I64, _PTR, _PTR, _PTR, _PTR], None),
}
FLOAT_DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def _functions() -> dict[str, ctypes._CFuncPtr]:
    lib = cpu_build.library()
    if lib is None:
        return {}
    table = {}
    for name, (args, result) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
        table[name] = fn
    return table


def available() -> bool:
    """Whether the kernels are built on this machine (then at least the portable path runs)."""
    return bool(_functions())


def usable_isas() -> list[str]:
    """The instruction sets this CPU and build can run, weakest first."""
    fns = _functions()
    return [name for i, name in enumerate(ISAS) if fns and fns["quant_isa_usable"](i)]


def chosen_isa() -> str:
    """``GLLM_CPU_ISA`` if set (it must be one this CPU runs), else the best this CPU runs."""
    usable = usable_isas()
    if not usable:
        raise RuntimeError("the quantized CPU kernels are not built on this machine (no C++ compiler?)")
    pinned = os.environ.get("GLLM_CPU_ISA")
    if not pinned:
        return usable[-1]
    if pinned not in usable:
        raise ValueError(f"GLLM_CPU_ISA={pinned!r} cannot run here; this CPU runs: {', '.join(usable)}")
    return pinned


def kernel_type(kind: str) -> bool:
    """Whether the products read blocks of this GGML type name."""
    return kind in BLOCK_TYPES


@dataclass
class BlockWeight:
    """A matrix in llama.cpp blocks: ``blocks [rows, row bytes]`` uint8, each row as the file stores it."""

    kind: str
    blocks: torch.Tensor

    @property
    def rows(self) -> int:
        return self.blocks.shape[0]

    @property
    def cols(self) -> int:
        values, size = GGML_QUANT_SIZES[GGMLQuantizationType[self.kind]]
        return self.blocks.shape[1] // size * values

    def dequantize(self) -> torch.Tensor:
        """The whole matrix in float32, as gguf dequantizes it (for a matrix that cannot stay in blocks)."""
        return BlockEmbedding(self, torch.float32)(torch.arange(self.rows))


class BlockLinear:
    """``x @ W.T`` where W is the row-wise concatenation of ``parts`` (a fused Q/K/V or gate/up may mix
    types: each part keeps its own). ``x`` float32 or bfloat16; the result is ``out_dtype`` (default:
    ``x``'s). The activations are quantized once for all parts."""

    def __init__(self, parts: list[BlockWeight], out_dtype: torch.dtype | None = None, isa: str | None = None):
        if len({p.cols for p in parts}) != 1:
            raise ValueError("the parts of a product must have the same number of columns")
        self.parts = parts
        self.in_features, self.out_features = parts[0].cols, sum(p.rows for p in parts)
        self.out_dtype = out_dtype
        self.isa = ISAS.index(isa or chosen_isa())
        self._types = (ctypes.c_int * len(parts))(*(GGMLQuantizationType[p.kind].value for p in parts))
        self._weights = (ctypes.c_void_p * len(parts))(*(p.blocks.data_ptr() for p in parts))
        self._rows = (ctypes.c_int64 * len(parts))(*(p.rows for p in parts))
        self._matmul = _functions()["quant_matmul"]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        if flat.dtype not in FLOAT_DTYPES:
            flat = flat.float()
        flat = flat.contiguous()
        out_dtype = self.out_dtype or x.dtype
        if self.isa == AMX and flat.shape[0] > AMX_MAX_ROWS and current_plan() is not None:
            # batch-invariant: AMX takes calls of up to 64 rows, so every row goes through it
            parts = [self(part) for part in flat.split(AMX_MAX_ROWS)]
            return torch.cat(parts).view(*lead, self.out_features)
        y = torch.empty(flat.shape[0], self.out_features, dtype=out_dtype if out_dtype in FLOAT_DTYPES else torch.float32)
        done = self._matmul(flat.data_ptr(), flat.dtype == torch.bfloat16, flat.shape[0], self.in_features,
                            len(self.parts), self._types, self._weights, self._rows, y.data_ptr(),
                            y.dtype == torch.bfloat16, self.isa, torch.get_num_threads())  # fmt: skip
        if not done:
            raise RuntimeError(f"quant_matmul refused {[p.kind for p in self.parts]} x {tuple(flat.shape)}")
        return y.to(out_dtype).view(*lead, self.out_features)


class BlockEmbedding:
    """Rows of a block-quantized embedding table, dequantized on lookup exactly as gguf does."""

    def __init__(self, weight: BlockWeight, dtype: torch.dtype):
        self.weight, self.dtype = weight, dtype
        self._type = GGMLQuantizationType[weight.kind].value
        self._rows = _functions()["quant_dequantize_rows"]

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).to(torch.int64).contiguous()
        if flat.numel() and not 0 <= int(flat.min()) <= int(flat.max()) < self.weight.rows:
            raise IndexError(f"token ids must lie in 0..{self.weight.rows - 1}")
        dtype = self.dtype if self.dtype in FLOAT_DTYPES else torch.float32
        out = torch.empty(flat.numel(), self.weight.cols, dtype=dtype)
        self._rows(self._type, self.weight.blocks.data_ptr(), self.weight.cols, flat.data_ptr(), flat.numel(),
                   out.data_ptr(), dtype == torch.bfloat16, torch.get_num_threads())  # fmt: skip
        return out.to(self.dtype).view(*ids.shape, self.weight.cols)


@dataclass
class QuantizedActivations:
    """Activations as the products quantize them, laid out as ``QuantActs`` in ``quant_formats.h``."""

    q: torch.Tensor  # [rows, k] int8, x ~ step * q with one step per 16 values
    d: torch.Tensor  # [rows, k / 4] float32: each 16 values' step, written four times
    s16: torch.Tensor  # [rows, k / 16] float32: step x the sum of q over 16 values
    s32: torch.Tensor  # [rows, k / 32] float32: the same over 32 values


def quantize_activations(x: torch.Tensor) -> QuantizedActivations:
    """``x [rows, k]`` (k a multiple of 32) quantized the way the products do it before multiplying."""
    if x.shape[-1] % 32:
        raise ValueError("rows must be a multiple of 32 values")
    x = x.float().contiguous() if x.dtype not in FLOAT_DTYPES else x.contiguous()
    rows, k = x.shape
    acts = QuantizedActivations(torch.empty(rows, k, dtype=torch.int8), torch.empty(rows, k // 4),
                                torch.empty(rows, k // 16), torch.empty(rows, k // 32))  # fmt: skip
    _functions()["quant_activations"](x.data_ptr(), x.dtype == torch.bfloat16, rows, k, acts.q.data_ptr(),
                                      acts.d.data_ptr(), acts.s16.data_ptr(), acts.s32.data_ptr())  # fmt: skip
    return acts
