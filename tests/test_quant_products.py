"""Products straight from llama.cpp blocks (``gllm.ops.block_linear``) against gguf's own dequantization,
for every block type and every instruction set this CPU runs (each pinned in turn)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from gllm.ops import block_linear
from gllm.ops.block_linear import BLOCK_TYPES, BlockEmbedding, BlockLinear, BlockWeight, quantize_activations

pytestmark = pytest.mark.skipif(not block_linear.available(), reason="no C++ compiler to build the CPU kernels")

ISAS = block_linear.usable_isas() if block_linear.available() else []
VECTOR_ISAS = [isa for isa in ISAS if isa != "amx"]  # amx computes in bfloat16: tested on its own below
K_TYPES = ("Q4_K", "Q5_K", "Q6_K")
# float16 fields of each block: byte offset and the range its random values are drawn from
HALVES = {
    "Q4_0": [(0, 0.002, 0.05)],
    "Q4_1": [(0, 0.002, 0.05), (2, -0.4, 0.0)],
    "Q5_0": [(0, 0.002, 0.03)],
    "Q5_1": [(0, 0.002, 0.03), (2, -0.4, 0.0)],
    "Q8_0": [(0, 0.0005, 0.004)],
    "Q4_K": [(0, 0.0005, 0.004), (2, 0.0, 0.004)],
    "Q5_K": [(0, 0.0002, 0.002), (2, 0.0, 0.004)],
    "Q6_K": [(208, 0.0001, 0.001)],
}


def random_blocks(kind: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    """``[rows, row bytes]`` blocks: random quants and scales, float16 factors in a sane range."""
    rng = np.random.default_rng(seed)
    values, size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    blocks = rng.integers(0, 256, size=(rows, cols // values, size), dtype=np.uint8)
    for offset, low, high in HALVES[kind]:
        halves = rng.uniform(low, high, size=(rows, cols // values)).astype(np.float16)
        blocks[..., offset : offset + 2] = halves[..., None].view(np.uint8)
    return torch.from_numpy(blocks.reshape(rows, -1))


def dequantized(kind: str, blocks: torch.Tensor) -> np.ndarray:
    return dequantize(blocks.numpy(), GGMLQuantizationType[kind]).astype(np.float64)


def shapes(kind: str) -> list[tuple[int, int]]:
    """(output rows, columns): odd row counts, one block, several, and a long row (activation chunks)."""
    if kind in K_TYPES:
        return [(1, 256), (17, 768), (5, 8192)]
    return [(1, 32), (17, 96), (33, 576), (5, 8192)]


def dequantized_activations(x: torch.Tensor) -> np.ndarray:
    acts = quantize_activations(x)
    return acts.q.numpy().astype(np.float64) * np.repeat(acts.d.numpy().astype(np.float64), 4, axis=1)


@pytest.mark.parametrize("isa", VECTOR_ISAS)
@pytest.mark.parametrize("kind", BLOCK_TYPES)
def test_products_equal_the_float64_product_of_the_dequantized_operands(isa: str, kind: str) -> None:
    """With the activations rounded to int8 as the kernel rounds them, the only differences left are
    float32 sums: at most a few float32 ulps of the sum of absolute products."""
    gen = torch.Generator().manual_seed(7)
    for n, k in shapes(kind):
        blocks = random_blocks(kind, n, k, seed=n * k)
        weight = dequantized(kind, blocks)
        linear = BlockLinear([BlockWeight(kind, blocks)], out_dtype=torch.float32, isa=isa)
        row_counts = range(1, 71) if k == 576 or (kind in K_TYPES and k == 768) else (1, 3, 4, 33, 70)
        for m in row_counts:
            x = torch.randn(m, k, generator=gen)
            acts = dequantized_activations(x)
            expected = acts @ weight.T
            bound = np.abs(acts) @ np.abs(weight).T * (k / 32 + 16) * 2.0**-22 + 1e-6
            got = linear(x).numpy()
            assert got.shape == (m, n)
            assert np.all(np.abs(got - expected) <= bound), (kind, isa, n, k, m, np.abs(got - expected).max())


@pytest.mark.parametrize("isa", VECTOR_ISAS)
@pytest.mark.parametrize("kind", BLOCK_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_products_are_the_float32_product_within_the_activation_rounding(isa: str, kind: str, dtype) -> None:
    """Against gguf's dequantization and a float32 product of the unrounded activations: each activation
    moves by at most half its step (max |x| / 127 over its 16 values), so a product by sum |w| * step / 2."""
    n, k = (19, 512)
    blocks = random_blocks(kind, n, k, seed=11)
    weight = dequantized(kind, blocks)
    gen = torch.Generator().manual_seed(3)
    for m in (1, 2, 5, 16, 64, 67):
        x = torch.randn(m, k, generator=gen).to(dtype)
        xf = x.float()
        expected = (xf @ torch.from_numpy(weight.astype(np.float32)).T).double().numpy()
        steps = xf.abs().reshape(m, -1, 16).amax(-1) / 127
        half_steps = np.repeat(steps.double().numpy(), 16, axis=1) / 2
        bound = half_steps @ np.abs(weight).T + np.abs(xf.double().numpy()) @ np.abs(weight).T * 2e-6
        got = BlockLinear([BlockWeight(kind, blocks)], out_dtype=torch.float32, isa=isa)(x).double().numpy()
        assert np.all(np.abs(got - expected) <= bound), (kind, isa, m)
        assert np.abs(got - expected).max() > 0 or m == 0  # really rounded: not the float32 product itself
        out = BlockLinear([BlockWeight(kind, blocks)], isa=isa)(x)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), torch.from_numpy(got).float().to(dtype).float(), rtol=0, atol=0)


@pytest.mark.parametrize("isa", VECTOR_ISAS)
def test_instruction_sets_agree_with_the_portable_path(isa: str) -> None:
    """The integer sums are the same on every path: results differ only by the order of float32 sums."""
    gen = torch.Generator().manual_seed(5)
    for kind in BLOCK_TYPES:
        blocks = random_blocks(kind, 40, 1024, seed=2)
        x = torch.randn(9, 1024, generator=gen)
        ours = BlockLinear([BlockWeight(kind, blocks)], torch.float32, isa=isa)(x)
        portable = BlockLinear([BlockWeight(kind, blocks)], torch.float32, isa="portable")(x)
        # float32 sums in another order: a few ulps of the largest partial sums, not of a small result
        torch.testing.assert_close(ours, portable, rtol=0, atol=1e-5 * float(portable.abs().max()))


@pytest.mark.parametrize("isa", VECTOR_ISAS)
def test_a_row_gets_the_same_bits_whatever_rows_share_its_call(isa: str) -> None:
    """Batch invariance (exact replay): a row alone, and first, middle or last in calls of other sizes
    (which the kernels take 1, 2, 3 or 4 rows at a time), comes out bit for bit the same."""
    gen = torch.Generator().manual_seed(11)
    for kind in BLOCK_TYPES:
        product = BlockLinear([BlockWeight(kind, random_blocks(kind, 24, 512, seed=4))], torch.float32, isa=isa)
        row = torch.randn(1, 512, generator=gen)
        alone = product(row)
        for m in (2, 3, 5, 6, 17):
            for at in (0, m // 2, m - 1):
                x = torch.randn(m, 512, generator=gen)
                x[at] = row[0]
                assert torch.equal(product(x)[at], alone[0]), (kind, m, at)


def test_parts_of_several_types_share_one_call() -> None:
    """A fused Q/K/V whose V is Q6_K and Q/K Q4_K (as in Q4_K_M files), and one that mixes block sizes."""
    gen = torch.Generator().manual_seed(9)
    for kinds in (["Q4_K", "Q4_K", "Q6_K"], ["Q8_0", "Q4_K", "Q5_0"]):
        parts = [BlockWeight(kind, random_blocks(kind, 16 + 8 * i, 512, seed=i)) for i, kind in enumerate(kinds)]
        x = torch.randn(6, 512, generator=gen).bfloat16()
        fused = BlockLinear(parts)(x)
        alone = torch.cat([BlockLinear([p])(x) for p in parts], dim=1)
        assert fused.shape == (6, 16 + 24 + 32)
        assert torch.equal(fused, alone)


def test_leading_dimensions_are_kept_and_mismatched_parts_refused() -> None:
    blocks = random_blocks("Q8_0", 32, 64, seed=3)
    linear = BlockLinear([BlockWeight("Q8_0", blocks)])
    x = torch.randn(2, 3, 64)
    assert torch.equal(linear(x), linear(x.reshape(6, 64)).view(2, 3, 32))
    with pytest.raises(ValueError, match="columns"):
        BlockLinear([BlockWeight("Q8_0", blocks), BlockWeight("Q8_0", random_blocks("Q8_0", 32, 96, seed=1))])


def test_activations_are_quantized_as_documented() -> None:
    """Per 16 values: step = max |x| / 127 and q = x * (1 / step) rounded to nearest even, in float32; the
    steps and sums laid out as ``QuantActs`` says."""
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(4)) * 3
    x[1, :16] = 0.0  # an all-zero group: step 0, q 0
    for dtype in (torch.float32, torch.bfloat16):
        acts = quantize_activations(x.to(dtype))
        groups = x.to(dtype).float().numpy().reshape(5, -1, 16)
        step = np.abs(groups).max(-1) / np.float32(127)
        inverse = np.where(step > 0, np.float32(1) / np.where(step > 0, step, 1), 0).astype(np.float32)
        q = np.clip(np.rint(groups * inverse[..., None]), -127, 127).astype(np.int8)
        assert np.array_equal(acts.q.numpy(), q.reshape(5, -1))
        assert np.array_equal(acts.d.numpy(), np.repeat(step, 4, axis=1))
        sums = step * q.astype(np.int32).sum(-1).astype(np.float32)
        assert np.array_equal(acts.s16.numpy(), sums)
        assert np.array_equal(acts.s32.numpy(), sums.reshape(5, -1, 2).sum(-1))


@pytest.mark.parametrize("kind", BLOCK_TYPES)
def test_embedding_rows_are_dequantized_exactly_as_gguf_does(kind: str) -> None:
    blocks = random_blocks(kind, 50, 512, seed=8)
    table = torch.from_numpy(dequantized(kind, blocks).astype(np.float32))
    ids = torch.tensor([[3, 0, 49], [7, 7, 12]])
    assert torch.equal(BlockEmbedding(BlockWeight(kind, blocks), torch.float32)(ids), table[ids])
    assert torch.equal(BlockEmbedding(BlockWeight(kind, blocks), torch.bfloat16)(ids), table[ids].bfloat16())
    with pytest.raises(IndexError):
        BlockEmbedding(BlockWeight(kind, blocks), torch.float32)(torch.tensor([50]))


def test_a_pinned_instruction_set_the_cpu_lacks_is_refused(monkeypatch) -> None:
    lacking = [isa for isa in block_linear.ISAS if isa not in ISAS]
    monkeypatch.setenv("GLLM_CPU_ISA", lacking[0] if lacking else "sse9")
    with pytest.raises(ValueError, match="GLLM_CPU_ISA"):
        block_linear.chosen_isa()
    monkeypatch.setenv("GLLM_CPU_ISA", "portable")
    assert block_linear.chosen_isa() == "portable"
    monkeypatch.delenv("GLLM_CPU_ISA")
    assert block_linear.chosen_isa() == ISAS[-1]


@pytest.mark.skipif("amx" not in ISAS, reason="needs a CPU with AMX-BF16 (and Linux granting AMX tiles)")
@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_amx_products_equal_the_dequantized_bfloat16_product(kind: str) -> None:
    """AMX multiplies bfloat16 activations with the weights expanded to bfloat16 exactly as gguf
    dequantizes them: one rounding to bfloat16 away from the float32 product over bfloat16 weights."""
    rows, cols = 96, 576
    blocks = random_blocks(kind, rows, cols, seed=rows + cols)
    weight = torch.from_numpy(dequantized(kind, blocks).astype(np.float32)).bfloat16()
    linear = BlockLinear([BlockWeight(kind, blocks)], isa="amx")
    gen = torch.Generator().manual_seed(1)
    for m in (1, 5, 16, 17, 64, 65):  # 65: past AMX, the int8 path takes it
        x = torch.randn(m, cols, generator=gen).to(torch.bfloat16)
        got = linear(x)
        expected = x.float() @ weight.float().T
        assert got.shape == (m, rows) and got.dtype == torch.bfloat16
        tolerance = (2**-7, 1e-2) if m <= 64 else (0.05, 0.1)
        torch.testing.assert_close(got.float(), expected, rtol=tolerance[0], atol=tolerance[1])
