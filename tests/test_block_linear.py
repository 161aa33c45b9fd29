"""Products straight from llama.cpp blocks (``BlockLinear``, AMX) against gguf's own dequantization."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from gllm.ops.linear import BLOCK_TYPES, BlockLinear, BlockWeight, PackedLinear, block_products_supported

pytestmark = pytest.mark.skipif(not block_products_supported(), reason="needs a CPU with AMX-BF16 and a C++ compiler")


def random_blocks(kind: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    """``[rows, cols / 32, bytes]`` blocks with random scales (and minimums) and quants."""
    rng = np.random.default_rng(seed)
    width = BLOCK_TYPES[kind][1]
    blocks = rng.integers(0, 256, size=(rows, cols // 32, width), dtype=np.uint8)
    halves = blocks.view(np.float16)  # the leading float16 fields
    halves[..., 0] = rng.uniform(0.001, 0.05, size=halves.shape[:2]).astype(np.float16)
    if kind == "Q4_1":
        halves[..., 1] = rng.uniform(-0.4, 0.0, size=halves.shape[:2]).astype(np.float16)
    return torch.from_numpy(blocks)


def reference_weight(kind: str, blocks: torch.Tensor) -> torch.Tensor:
    """gguf's dequantization, rounded to bfloat16: what the engine's dense path multiplies with."""
    rows = blocks.shape[0]
    flat = dequantize(blocks.reshape(rows, -1).numpy(), GGMLQuantizationType[kind])
    return torch.from_numpy(flat.astype(np.float32)).to(torch.bfloat16)


@pytest.mark.parametrize("kind", sorted(BLOCK_TYPES))
@pytest.mark.parametrize("shape", [(48, 64), (96, 576)])
def test_products_equal_the_dequantized_bfloat16_product(kind: str, shape: tuple[int, int]) -> None:
    rows, cols = shape
    blocks = random_blocks(kind, rows, cols, seed=rows + cols)
    weight = reference_weight(kind, blocks)
    dense = PackedLinear(weight)
    linear = BlockLinear(BlockWeight(kind, blocks), dense)
    gen = torch.Generator().manual_seed(1)
    for m in (1, 5, 16, 17, 64, 65):  # 65: past the block kernel, the dense one takes it
        x = torch.randn(m, cols, generator=gen).to(torch.bfloat16)
        got = linear(x)
        expected = x.float() @ weight.float().T
        assert got.shape == (m, rows) and got.dtype == torch.bfloat16
        # float32 sums in another order, then one rounding to bfloat16: at most an ulp apart
        torch.testing.assert_close(got.float(), expected, rtol=2**-7, atol=1e-2)


def test_leading_dimensions_are_kept() -> None:
    blocks = random_blocks("Q8_0", 32, 64, seed=3)
    linear = BlockLinear(BlockWeight("Q8_0", blocks), PackedLinear(reference_weight("Q8_0", blocks)))
    x = torch.randn(2, 3, 64).to(torch.bfloat16)
    torch.testing.assert_close(linear(x).float(), linear(x.reshape(6, 64)).float().view(2, 3, 32), rtol=0, atol=0)


def test_fused_matrices_need_one_kind() -> None:
    a, b = random_blocks("Q4_1", 16, 64, 1), random_blocks("Q8_0", 16, 64, 2)
    assert BlockWeight.cat([BlockWeight("Q4_1", a), BlockWeight("Q8_0", b)]) is None
    joined = BlockWeight.cat([BlockWeight("Q4_1", a), BlockWeight("Q4_1", a)])
    assert joined is not None and joined.blocks.shape == (32, 2, 20)


def test_default_model_blocks_match_its_weights() -> None:
    """The loader keeps each matrix's blocks in the engine's row order (Q and K rows un-permuted)."""
    from gllm.loader import load_model

    loaded = load_model("smollm2-135m-instruct", torch.bfloat16, blocks=True)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.3.self_attn.k_proj.weight",
                 "model.layers.5.mlp.down_proj.weight", "model.embed_tokens.weight"):  # fmt: skip
        block = loaded.blocks[name]
        assert torch.equal(reference_weight(block.kind, block.blocks), loaded.weights[name]), name
    assert not load_model("smollm2-135m-instruct", torch.float32, blocks=True).blocks  # float32: dense products
    assert not load_model("smollm2-135m-instruct", torch.bfloat16).blocks  # not asked for


def test_engine_tokens_equal_with_and_without_blocks() -> None:
    from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine
    from gllm.loader import load_model

    prompts = ["Tell me about the village blacksmith.", "Write a haiku about rain."]
    runs = []
    for keep_blocks in (True, False):
        loaded = load_model("smollm2-135m-instruct", torch.bfloat16, blocks=keep_blocks)
        params = GeneratorParams(block_size=16, max_batch_size=4, max_seq_len=128)
        engine = LLMEngine(loaded, params, dtype=torch.bfloat16)
        assert isinstance(engine.model.head_kernel, BlockLinear) == keep_blocks
        chats = [[{"role": "user", "content": p}] for p in prompts]
        reqs = [GenerationRequest(messages=chat, max_new_tokens=16, temperature=0) for chat in chats]
        runs.append(engine.generate(reqs))
    for a, b in zip(*runs):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 0.05


def test_int8_asked_for_keeps_int8_not_blocks() -> None:
    """``quantize="int8"`` means int8 copies: the file's blocks are not loaded over them."""
    from gllm.engine import GeneratorParams, LLMEngine
    from gllm.ops.linear import Int8Linear

    engine = LLMEngine("smollm2-135m-instruct", GeneratorParams(max_seq_len=64), dtype=torch.bfloat16, quantize="int8")
    assert isinstance(engine.model.head_kernel, Int8Linear)
    assert isinstance(engine.model.layers[0].mlp.down_proj.kernel, Int8Linear)
